"""A PEFT LoRA adapter folder, read and held to the checkpoint it is built over, before anything runs.

An adapter is what PEFT's `save_pretrained` writes: adapter_config.json and adapter_model.safetensors (never
adapter_model.bin, a pickle phiedge does not load). Its layout is the set of matrices it adapts and the rank
of each; every adapter of one build must share it, since the built graph has one pair of LoRA inputs per
adapted matrix. In the ONNX Runtime adapter files the weights are named and laid out as Olive's
`convert-adapters` writes them: `model.layers.N.<module>.lora_A.weight` transposed to [in, r], and lora_B
transposed to [r, out] with PEFT's scaling (alpha / r, or alpha / sqrt(r) for rsLoRA) folded in.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from phiedge.checkpoints.checkpoint import parameter_shapes
from phiedge.errors import ModelError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# What the built graph can add a LoRA path beside: the Phi-3 family's fused linear layers.
MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.([\w.]+)\.lora_([AB])\.weight$")
REFUSED = {  # adapter_config.json settings the graph's plain x @ A @ B path does not compute
    "use_dora": "DoRA (use_dora) is not supported, only plain LoRA",
    "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D layers) are not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "modules_to_save": "modules_to_save (whole trained layers) are not supported",
}


@dataclass(frozen=True)
class Adapter:
    """One LoRA adapter: its name in the build, its folder, and its layout."""

    name: str
    path: Path
    rank: int
    alpha: float
    scaling: float
    matrices: tuple[str, ...]  # model.layers.N.<module>, sorted
    base_model: str | None  # as adapter_config.json says (not checked: a name, not a proof)

    @property
    def layout(self) -> tuple[int, tuple[str, ...]]:
        return self.rank, self.matrices

    def modules(self) -> list[str]:
        return sorted({m.split(".", 3)[3] for m in self.matrices})

    def describe(self) -> str:
        layers = sorted({int(m.split(".")[2]) for m in self.matrices})
        return f"{', '.join(self.modules())} of {len(layers)} layer(s) at rank {self.rank}"


def parse_spec(spec: str) -> tuple[str, Path]:
    """NAME=PEFT_DIR, as `--adapter` takes it."""
    name, sep, folder = spec.partition("=")
    if not sep or not folder:
        raise ModelError(f"--adapter {spec!r}: expected NAME=PEFT_DIR")
    if not NAME.match(name):
        raise ModelError(f"--adapter {spec!r}: a name is letters, digits, '.', '_' and '-' (at most 64)")
    return name, Path(folder)


def read(name: str, folder: Path, config: dict) -> Adapter:
    """The adapter in a PEFT folder, checked against the checkpoint's config: raises ModelError naming the problem."""
    folder = Path(folder)
    where = f"adapter {name} ({folder})"
    if not folder.is_dir():
        raise ModelError(f"{where}: not a folder")
    if not (folder / CONFIG).is_file():
        raise ModelError(f"{where}: no {CONFIG} (not a PEFT adapter folder)")
    try:
        settings = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{where}: {CONFIG} is not readable JSON ({exc})") from None
    if not isinstance(settings, dict):
        raise ModelError(f"{where}: {CONFIG} is not a JSON object")
    if settings.get("peft_type") != "LORA":
        raise ModelError(f"{where}: peft_type is {settings.get('peft_type')!r}, not LORA")
    refused = [why for key, why in REFUSED.items() if settings.get(key)]
    if settings.get("bias", "none") != "none":
        refused.append(f"bias {settings['bias']!r} (trained biases) is not supported, only bias 'none'")
    if refused:
        raise ModelError(f"{where}: " + "; ".join(refused))
    if not (folder / WEIGHTS).is_file():
        pickle = (folder / "adapter_model.bin").exists()
        other = " (adapter_model.bin is a pickle, which phiedge never loads)" if pickle else ""
        raise ModelError(f"{where}: no {WEIGHTS}{other}")
    shapes = weight_shapes(folder / WEIGHTS, where)
    expected = parameter_shapes(config)
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        m = KEY.match(key)
        if m is None or m.group(2) not in MODULES:
            module = m.group(2) if m else key
            raise ModelError(f"{where}: adapts {module}, which is not one of {config['architectures'][0]}'s "
                             f"linear layers phiedge can adapt ({', '.join(MODULES)}): an adapter for another "
                             "architecture?")
        pairs.setdefault(f"model.layers.{m.group(1)}.{m.group(2)}", {})[m.group(3)] = shape
    if not pairs:
        raise ModelError(f"{where}: {WEIGHTS} holds no LoRA weights")
    ranks = set()
    for matrix, ab in sorted(pairs.items()):
        base = expected.get(matrix + ".weight")
        if base is None:
            raise ModelError(f"{where}: adapts {matrix}, which the checkpoint does not have "
                             f"({config['num_hidden_layers']} layers): an adapter for another model?")
        if set(ab) != {"A", "B"}:
            raise ModelError(f"{where}: {matrix} has lora_{''.join(ab)} without its pair")
        (r, cols), (rows, r_b) = ab["A"], ab["B"]
        if (rows, cols) != base or r != r_b:
            raise ModelError(f"{where}: {matrix} is adapted as {rows}x{cols} (lora_B {rows}x{r_b}, lora_A {r}x{cols}), "
                             f"but the checkpoint's is {base[0]}x{base[1]}: an adapter for another model?")
        ranks.add(r)
    rank = settings.get("r")
    if ranks != {rank}:
        raise ModelError(f"{where}: {CONFIG} says rank {rank}, the weights have rank(s) {sorted(ranks)}")
    alpha = float(settings.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
    return Adapter(name, folder.resolve(), rank, alpha, scaling, tuple(sorted(pairs)),
                   settings.get("base_model_name_or_path"))


def weight_shapes(path: Path, where: str) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{where}: {path.name} is not a readable safetensors file ({exc})") from None


def read_all(specs: list[tuple[str, Path]], config: dict) -> list[Adapter]:
    """Every adapter of a build, each checked, all with one layout; raises ModelError naming a mismatch."""
    names = [name for name, _ in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ModelError(f"adapter name(s) given twice: {', '.join(dupes)}")
    adapters = [read(name, folder, config) for name, folder in specs]
    first = adapters[0] if adapters else None
    for a in adapters[1:]:
        if a.layout != first.layout:
            raise ModelError(f"adapter {a.name} adapts {a.describe()}, adapter {first.name} {first.describe()}: "
                             "every adapter of one build must adapt the same matrices at the same rank")
    return adapters


def onnx_weights(adapter: Adapter, dtype: str = "float32") -> dict:
    """The adapter's weights as the ONNX Runtime adapter file holds them (Olive convert-adapters' names and
    layout): {model.layers.N.<module>.lora_A.weight: [in, r], ...lora_B.weight: [r, out] * scaling}."""
    from safetensors.torch import load_file

    out = {}
    for key, value in load_file(str(adapter.path / WEIGHTS)).items():
        name = key.replace("base_model.model.model.", "model.", 1)
        w = value.float().numpy().T.copy()
        if ".lora_B." in name:
            w *= adapter.scaling
        out[name] = w.astype(dtype)
    return out


def merged(adapter: Adapter, transform=None):
    """load_reference's transform with the adapter merged into each weight it adapts, W + scaling * B @ A, as PEFT's
    merge computes it: the reference for a checkpoint loaded one layer at a time, whose meta-device layers PEFT
    cannot wrap. `transform` (the dequantizer's) is applied to W first."""
    import torch

    weights = onnx_weights(adapter)  # lora_A [in, r] and lora_B [r, out] * scaling

    def apply(name: str, tensor):
        tensor = transform(name, tensor) if transform is not None else tensor
        a = weights.get(name.replace(".weight", ".lora_A.weight"))
        if a is None:
            return tensor
        return tensor + torch.from_numpy(a @ weights[name.replace(".weight", ".lora_B.weight")]).T

    return apply


def apply_peft(model, folder: Path):
    """A transformers model with the adapter applied by PEFT itself (the reference a build's adapter is held to)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), is_trainable=False).eval()
