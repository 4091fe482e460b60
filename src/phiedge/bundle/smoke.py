"""Load a model folder in onnxruntime-genai and generate a few tokens: usable, not just present."""

from __future__ import annotations

from pathlib import Path

from phiedge.bundle import model_safety
from phiedge.bundle.generate import generate, load
from phiedge.errors import BuildError


def smoke_generate(model_dir: Path, n_tokens: int = 4) -> list[int]:
    """Load with ONNX Runtime GenAI and generate a few tokens: the model is usable, not just present."""
    model_safety.check_model_folder(model_dir)  # outside the try: a refusal is not a load failure
    try:
        model, tokenizer = load(str(model_dir))
        prompt = list(tokenizer.encode("def main():"))
        tokens = list(generate(model, prompt, max_new_tokens=n_tokens))
    except Exception as exc:  # onnxruntime-genai raises plain RuntimeError for every load failure
        raise BuildError(f"the built model does not load or run in onnxruntime-genai: {exc}") from None
    if not tokens:
        raise BuildError("the built model loaded but generated no token")
    return tokens
