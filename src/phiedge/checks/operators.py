"""Checks of a graph for an execution provider that is not on this machine (DirectML, phones).

Every node's (domain, operator) must be one the provider implements at the graph's opset, with the
element types its kernel accepts; the ai.onnx opset must not exceed what the target's runtime supports;
genai_config.json must name the provider. The operator lists are data (targets/operators/*.yaml), taken
from ONNX Runtime's OperatorKernels.md.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

from phiedge import catalog
from phiedge.artifacts import ModelFolder
from phiedge.errors import BuildError
from phiedge.schema import PROVIDERS, GraphChecks, OperatorSet

DEFAULT_DOMAINS = ("", "ai.onnx")


@lru_cache
def operator_sets() -> dict[str, OperatorSet]:
    return catalog.load_folder(catalog.data_dir("targets") / "operators", OperatorSet)


def graphs(graph):
    """The graph and every subgraph (If/Loop branches), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from graphs(sub)


def element_type_names(model) -> dict[str, str]:
    """Tensor name -> element type name (float, float16, int64, ...), from inputs, initializers and inferred shapes."""
    import onnx

    names = {}
    for graph in graphs(model.graph):
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                names[value.name] = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
        for init in graph.initializer:
            names[init.name] = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name
    return {k: {"float32": "float", "float64": "double"}.get(v, v) for k, v in names.items()}


def nodes(model) -> list:
    return [node for graph in graphs(model.graph) for node in graph.node]


def schema_version(op_type: str, opset: int, domain: str) -> int:
    """The version of the operator's schema in force at this opset (what ORT matches kernels against)."""
    import onnx

    try:
        return onnx.defs.get_schema(op_type, opset, "" if domain == "ai.onnx" else domain).since_version
    except onnx.defs.SchemaError:
        return 1  # com.microsoft operators unknown to the onnx package: version 1, as ORT registers them


def unsupported(model, ops: OperatorSet) -> list[str]:
    """Each (domain, operator) the provider lacks, or has for none of the element types used, once."""
    opset = {("ai.onnx" if o.domain in DEFAULT_DOMAINS else o.domain): o.version for o in model.opset_import}
    types = element_type_names(model)
    problems = {}
    for node in nodes(model):
        domain = "ai.onnx" if node.domain in DEFAULT_DOMAINS else node.domain
        if node.op_type == "Constant" and domain == "ai.onnx":
            continue  # folded into an initializer when the session is created, never run as a kernel
        key = f"{domain}::{node.op_type}"
        kernel = ops.domains.get(domain, {}).get(node.op_type)
        if kernel is None:
            problems.setdefault(key, f"{key} has no {ops.provider} kernel")
            continue
        version = schema_version(node.op_type, opset.get(domain, 1), domain)
        registration = kernel.covers(version, ops.exact_versions)
        if registration is None:
            problems.setdefault(key, f"{key} version {version} (opset {opset.get(domain)}) has no {ops.provider} "
                                     f"kernel (registered at {kernel.since})")
            continue
        allowed = {t for ts in kernel.types_at(registration).values() for t in ts}
        used = {types[name] for name in [*node.input, *node.output] if name in types}
        float_used = {t for t in used if t in ("float", "float16", "bfloat16", "double")}
        if allowed and float_used and not float_used & allowed:
            problems.setdefault(key, f"{key} on {', '.join(sorted(float_used))}: {ops.provider} has it for "
                                     f"{', '.join(sorted(allowed))}")
    return list(problems.values())


def check_graph(folder: ModelFolder, provider: str, checks: GraphChecks, names: list[str] | None = None) -> dict:
    """Raise BuildError listing every problem; return what was checked, for the build record and manifest.
    `names`: the model files to check (a pipeline's models for the provider; default: the decoder)."""
    import onnx

    decoder = folder.decoder
    sets = operator_sets()
    if checks.operators not in sets:
        raise BuildError(f"operator list {checks.operators!r} not found under targets/operators/ "
                         f"(known: {', '.join(sorted(sets))})")
    ops = sets[checks.operators]
    graphs_read = [onnx.load(str(folder.path / name), load_external_data=False) for name in names] if names \
        else [folder.graph]
    models = [onnx.shape_inference.infer_shapes(g) for g in graphs_read]  # new models: the folder's stay as they are
    problems = list(dict.fromkeys(p for model in models for p in unsupported(model, ops)))
    opset = max(next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 0) for model in models)
    if opset > checks.max_opset:
        problems.append(f"ai.onnx opset {opset} is above {checks.max_opset}, the highest the target's runtime runs")
    sessions = [decoder.get("session_options", {})] + [s.get("session_options", {}) for s in folder.stages
                                                       if not names or s["filename"] in names]
    named = sorted({name for options in sessions for entry in options.get("provider_options", []) for name in entry})
    want = PROVIDERS[provider].genai
    if want is not None and want not in named:
        problems.append(f"genai_config.json provider_options name {named or 'no provider'}, not {want!r}")
    if want is None and named:
        problems.append(f"genai_config.json asks for provider(s) {named}; the CPU target needs none")
    if problems:
        raise BuildError(f"the graph does not suit {ops.provider}: " + "; ".join(problems))
    counts = Counter(f"{'ai.onnx' if n.domain in DEFAULT_DOMAINS else n.domain}::{n.op_type}"
                     for model in models for n in nodes(model))
    return {"provider": ops.provider, "operator_list": checks.operators, "operator_source": ops.source,
            "opset": opset, "max_opset": checks.max_opset, "operators": dict(sorted(counts.items())),
            "provider_options": named, **({"models": list(names)} if names else {})}
