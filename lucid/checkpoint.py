"""
Checkpoints: a model directory plus train_state.pt, written crash-safe, and exact resume.

    atomic_dir, recover_dir   write a directory beside the old one and swap it in; after a kill, finish
                              or undo the interrupted swap and delete interrupted writes' temporaries
                              (remove_temporaries; the steps are spelled out below)
    save_checkpoint           the model directory + train_state.pt (optimizer, step, RNG), one swap
                              (write_checkpoint writes the files; load_train_state reads train_state.pt)
    save / save_sharded       the same from a training loop (FSDP2: each rank writes its optimizer shards),
                              every rank's RNG state gathered in (rng_states)
    recover                   call before reading out_dir: puts back one whole checkpoint after a kill
    resume_point, resume      the train state of a resumed run; the optimizer restored from it
    restore_rng               each rank's RNG back, right before the resumed run's first step
    JsonLog                   one JSON line per event in out_dir/log.jsonl; a resumed run drops the rows
                              of the steps the kill lost, so each step is logged once
"""
import glob
import json
import os
import shutil
from contextlib import nullcontext

import torch

import data as D


# A checkpoint directory is swapped in whole, crash-safe at every instant (a kill -9 anywhere leaves one
# complete checkpoint, found by recover_dir):
#   1. recover_dir(path): finish or undo an earlier interrupted swap, remove stale temporaries
#   2. write everything into path.partial, fsync it          killed here: path is untouched, .partial is junk
#   3. rename path.partial -> path.new                       the commit: from now on the new checkpoint wins
#   4. move what others wrote into path (log.jsonl, eval/, a DPO reference cache) over to path.new (the
#      temporaries of write_atomic calls a kill interrupted are gone by then: step 1 deletes them)
#   5. rename path -> path.old, path.new -> path, delete path.old
# Steps 4-5 are redone from wherever they stopped (each move is a rename, and a rename is atomic).
# Weights and training state are never carried over from the old directory: a stale
# model.safetensors.index.json or train_state.pt beside new weights would load as a mixed model.
_OWNED = ("config.json", "train_state.pt", "model.safetensors.index.json")


def _owned(name):
    return name in _OWNED or name.endswith(".safetensors") or name.startswith("pytorch_model")


def _fsync(path):
    """Flush a file, or a directory's entries, to disk (a kill alone does not need it; a power cut does)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(path):
    """Delete the temporaries that write_atomic calls interrupted by a kill (after the temporary was made,
    before its rename) left anywhere under path: the resumed log's rewrite, evaluation files. Returns how
    many. recover_dir calls it, so a run's start and every checkpoint write (atomic_dir) clean up first."""
    n = 0
    for d, _, files in os.walk(path):
        for f in files:
            if D.atomic_temporary(f):
                os.remove(os.path.join(d, f))
                n += 1
    return n


def _finish_swap(path):
    new, old, parent = path + ".new", path + ".old", os.path.dirname(path)
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):  # keep what others wrote there
            if not _owned(name) and not os.path.exists(os.path.join(new, name)):
                os.replace(os.path.join(path, name), os.path.join(new, name))
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(new, path)
    _fsync(parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path):
    """Leave `path` as one complete directory after a write that a kill interrupted: a committed
    path.new is swapped in (the new checkpoint), a half-written path.partial deleted (the old one
    stays), a leftover path.old deleted (or put back if path itself is gone), the temporaries of interrupted
    write_atomic calls deleted. Returns what it did."""
    path = os.path.abspath(path)
    new, old, partial = path + ".new", path + ".old", path + ".partial"
    did = []
    if os.path.isdir(new):
        _finish_swap(path)
        did.append("finished an interrupted swap")
    if os.path.exists(partial):
        shutil.rmtree(partial)
        did.append("removed a half-written checkpoint")
    if os.path.isdir(old):
        if os.path.exists(path):
            shutil.rmtree(old)
            did.append("removed the previous checkpoint's leftovers")
        else:  # cannot happen with this swap (path goes aside only once .new exists); kept for safety
            os.replace(old, path)
            did.append("put the previous checkpoint back")
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):  # the temporaries of this code's earlier swap
        shutil.rmtree(stale, ignore_errors=True)
    if os.path.isdir(path) and (n := remove_temporaries(path)):
        did.append(f"removed {n} temporary file{'s' if n > 1 else ''} of interrupted writes")
    return did


def partial_dir(path):
    """Where atomic_dir(path) writes before the swap (other ranks write their shards there too)."""
    return os.path.abspath(path) + ".partial"


