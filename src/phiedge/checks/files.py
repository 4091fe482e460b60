"""Checks of a built model folder that do not trust anyone's exit code."""

from __future__ import annotations

from phiedge.artifacts import ModelFolder
from phiedge.errors import BuildError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def external_data_problems(folder: ModelFolder, name: str | None = None) -> list[str]:
    """Every external tensor's file exists and holds its bytes (a truncated .data crashes at load). `name`: one
    of a pipeline's model files (default: the decoder)."""
    import onnx

    onnx_path = folder.path / name if name else folder.decoder_file
    model = onnx.load(str(onnx_path), load_external_data=False) if name else folder.graph
    sizes: dict[str, int] = {}
    problems = []
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = onnx_path.parent / info["location"]
        if location.name not in sizes:
            sizes[location.name] = location.stat().st_size if location.is_file() else -1
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if sizes[location.name] < 0:
            problems.append(f"{location.name} (holding {tensor.name}) is missing")
        elif end > sizes[location.name]:
            problems.append(f"{location.name} ends at byte {sizes[location.name]}, {tensor.name} needs {end}")
    return problems


def check_model_dir(folder: ModelFolder) -> dict:
    """The files ONNX Runtime GenAI needs are there and consistent; returns what it found."""
    model_dir = folder.path
    for filename in folder.model_names:
        if not filename or not (model_dir / filename).is_file():
            raise BuildError(f"genai_config.json names model file {filename!r}, which is not in {model_dir}")
    missing = [f for f in TOKENIZER_FILES if not (model_dir / f).is_file()]
    if missing:
        raise BuildError(f"{model_dir} lacks tokenizer files: {', '.join(missing)}")
    for filename in folder.model_names:
        problems = external_data_problems(folder, filename if folder.stages else None)
        if problems:
            raise BuildError(f"{model_dir / filename}: {problems[0]}")
    return {"model_file": folder.decoder_name, "files": sorted(p.name for p in model_dir.iterdir() if p.is_file())}
