"""
What trains, at what learning rate, for how many steps: per-part freezing and learning rates, AdamW,
the warmup + cosine schedule, gradient clipping.
"""
import math

import torch

from configurator import ConfigError
from lucid.lora import LoRALinear
from model import PARTS


def part_of(name):
    return name.split(".")[0]


def unused_vision_parameters(vlm):
    """Names of vision-tower parameters our features never depend on: the layers after the chosen
    feature layer (LLaVA takes the penultimate one, so the last layer is dead weight), the
    post-layernorm, SigLIP's pooling head. Found by one tiny backward pass rather than by name, so it
    holds for any tower. They must be frozen: DDP errors on parameters that never get a gradient."""
    v = vlm.vision.config
    saved = {n: p.requires_grad for n, p in vlm.vision.named_parameters()}
    for p in vlm.vision.parameters():
        p.requires_grad_(True)
    params = dict(vlm.vision.named_parameters())
    with torch.enable_grad():
        x = torch.zeros(1, 3, v.image_size, v.image_size, device=next(vlm.parameters()).device)
        feats = vlm.vision(x.to(vlm.projector.linear_1.weight.dtype), output_hidden_states=True).hidden_states
        grads = torch.autograd.grad(feats[vlm.config["vision_feature_layer"]].sum(), list(params.values()), allow_unused=True)
    for n, p in params.items():
        p.requires_grad_(saved[n])
    return ["vision." + n for n, g in zip(params, grads) if g is None]


def set_trainable(vlm, lrs):
    """Freeze every part whose lr ({'vision': .., 'projector': .., 'lm': ..}) is 0 or None, and the vision
    parameters the features never use. Call before sharding (FSDP) and before configure_optimizer."""
    unused = set(unused_vision_parameters(vlm)) if lrs.get("vision") else set()
    adapters = any(isinstance(m, LoRALinear) for m in vlm.modules())  # LoRA: of the adapted layers, only A and B train
    for n, p in vlm.named_parameters():
        frozen_base = adapters and part_of(n) == "lm" and not n.endswith((".lora_A", ".lora_B"))
        p.requires_grad_(bool(lrs.get(part_of(n))) and n not in unused and not frozen_base)
    if not any(p.requires_grad for p in vlm.parameters()):
        raise ValueError(f"every part is frozen (learning rates {lrs})")
    return sorted(unused)


def configure_optimizer(vlm, lrs, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, fused=None):
    """AdamW over the trainable parameters, one learning rate per part. Norm weights and biases
    (ndim < 2) get no weight decay. Each group remembers its base lr for the schedule."""
    groups = []
    for part in PARTS:
        params = [p for n, p in vlm.named_parameters() if part_of(n) == part and p.requires_grad]
        groups += [dict(params=[p for p in params if p.dim() >= 2], lr=lrs[part], weight_decay=weight_decay, part=part),
                   dict(params=[p for p in params if p.dim() < 2], lr=lrs[part], weight_decay=0.0, part=part)]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=fused)


def lr_factor(step, max_steps, warmup_steps, min_factor=0.0):
    """Linear warmup, then cosine decay to min_factor (LLaVA: warmup 3%, cosine to 0)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_factor + (1 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def steps(n_train, global_batch_size, micro_batch_size, world_size, max_steps, epochs, warmup_ratio):
    """(grad_accum, max_steps, warmup_steps). The global batch is fixed; accumulation adapts to the
    world size. max_steps 0: as many steps as `epochs` passes over n_train samples take."""
    if global_batch_size % (micro_batch_size * world_size) != 0:
        raise ConfigError(f"global_batch_size {global_batch_size} must be a multiple of micro_batch_size {micro_batch_size} "
                         f"x world size {world_size}")
    max_steps = max_steps or math.ceil(epochs * n_train / global_batch_size)
    return global_batch_size // (micro_batch_size * world_size), max_steps, math.ceil(warmup_ratio * max_steps)


def set_lr(optimizer, factor):
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor


def clip_grad(params, max_norm):
    """Clip the gradients' global norm to max_norm (0 = no clipping) and return the norm before, as a
    float (inf / nan when a gradient overflowed): logged, it is the first sign of a bad step. Under
    FSDP2 the norm is a DTensor over the shards: its full value is gathered."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
