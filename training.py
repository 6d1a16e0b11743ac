"""
The training machinery sft.py and dpo.py share, as small functions: each script keeps its own loop,
top to bottom (as nanochat's chat_sft.py and chat_rl.py share common.py and checkpoint_manager.py).

    setup          distributed init, device, precision (autocast), TF32, a master-only print
    resume_point   the train state of a resumed run and the model the run started from
    add_lora, lora_merged   LoRA adapters on the LM (resuming: the starting model + the saved adapters),
                   and the checkpoint's merged weights
    build          the starting model; under FSDP2 only rank 0 reads its weights, the others build it on
                   the meta device (no memory)
    master_weights trainable parameters in fp32, frozen ones in the compute dtype
    wrap, shard    FSDP2 sharding (every rank's shards filled from rank 0) or DDP, optional torch.compile;
                   returns the wrapped and the raw module
    grad_sync      the context that all-reduces gradients only on a step's last micro-batch
    steps          gradient accumulation, number of steps and warmup steps from the batch sizes and epochs
    set_lr         the schedule factor applied to every group's base lr
    clip_grad      gradient clipping that returns the norm (logged by both scripts)
    save / resume  checkpoint (model dir + train_state.pt, one atomic swap; FSDP gathers first), exact resume
    recover        finish or undo the checkpoint swap a kill interrupted (call before reading out_dir)
    JsonLog        one JSON line per event in out_dir/log.jsonl (and wandb when asked)
    loader, to_device   the DataLoader over a batch sampler, and a batch moved to the device
    padded_share, equal_shares   a rank's share of an evaluation set (all of it / a truncated equal part)
    report_skipped the samples every rank skipped mid-run (skip_bad), summed over ranks, logged once
    finish         the end of a torchrun process group
"""
import functools
import json
import math
import os
import sys
from collections import Counter, namedtuple
from contextlib import nullcontext

import torch

import data as D
import model as M
from configurator import ConfigError

Run = namedtuple("Run", "dist device ptdtype autocast log")


def setup(seed, device="auto", dtype="auto", training=True):
    """torchrun-aware init; dtype 'auto' = bfloat16 autocast on CUDA, float32 on CPU. float16 only
    for inference (training=False): fp16 training needs a loss scaler, which these loops do without."""
    dist = M.init_distributed(seed, None if device == "auto" else device)
    if dtype == "auto":
        dtype = "bfloat16" if dist.device.type == "cuda" else "float32"
    if dtype == "float16" and training:
        raise ConfigError("dtype='float16' trains without a loss scaler: small gradients flush to zero. "
                          "Use bfloat16 (same memory, fp32's range) or float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16{'' if training else ' or float16'}, got {dtype!r}")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = torch.autocast(dist.device.type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Run(dist, dist.device, ptdtype, autocast, print if dist.master else (lambda *a, **k: None))


def resume_point(init_from, out_dir):
    """(train state or None, the model the run started from): init_from='resume' continues out_dir's
    checkpoint, whose saved config names where the run began (a checkpoint, 'parts', ...; LoRA and
    DPO's reference rebuild from it); any other init_from is itself the start."""
    if init_from != "resume":
        return None, init_from
    state = M.load_train_state(out_dir)
    return state, json.loads(state["config"])["init_from"]


def build(load, run, distributed="ddp"):
    """The starting model, as load() reads it (weights, tokenizer, image processor). Under FSDP2 only
    rank 0 calls load(): at 7B each rank reading the checkpoint would hold its own 14-28 GB copy in
    host memory (8 per node) only to keep 1/8 of it after sharding. The other ranks get rank 0's
    config, tokenizer and image processor and build the same modules on the meta device (shapes and
    dtypes, no storage); shard() then fills every rank's shards from rank 0's weights."""
    if not (run.dist.ddp and distributed == "fsdp"):
        return load()
    vlm = load() if run.dist.master else None
    got = [(vlm.config, vlm.tokenizer, vlm.image_processor) if vlm is not None else None]
    torch.distributed.broadcast_object_list(got, src=0)
    if vlm is None:
        config, tokenizer, image_processor = got[0]
        with torch.device("meta"):
            vlm = M.VLM(config)
        vlm.tokenizer, vlm.image_processor = tokenizer, image_processor
    return vlm


def on_meta(vlm):
    """True on the ranks build() gave a model without storage (nothing to read into it yet)."""
    return any(p.is_meta for p in vlm.parameters())


def master_weights(vlm, run):
    """Trainable parameters (hence AdamW's state) in fp32, frozen ones in the run's compute dtype.
    Checkpoints come in fp16 (Vicuna, llava-hf; transformers loads them as stored): trained in fp16
    with no loss scaler, updates below fp16's resolution vanish and small gradients flush to zero.
    Frozen parts only feed autocast's matmuls, so bf16 on a GPU halves their memory for free.
    Call after set_trainable (and add_lora), before wrap."""
    for p in vlm.parameters():
        want = torch.float32 if p.requires_grad else run.ptdtype
        if p.is_floating_point() and p.dtype != want:
            p.data = p.data.to(want)
    return vlm


def wrap(vlm, run, distributed="ddp", compile=False):
    """(model to call in the loop, raw module, fsdp?, autocast to use). FSDP2 (distributed='fsdp'
    under torchrun) casts parameters to the run's dtype itself, so it needs no autocast. Call after
    set_trainable and before building the optimizer (FSDP replaces parameters with sharded ones).
    The model comes in on the CPU (or the meta device, see build) and leaves on the run's device."""
    fsdp = run.dist.ddp and distributed == "fsdp"
    autocast = run.autocast
    if fsdp:
        shard(vlm, run)
        autocast = nullcontext()
    else:
        vlm.to(run.device)
    model = torch.compile(vlm) if compile else vlm
    if run.dist.ddp and not fsdp:
        dev = run.device
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[run.dist.local_rank] if dev.type == "cuda" else None)
    return model, vlm, fsdp, autocast


