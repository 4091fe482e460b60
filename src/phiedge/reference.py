"""The original model in PyTorch (transformers, fp32), and greedy agreement of a built model with it."""

from __future__ import annotations

import math
from pathlib import Path

PROMPTS = (
    "def fibonacci(n):",
    "import os\nimport sys\n\n",
    "class Queue:\n    \"\"\"A first-in, first-out queue.\"\"\"\n",
)


# Above this many bytes of fp32 parameters the reference runs one decoder layer at a time: Phi-4-mini in fp32
# is 15 GB, twice its bf16 checkpoint, and the bound on a build is 1.5x the checkpoint.
LAYERWISE_ABOVE_BYTES = 4 * 10**9


def load_reference(model_dir: str | Path, layerwise: bool | None = None, transform=None):
    """The checkpoint in fp32 with transformers' built-in class (never remote code).

    layerwise (default: when the fp32 weights exceed LAYERWISE_ABOVE_BYTES): only the embedding, final norm
    and LM head stay in memory; each decoder layer's weights are read from the safetensors files when the
    layer runs and dropped after it. Same modules, same fp32 arithmetic, same logits; slower per forward.
    transform(name, fp32 tensor) -> tensor replaces each parameter as it is loaded (the dequantized
    reference: what a quantized build must compute). A tied LM head then gets a copy of its own, made by
    transform("lm_head.weight", table), since a build may store the table and the head at different bits.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    if layerwise is None:
        from .checkpoint import parameter_shapes

        layerwise = 4 * sum(math.prod(s) for s in parameter_shapes(config).values()) > LAYERWISE_ABOVE_BYTES
    if not layerwise:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, trust_remote_code=False)
        if transform is not None:
            _transform_loaded(model, transform)
        return model.eval()
    return _layerwise(Path(model_dir), config, transform)


def _transform_loaded(model, transform) -> None:
    import torch

    with torch.no_grad():
        head = model.lm_head.weight
        tied = head is model.get_input_embeddings().weight
        if tied:
            model.lm_head.weight = torch.nn.Parameter(transform("lm_head.weight", head.detach().clone()))
        for name, param in model.named_parameters():
            if not (tied and name == "lm_head.weight"):
                param.copy_(transform(name, param.detach()))


def _layerwise(model_dir: Path, config, transform):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from .prequant import Weights

    weights = Weights(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)

    def load(module, prefix: str) -> None:
        state = {name: weights.tensor(prefix + name).to(torch.float32) for name, _ in module.named_parameters()}
        if transform is not None:
            state = {name: transform(prefix + name, tensor) for name, tensor in state.items()}
        module.load_state_dict(state, assign=True)

    inner = model.model
    for name, module in inner.named_children():
        if name == "layers":
            continue
        if name == "rotary_emb":  # buffers computed from the config, not stored in the checkpoint
            inner.rotary_emb = type(module)(config=config)
        else:
            load(module, f"model.{name}.")
    if config.tie_word_embeddings and transform is None:
        model.lm_head.weight = inner.embed_tokens.weight
    elif config.tie_word_embeddings:
        table = weights.tensor("model.embed_tokens.weight").to(torch.float32)
        model.lm_head.weight = torch.nn.Parameter(transform("lm_head.weight", table))
    else:
        load(model.lm_head, "lm_head.")
    for i, layer in enumerate(inner.layers):
        layer.register_forward_pre_hook(lambda module, args, prefix=f"model.layers.{i}.": load(module, prefix))
        layer.register_forward_hook(lambda module, args, output: (module.to("meta"), None)[1])
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    return model.eval()


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=model.generation_config.pad_token_id or (eos[0] if isinstance(eos, list) else eos))
    return out[0, len(prompt_ids):].tolist()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy_metrics(model, reference, tokenizer, prompts: tuple[str, ...], n_tokens: int) -> dict:
    """Greedy tokens of a loaded onnxruntime-genai model and of transformers, prompt by prompt."""
    from .generate import generate

    rows = []
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        built = list(generate(model, ids, n_tokens))
        ref = reference_greedy(reference, ids, n_tokens)
        rows.append({"prompt": text, "agree": common_prefix(built, ref), "of": len(ref), "identical": built == ref,
                     "built": built, "reference": ref})
    return {"prompts": rows, "greedy": sum(r["identical"] for r in rows) / len(rows)}


def greedy_parity(built_dir: str | Path, reference_dir: str | Path, max_new_tokens: int = 32,
                  prompts: tuple[str, ...] = PROMPTS) -> list[dict]:
    """greedy_metrics' rows for a built folder and a checkpoint folder."""
    from transformers import AutoTokenizer

    from .model_safety import load

    tokenizer = AutoTokenizer.from_pretrained(str(reference_dir), trust_remote_code=False)
    model, _ = load(built_dir)
    return greedy_metrics(model, load_reference(reference_dir), tokenizer, prompts, max_new_tokens)["prompts"]
