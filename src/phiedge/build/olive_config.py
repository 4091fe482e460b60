"""(recipe, target, model, options) -> the Olive workflow config phiedge runs.

A pure function: `phiedge build --dry-run` prints its result and tests snapshot it.
"""

from __future__ import annotations

import copy
from pathlib import Path

from phiedge.errors import ConfigError
from phiedge.schema import Int4Settings, Target


def builder_options(precision: str, int4: Int4Settings) -> dict:
    """The ModelBuilder pass options that carry a target's precision and int4 settings."""
    options: dict = {"precision": precision}
    if precision == "int4":
        options.update(int4_block_size=int4.block_size, int4_accuracy_level=int4.accuracy_level,
                       int4_is_symmetric=int4.symmetric, int4_algo_config=int4.algorithm)
        if int4.float_nodes:
            options["int4_nodes_to_exclude"] = list(int4.float_nodes)
    return options


def streamed(precision: str, int4: Int4Settings) -> bool:
    """Whether phiedge quantizes the checkpoint before the builder (`prequant`) for these settings."""
    return precision == "int4" and int4.method == "stream"


QUANTIZING_PASSES = ("Gptq", "Rtn")  # Olive passes that quantize the PyTorch model before the builder


def requantizing_passes(recipe: dict) -> list[str]:
    """Passes of a recipe that quantize the PyTorch model before the builder."""
    return [p["type"] for p in recipe["passes"].values() if p["type"] in QUANTIZING_PASSES]


def builder_extra_options(precision: str, int4: Int4Settings) -> dict:
    if streamed(precision, int4):  # the LM head is already quantized: the builder must not tie the table to it
        return {"shared_embeddings": False}
    if precision == "int4" and int4.shared_embeddings is not None:
        return {"shared_embeddings": int4.shared_embeddings}
    return {}


SYSTEM = "local_system"  # the one Olive system a filled recipe runs on, with the target's accelerator


def calibration_file(workdir: Path) -> Path:
    return workdir / "calibration.jsonl"


def fill(recipe: dict, target: Target, model_dir: Path, workdir: Path, precision: str | None = None,
         int4: Int4Settings | None = None) -> dict:
    """Fill a recipe: model path, provider, precision and int4 settings, calibration data, where Olive writes."""
    precision = precision or target.precision
    int4 = int4 or target.int4
    config = copy.deepcopy(recipe)
    model_dir = Path(model_dir)  # a folder that is yet to be made (method stream's) is shown as given
    config["input_model"]["model_path"] = str(model_dir.resolve() if model_dir.exists() else model_dir)
    config["systems"] = {SYSTEM: {"type": "LocalSystem", "accelerators": [
        {"device": target.provider.olive_device, "execution_providers": [target.provider.onnxruntime]}]}}
    config["host"] = config["target"] = SYSTEM
    builders = [p for p in config["passes"].values() if p["type"] == "ModelBuilder"]
    if len(builders) != 1:
        raise ConfigError("recipe", [f"expected one ModelBuilder pass, found {len(builders)}"])
    builder = builders[0]  # its int4_* keys are the target's: the schema refuses them in a recipe
    builder.update(builder_options(precision, int4))
    extra = {k: v for k, v in builder.get("extra_options", {}).items() if k != "shared_embeddings"}
    builder["extra_options"] = {**extra, **builder_extra_options(precision, int4)}
    for data in config.get("data_configs") or []:
        load = data.get("load_dataset_config", {})
        if load.get("data_name") == "json" and load.get("data_files") is None:
            load["data_files"] = str(calibration_file(workdir))
    if target.npu is not None:
        # the NPU graph's embedding lookup (on the CPU) is a GatherBlockQuantized too, as in Olive's QNN recipes
        builder["int4_op_types_to_quantize"] = ["MatMul", "Gather"]
    for p in config["passes"].values():
        if p["type"] == "StaticLLM" and target.npu is not None:  # the static prompt window
            p["context_length"] = target.npu.window
        if p["type"] in QUANTIZING_PASSES:  # quantization before the builder: the target's block and symmetry
            p.update(bits=4, group_size=int4.block_size, sym=int4.symmetric)
    config["cache_dir"] = str(workdir / "olive-cache")
    config["output_dir"] = str(workdir / "olive-output")
    return config