def shard(vlm, run):
    """FSDP2-shard vlm (model.shard_fsdp) and fill every rank's shards from rank 0's weights. Sharding
    a model that is still on the CPU moves it to the GPU one block at a time (fully_shard moves a
    group's parameters, then keeps this rank's slice), so no GPU ever holds the whole model; the ranks
    that built it on the meta device get storage for their slices, which torch.distributed.checkpoint's
    set_model_state_dict fills from rank 0's full state dict one tensor at a time. Buffers (rotary
    tables, position ids: not sharded, and not all in the state dict) are rank 0's too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    master = run.dist.master
    full = vlm.state_dict() if master else {}  # before sharding: rank 0's tensors, whole
    buffers = [{n: b.cpu() for n, b in vlm.named_buffers()} if master else None]
    M.shard_fsdp(vlm, run.ptdtype if run.ptdtype != torch.float32 else None)
    if on_meta(vlm):
        vlm.to_empty(device=run.device)
    set_model_state_dict(vlm, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    torch.distributed.broadcast_object_list(buffers, src=0)
    if not master:
        for name, b in buffers[0].items():
            owner, _, attr = name.rpartition(".")
            setattr(vlm.get_submodule(owner), attr, b.to(run.device))
    return vlm


def grad_sync(model, raw, run, fsdp, on):
    """Context for one micro-batch: all-reduce gradients only on a step's last one (on=True)."""
    if fsdp:
        raw.set_requires_gradient_sync(on)
        return nullcontext()
    return model.no_sync() if (run.dist.ddp and not on) else nullcontext()


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


def add_lora(vlm, r, alpha, dropout, targets, resume_state, out_dir, log):
    """LoRA adapters on the LM's projections (model.add_lora). Resuming (resume_state given), vlm must
    be the run's starting model: the adapted layers keep its weights and get the saved adapters back,
    every other weight (a trained projector) comes from out_dir's checkpoint, which holds them merged."""
    names = M.add_lora(vlm, r, alpha, dropout, targets)
    log(f"LoRA r {r}, alpha {alpha} on {len(names)} layers ({names[0]}, ...)")
    if resume_state and not on_meta(vlm):  # (on the meta device nothing is read: shard() fills it from rank 0)
        saved = M.VLM.from_pretrained(out_dir).state_dict()
        adapted = {n + suffix for n in names for suffix in (".weight", ".bias")}
        vlm.load_state_dict({k: v for k, v in saved.items() if k not in adapted}, strict=False)
        M.load_lora_state_dict(vlm, resume_state["lora"])
        log(f"resuming LoRA from {out_dir} at step {resume_state['step']}")
    return names


