"""
LoRA, hand-written in peft's convention (W x + alpha/r B A dropout(x), B zero at the start): adapters on the LM's projections,
switched off for a reference pass, merged into the weights for the next stage, resumed exactly.
"""
import math

import torch
import torch.nn as nn

import model as M
from lucid.common import on_meta

# LoRA in peft's convention (so adapters and intuitions carry over): W x + (alpha / r) B A dropout(x), A (r, in)
# Kaiming-uniform, B (out, r) zero, so a fresh adapter leaves the model exactly as it was.
LORA_TARGETS = r"lm\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"  # the LM's attention and MLP


class LoRALinear(nn.Module):
    """base(x) + dropout(x) A^T B^T alpha / r: an nn.Linear (kept as .base) with a rank-r update."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base, self.r, self.scaling = base, r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's (and nn.Linear's) init
        self.register_buffer("lora_scaling", torch.tensor(self.scaling), persistent=True)  # so state dicts can be merged alone
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.disabled = False

    def forward(self, x):
        y = self.base(x)
        if self.disabled:
            return y
        return y + (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scaling).to(y.dtype)

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling


def add_lora(module, r, alpha, dropout=0.0, targets=LORA_TARGETS):
    """Replace every nn.Linear whose qualified name matches the regex `targets` with a LoRALinear
    around it, and freeze every parameter but the adapters (set_trainable then also trains the
    projector or vision tower if their lr says so, and of the LM only the adapters). Returns the names."""
    import re
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and re.search(targets, n)]
    if not names:
        raise ValueError(f"add_lora: no nn.Linear matches {targets!r}")
    for p in module.parameters():
        p.requires_grad_(False)
    for n in names:
        parent, _, child = n.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        setattr(owner, child, LoRALinear(getattr(owner, child), r, alpha, dropout))
    return names


def lora_modules(module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoRALinear)]


class lora_disabled:
    """with lora_disabled(model): the adapters are off, the model is its base: DPO's reference at no memory cost."""

    def __init__(self, module):
        self.mods = [m for _, m in lora_modules(module)]

    def __enter__(self):
        for m in self.mods:
            m.disabled = True

    def __exit__(self, *exc):
        for m in self.mods:
            m.disabled = False
        return False


@torch.no_grad()
def merge_lora(module):
    """Fold every adapter into its base weight and put the plain nn.Linear back: a model any loader reads."""
    for n, m in lora_modules(module):
        m.base.weight += m.delta_weight().to(m.base.weight.dtype)
        parent, _, child = n.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, m.base)
    return module


def merge_lora_state_dict(sd):
    """A state dict with adapters (keys '<name>.base.weight', '<name>.lora_A', '<name>.lora_B') ->
    (the plain state dict merge_lora would give, the adapters alone). Works on a full state dict
    gathered from FSDP shards as on module.state_dict(); the module is not touched. Each adapter
    stores its alpha / r as the buffer 'lora_scaling', so the state dict is all it needs."""
    sd, adapters = dict(sd), {}
    for k in [k for k in sd if k.endswith(".lora_A")]:
        name = k[:-len(".lora_A")]
        A, B, scale = sd.pop(k), sd.pop(name + ".lora_B"), sd.pop(name + ".lora_scaling")
        adapters.update({k: A, name + ".lora_B": B, name + ".lora_scaling": scale})
        W = sd.pop(name + ".base.weight")
        sd[name + ".weight"] = (W.float() + (B.float() @ A.float()) * scale.float()).to(W.dtype)
        if name + ".base.bias" in sd:
            sd[name + ".bias"] = sd.pop(name + ".base.bias")
    return sd, adapters


def load_lora_state_dict(module, adapters):
    """Put saved adapters (merge_lora_state_dict's second result) back into a module that add_lora wrapped."""
    missing, unexpected = module.load_state_dict(adapters, strict=False)
    if unexpected or any(k.endswith((".lora_A", ".lora_B")) for k in missing):
        raise ValueError(f"adapters do not match the model's LoRA layers (unexpected {unexpected[:3]}, "
                         f"missing {[k for k in missing if 'lora_' in k][:3]})")


def add_adapters(vlm, r, alpha, dropout, targets, resume_state, out_dir, log):
    """add_lora for a training run (sft.py, dpo.py), which may be a resumed one. Resuming (resume_state given), vlm must
    be the run's starting model: the adapted layers keep its weights and get the saved adapters back,
    every other weight (a trained projector) comes from out_dir's checkpoint, which holds them merged."""
    names = add_lora(vlm, r, alpha, dropout, targets)
    log(f"LoRA r {r}, alpha {alpha} on {len(names)} layers ({names[0]}, ...)")
    if resume_state and not on_meta(vlm):  # (on the meta device nothing is read: shard() fills it from rank 0)
        saved = M.VLM.from_pretrained(out_dir).state_dict()
        adapted = {n + suffix for n in names for suffix in (".weight", ".bias")}
        vlm.load_state_dict({k: v for k, v in saved.items() if k not in adapted}, strict=False)
        load_lora_state_dict(vlm, resume_state["lora"])
        log(f"resuming LoRA from {out_dir} at step {resume_state['step']}")
    return names


def lora_merged(sd):
    """save()'s model_state for LoRA: the model directory gets the merged weights (loadable by anything,
    the next stage's start), train_state.pt the adapters apart (for an exact resume)."""
    sd, adapters = merge_lora_state_dict(sd)
    return sd, {"lora": adapters}
