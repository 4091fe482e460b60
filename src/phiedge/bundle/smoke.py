"""Load a model folder in onnxruntime-genai and generate a few tokens: usable, not just present."""

from __future__ import annotations

from pathlib import Path

from phiedge.bundle import model_safety
from phiedge.bundle.generate import generate, load, load_adapter
from phiedge.errors import BuildError


def smoke_generate(model_dir: Path, n_tokens: int = 4, adapters: list[str] = ()) -> list[int]:
    """Load with ONNX Runtime GenAI and generate a few tokens: the model is usable, not just present. Then the
    same with each named LoRA adapter active."""
    model_safety.check_model_folder(model_dir)  # outside the try: a refusal is not a load failure
    name = None
    try:
        model, tokenizer = load(str(model_dir))
        prompt = list(tokenizer.encode("def main():"))
        tokens = list(generate(model, prompt, max_new_tokens=n_tokens))
        for name in adapters:
            list(generate(model, prompt, max_new_tokens=n_tokens, adapter=load_adapter(model, str(model_dir), name)))
    except Exception as exc:  # onnxruntime-genai raises plain RuntimeError for every load failure
        with_adapter = f" with adapter {name}" if name else ""
        raise BuildError(f"the built model does not load or run in onnxruntime-genai{with_adapter}: {exc}") from None
    if not tokens:
        raise BuildError("the built model loaded but generated no token")
    return tokens