def lora_merged(sd):
    """save()'s model_state for LoRA: the model directory gets the merged weights (loadable by anything,
    the next stage's start), train_state.pt the adapters apart (for an exact resume)."""
    sd, adapters = M.merge_lora_state_dict(sd)
    return sd, {"lora": adapters}


def clip_grad(params, max_norm):
    """Clip the gradients' global norm to max_norm (0 = no clipping) and return the norm before, as a
    float (inf / nan when a gradient overflowed): logged, it is the first sign of a bad step. Under
    FSDP2 the norm is a DTensor over the shards: its full value is gathered."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def save(out_dir, raw, optimizer, run, fsdp, state, model_state=None):
    """Checkpoint: the model directory (loadable on its own) + train_state.pt, swapped in atomically.
    model_state: a function of the full state dict giving (state dict to save, extra train state),
    e.g. LoRA adapters merged for the model directory, kept apart for resuming.
    Under FSDP (a collective: every rank calls this) the optimizer state is written sharded, see save_sharded."""
    if fsdp:
        return save_sharded(out_dir, raw, optimizer, run, state, model_state)
    if not run.dist.master:
        return
    msd, extra = model_state(raw.state_dict()) if model_state else (None, {})
    M.save_checkpoint(out_dir, raw, optimizer.state_dict(), dict(state, **extra), model_state=msd)


def save_sharded(out_dir, raw, optimizer, run, state, model_state=None):
    """FSDP2: each rank writes its own shards of AdamW's state (2x the model in fp32: ~56 GB at 7B)
    with torch.distributed.checkpoint into <checkpoint>/sharded, in parallel, instead of gathering
    them onto rank 0 while the others wait; the model, gathered once, goes into the usual
    model.safetensors (what evaluate.py, the next stage and a resume load). One atomic swap for all."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    # DTensors: this rank's shards (get_optimizer_state_dict on its own raised KeyError 0 here, torch 2.13)
    osd = get_state_dict(raw, optimizer)[1]
    full = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    master = run.dist.master
    with (M.atomic_dir(out_dir) if master else nullcontext(M.partial_dir(out_dir))) as tmp:
        torch.distributed.barrier()  # the master has made the directory
        dcp.save({"optimizer": osd}, checkpoint_id=os.path.join(tmp, "sharded"))
        if master:
            msd, extra = model_state(full) if model_state else (full, {})
            M.write_checkpoint(tmp, raw, "sharded", dict(state, **extra), model_state=msd)
        torch.distributed.barrier()  # every rank's shards are written before the master swaps the directory in
    torch.distributed.barrier()


def recover(out_dir, run):
    """Put out_dir back to one whole checkpoint if a kill interrupted its last write (model.recover_dir:
    the new one if it was complete, else the old one; stale temporaries removed). The master does it,
    the other ranks wait, so no rank reads the directory mid-rename."""
    if run.dist.master and (did := M.recover_dir(out_dir)):
        run.log(f"{out_dir}: a kill interrupted the last checkpoint write: {'; '.join(did)}")
    if run.dist.ddp:
        torch.distributed.barrier()