class atomic_dir:
    """with atomic_dir(path) as d: write the directory's files into d; on leaving the block they
    replace `path` as one crash-safe swap (the steps above). An exception inside the block leaves
    `path` as it was."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.partial = partial_dir(path)

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        recover_dir(self.path)
        os.makedirs(self.partial)
        return self.partial

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
            return False
        for d, _, files in os.walk(self.partial):
            for f in files:
                _fsync(os.path.join(d, f))
            _fsync(d)
        os.replace(self.partial, self.path + ".new")
        _finish_swap(self.path)
        return False


def save_checkpoint(path, vlm, optimizer_state, state, model_state=None):
    """The model directory (loadable on its own) plus train_state.pt: optimizer, step, RNG, data
    position, config. One atomic directory swap for both, so model and state never disagree.
    model_state: a full state dict gathered from FSDP shards (default: vlm's own)."""
    with atomic_dir(path) as tmp:
        write_checkpoint(tmp, vlm, optimizer_state, state, model_state)


def write_checkpoint(d, vlm, optimizer_state, state, model_state=None):
    """save_checkpoint's files, into directory d. optimizer_state 'sharded': it is in d/sharded."""
    train_state = dict(state, optimizer=optimizer_state, rng_cpu=torch.get_rng_state(),
                       rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    vlm._write(d, model_state)
    torch.save(train_state, os.path.join(d, "train_state.pt"))


def load_train_state(path):
    """train_state.pt with weights_only=True: tensors and plain containers only, nothing executable."""
    return torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=True, mmap=True)


def rng_states(run):
    """Every rank's RNG state (CPU, and its own CUDA device's), on every rank. The ranks draw different
    amounts (dropout over micro-batches of different lengths), so each must get its own back."""
    mine = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    if not run.dist.ddp:
        return [mine]
    got = [None] * run.dist.world_size
    torch.distributed.all_gather_object(got, mine)
    return got


def restore_rng(state, rank=0):
    """The RNG as the checkpoint's run had it after saving: call it right before a resumed run's first step,
    so each step draws what it drew in the run that was not interrupted (dropout, LoRA dropout). Called
    earlier, the data iterator's creation (a seed drawn for its workers) would put the run one draw ahead.
    Each rank gets its own state back (rng_ranks); a rank the saving run did not have (resumed on more
    ranks), or a checkpoint from before rng_ranks, gets rank 0's: the run goes on, not bitwise."""
    ranks = state.get("rng_ranks")
    if ranks and rank < len(ranks):
        torch.set_rng_state(ranks[rank]["cpu"])
        if torch.cuda.is_available() and ranks[rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ranks[rank]["cuda"])
        return
    torch.set_rng_state(state["rng_cpu"])
    if torch.cuda.is_available() and state.get("rng_cuda"):
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def resume_point(init_from, out_dir):
    """(train state or None, the model the run started from): init_from='resume' continues out_dir's
    checkpoint, whose saved config names where the run began (a checkpoint, 'parts', ...; LoRA and
    DPO's reference rebuild from it); any other init_from is itself the start."""
    if init_from != "resume":
        return None, init_from
    state = load_train_state(out_dir)
    return state, json.loads(state["config"])["init_from"]


def save(out_dir, raw, optimizer, run, fsdp, state, model_state=None):
    """Checkpoint: the model directory (loadable on its own) + train_state.pt, swapped in atomically.
    model_state: a function of the full state dict giving (state dict to save, extra train state),
    e.g. LoRA adapters merged for the model directory, kept apart for resuming.
    Under torchrun every rank calls this (a collective: every rank's RNG state is gathered into the train
    state; under FSDP the optimizer state is written sharded, see save_sharded)."""
    state = dict(state, rng_ranks=rng_states(run))
    if fsdp:
        return save_sharded(out_dir, raw, optimizer, run, state, model_state)
    if not run.dist.master:
        return
    msd, extra = model_state(raw.state_dict()) if model_state else (None, {})
    save_checkpoint(out_dir, raw, optimizer.state_dict(), dict(state, **extra), model_state=msd)


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
    with (atomic_dir(out_dir) if master else nullcontext(partial_dir(out_dir))) as tmp:
        torch.distributed.barrier()  # the master has made the directory
        dcp.save({"optimizer": osd}, checkpoint_id=os.path.join(tmp, "sharded"))
        if master:
            msd, extra = model_state(full) if model_state else (full, {})
            write_checkpoint(tmp, raw, "sharded", dict(state, **extra), model_state=msd)
        torch.distributed.barrier()  # every rank's shards are written before the master swaps the directory in
    torch.distributed.barrier()


def recover(out_dir, run):
    """Put out_dir back to one whole checkpoint if a kill interrupted its last write (recover_dir:
    the new one if it was complete, else the old one; stale temporaries removed). The master does it,
    the other ranks wait, so no rank reads the directory mid-rename."""
    if run.dist.master and (did := recover_dir(out_dir)):
        run.log(f"{out_dir}: a kill interrupted the last checkpoint write: {'; '.join(did)}")
    if run.dist.ddp:
        torch.distributed.barrier()


def resume(optimizer, raw, fsdp, resume_state, out_dir):
    """Optimizer state from a checkpoint's train state; returns the step to start from. A sharded
    checkpoint (FSDP2) is read with torch.distributed.checkpoint: each rank reads only its own shards of
    AdamW's state, on any number of ranks. (The model came from the checkpoint's model.safetensors, read
    by rank 0 alone: build / shard.) The RNG is restore_rng's, called right before the first step: what
    runs between (creating the data iterator draws a seed from the global RNG) must not move it."""
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
