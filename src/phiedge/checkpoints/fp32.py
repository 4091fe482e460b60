"""The checkpoint in PyTorch (transformers' own classes, fp32): whole, or one decoder layer at a time."""

from __future__ import annotations

import math
from pathlib import Path

from phiedge.checkpoints import lora
from phiedge.checkpoints.checkpoint import parameter_shapes, read_config
from phiedge.checkpoints.weights import Weights

# Above this many bytes of fp32 parameters the reference runs one decoder layer at a time: Phi-4-mini in fp32
# is 15 GB, twice its bf16 checkpoint, and the bound on a build is 1.5x the checkpoint.
LAYERWISE_ABOVE_BYTES = 4 * 10**9


def load_reference(model_dir: str | Path, layerwise: bool | None = None, transform=None, adapter: Path | None = None):
    """The checkpoint in fp32 with transformers' built-in class (never remote code).

    layerwise (default: when the fp32 weights exceed LAYERWISE_ABOVE_BYTES): only the embedding, final norm
    and LM head stay in memory; each decoder layer's weights are read from the safetensors files when the
    layer runs and dropped after it. Same modules, same fp32 arithmetic, same logits; slower per forward.
    transform(name, fp32 tensor) -> tensor replaces each parameter as it is loaded (the dequantized
    reference: what a quantized build must compute). A tied LM head then gets a copy of its own, made by
    transform("lm_head.weight", table), since a build may store the table and the head at different bits.
    adapter: a PEFT LoRA folder, applied by PEFT itself; layerwise, merged into each weight as its layer is loaded
    (lora.merged), since PEFT cannot wrap layers that wait on the meta device.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    if layerwise is None:
        layerwise = 4 * sum(math.prod(s) for s in parameter_shapes(config).values()) > LAYERWISE_ABOVE_BYTES
    if not layerwise:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, trust_remote_code=False)
        if transform is not None:
            _transform_loaded(model, transform)
        return (lora.apply_peft(model, adapter) if adapter is not None else model).eval()
    if adapter is not None:
        transform = lora.merged(lora.read("reference", Path(adapter), read_config(Path(model_dir))), transform)
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
