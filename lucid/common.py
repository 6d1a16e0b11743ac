"""
The machinery every stage script shares, as small functions: each script keeps its own loop, top to
bottom (as nanochat's chat_sft.py and chat_rl.py share common.py and checkpoint_manager.py).

    init_distributed, setup   torchrun-aware init, device, precision (autocast), TF32, a master-only print
    build                     the starting model; under FSDP2 only rank 0 reads its weights, the others
                              build it on the meta device (no memory)
    master_weights            trainable parameters in fp32, frozen ones in the compute dtype
    on_meta                   whether build() gave this rank a model without storage
    wrap, shard, shard_fsdp   FSDP2 sharding (every rank's shards filled from rank 0) or DDP, optional
                              torch.compile; returns the model to call, the raw module, fsdp?, the autocast
    grad_sync                 the context that all-reduces gradients only on a step's last micro-batch
    all_reduce_sum            a sum over ranks (identity in one process)
    loader, to_device         the DataLoader over a batch sampler, and a batch moved to the device
    padded_share, equal_shares   a rank's share of an evaluation set (all of it / a truncated equal part)
    report_skipped            the samples every rank skipped mid-run (skip_bad), summed over ranks, logged once
    finish                    the end of a torchrun process group
Checkpoints and resume are lucid/checkpoint.py's; the optimizer and schedule lucid/optim.py's; LoRA
lucid/lora.py's.
"""
import functools
import os
import sys
from collections import Counter, namedtuple
from contextlib import nullcontext

import torch

import model as M
from configurator import ConfigError

Dist = namedtuple("Dist", "rank local_rank world_size device master ddp")


def init_distributed(seed=1337, device=None):
    """Reads torchrun's env vars; DDP with nccl on CUDA, gloo on CPU. Seeds every rank identically
    (the model init must match; DDP also broadcasts rank 0's weights). Without torchrun: one process."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    cuda = torch.cuda.is_available() and device != "cpu"
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
        dev = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    else:
        rank, local_rank, world = 0, 0, 1
        dev = torch.device(device or ("cuda" if cuda else "cpu"))
    torch.manual_seed(seed)
    return Dist(rank, local_rank, world, dev, rank == 0, ddp)


def all_reduce_sum(x, dist):
    """Sum a tensor (or number) over ranks; identity in a single process."""
    x = torch.as_tensor(x, dtype=torch.float64, device=dist.device if dist.device.type == "cuda" else "cpu")
    if dist.ddp:
        torch.distributed.all_reduce(x)
    return x


Run = namedtuple("Run", "dist device ptdtype autocast log")


def setup(seed, device="auto", dtype="auto", training=True):
    """torchrun-aware init; dtype 'auto' = bfloat16 autocast on CUDA, float32 on CPU. float16 only
    for inference (training=False): fp16 training needs a loss scaler, which these loops do without."""
    dist = init_distributed(seed, None if device == "auto" else device)
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
    Call after set_trainable (and lora.add_adapters), before wrap."""
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


def shard_fsdp(vlm, param_dtype=None):
    """FSDP2: every transformer block of the vision tower and the LM is its own shard group, the rest
    (embeddings, projector, head) the root's. Parameters, gradients and optimizer state are split
    over ranks, so 7B full fine-tuning fits 8 x 80 GB. The root group is gathered for the whole
    forward, which is what lets forward() use the output weight directly in the fused loss.
    generate and token_logprobs bypass forward(), so they are registered to gather the root too."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for m in list(vlm.modules()):
        if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer")):
            fully_shard(m, mp_policy=mp)
    fully_shard(vlm, mp_policy=mp)
    for method in ("generate", "token_logprobs"):
        register_fsdp_forward_method(vlm, method)
    vlm.sharded = True
    return vlm


def shard(vlm, run):
    """FSDP2-shard vlm (shard_fsdp) and fill every rank's shards from rank 0's weights. Sharding
    a model that is still on the CPU moves it to the GPU one block at a time (fully_shard moves a
    group's parameters, then keeps this rank's slice), so no GPU ever holds the whole model; the ranks
    that built it on the meta device get storage for their slices, which torch.distributed.checkpoint's
    set_model_state_dict fills from rank 0's full state dict one tensor at a time. Buffers (rotary
    tables, position ids: not sharded, and not all in the state dict) are rank 0's too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    master = run.dist.master
    full = vlm.state_dict() if master else {}  # before sharding: rank 0's tensors, whole
    buffers = [{n: b.cpu() for n, b in vlm.named_buffers()} if master else None]
    shard_fsdp(vlm, run.ptdtype if run.ptdtype != torch.float32 else None)
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


def loader(ds, batch_sampler, collate, pad_id, num_workers, device):
    """Batches of ds for a sampler of index lists, collated by collate(samples, pad_id). A partial,
    not a lambda: workers started with 'spawn' (macOS, Windows) must pickle it."""
    return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, num_workers=num_workers,
                                       collate_fn=functools.partial(collate, pad_id=pad_id),
                                       pin_memory=device.type == "cuda")


def to_device(batch, device):
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


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


def finish(dist):
    """End a torchrun process group: all ranks meet first, so none tears its connections down while
    another is still writing the checkpoint (gloo aborted a rank at exit that way: 'terminate called
    without an active exception'). Then the process leaves at once (os._exit): even after the barrier
    and destroy_process_group, gloo still aborted a rank while the interpreter tore itself down, after
    all its work was written (2 of 3 fresh-clone CI runs of the 2-rank bf16 FSDP test, 2026-12-04/06).
    By then everything a stage writes is on disk (atomic files, the JSON log line by line); wandb, when
    on, is finished first. Call it last (every torchrun script: sft, dpo, selfreward, evaluate; evaluate.py
    too aborted a rank at exit under load, 2026-12-07, with destroy_process_group alone)."""
    if dist.ddp:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        if (wandb := sys.modules.get("wandb")) is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