def resume(optimizer, raw, fsdp, resume_state, out_dir):
    """Optimizer state and RNG from a checkpoint's train state; returns the step to start from. A
    sharded checkpoint (FSDP2) is read with torch.distributed.checkpoint: each rank reads only its own
    shards of AdamW's state, on any number of ranks. (The model came from the checkpoint's
    model.safetensors, read by rank 0 alone: build / shard.)"""
    if resume_state is None:
        return 0
    if resume_state["optimizer"] == "sharded":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        sd = {"optimizer": get_optimizer_state_dict(raw, optimizer)}
        dcp.load(sd, checkpoint_id=os.path.join(out_dir, "sharded"))  # fills this rank's shards in place
        set_optimizer_state_dict(raw, optimizer, sd["optimizer"])
    elif fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(raw, optimizer, resume_state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(resume_state["optimizer"])
    M.restore_rng(resume_state)
    return resume_state["step"]


def _row_step(line):
    """A log row's step; None for a line a kill cut short (it goes with the lost steps)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return None


class JsonLog:
    """out_dir/log.jsonl, one JSON object per event (the run's numbers in a form a script can compare);
    a fresh run starts a fresh log, a resumed one appends. wandb (off by default) gets the same rows.
    resume_step: the step the resumed checkpoint holds. Rows after it were logged by work a kill lost
    (the run is redoing those steps), so they are dropped: every step appears once, as the checkpoint's run."""

    def __init__(self, out_dir, master, fresh, wandb_config=None, resume_step=None):
        self.path, self.master, self.wandb = os.path.join(out_dir, "log.jsonl"), master, None
        if master and fresh and os.path.exists(self.path):
            os.remove(self.path)
        if master and not fresh and resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.read().splitlines()
            kept = [ln for ln in lines if (s := _row_step(ln)) is not None and s <= resume_step]
            if len(kept) < len(lines):
                D.write_atomic(self.path, "".join(ln + "\n" for ln in kept))
        if master and wandb_config is not None:
            import wandb
            wandb.init(**wandb_config)
            self.wandb = wandb

    def __call__(self, step, to_wandb=True, **row):
        if not self.master:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(step=step, **row)) + "\n")
        if self.wandb is not None and to_wandb:
            self.wandb.log(row, step=step)


def padded_share(indices, dist):
    """(this rank's share of indices, how many of them are real): every index goes to exactly one
    rank, and the list is padded with repeats to a multiple of the world size, so every rank runs the
    same number of forwards (FSDP needs it); the repeats are at the end of a share, to be dropped."""
    padded = indices + indices[:(-len(indices)) % dist.world_size]
    return padded[dist.rank::dist.world_size], len(range(dist.rank, len(indices), dist.world_size))


def equal_shares(indices, dist):
    """This rank's share of an evaluation set, every rank the same count (FSDP ranks must run the same forwards)."""
    indices = indices[:len(indices) - len(indices) % dist.world_size]
    return indices[dist.rank::dist.world_size]


def report_skipped(counts, run, log_json, step, what="samples"):
    """The samples skipped during training (skip_bad: images that failed only when decoded), summed
    over ranks (a collective: every rank calls it), on the console and in the log. A sample is counted
    each time it is drawn."""
    if run.dist.ddp:
        parts = [None] * run.dist.world_size
        torch.distributed.all_gather_object(parts, dict(counts))
        counts = sum((Counter(p) for p in parts), Counter())
    if counts:
        run.log(f"skipped {sum(counts.values())} more {what} during training (images that failed to decode; "
                f"counted each time one was drawn): {dict(counts)}")
        log_json(step, skipped_mid_run=dict(counts))


def finish(run):
    """End a torchrun process group: all ranks meet first, so none tears its connections down while
    another is still writing the checkpoint (gloo aborted a rank at exit that way: 'terminate called
    without an active exception'). Then the process leaves at once (os._exit): even after the barrier
    and destroy_process_group, gloo still aborted a rank while the interpreter tore itself down, after
    all its work was written (2 of 3 fresh-clone CI runs of the 2-rank bf16 FSDP test, 2026-12-04/06).
    By then everything a stage writes is on disk (atomic files, the JSON log line by line); wandb, when
    on, is finished first. Call it last."""
    if run.dist.ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if (wandb := sys.modules.get("wandb")) is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def loader(ds, batch_sampler, collate, pad_id, num_workers, device):
    """Batches of ds for a sampler of index lists, collated by collate(samples, pad_id). A partial,
    not a lambda: workers started with 'spawn' (macOS, Windows) must pickle it."""
    return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, num_workers=num_workers,
                                       collate_fn=functools.partial(collate, pad_id=pad_id),
                                       pin_memory=device.type == "cuda")


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
