"""sft.py end to end on a tiny shapes world: learning, exact resume, and 2-process torchrun == 1 process."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_sft as run

TINY = ["--init_from=scratch", "--n_layer=1", "--n_head=2", "--n_embd=32", "--max_len=256", "--eval_batches=2", "--num_workers=0",
        "--dtype=float32", "--device=cpu"]
# a vision tower from scratch and trained, so DDP / FSDP / resume cover all three parts
SCRATCH_VISION = ["--vision_path=None", "--vision_n_layer=2", "--vision_n_head=2", "--vision_n_embd=32", "--lr_vision=1e-3"]


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_resume_continues_exactly(shapes, tmp_path):
    common = shapes + TINY + SCRATCH_VISION + ["--max_steps=6", "--global_batch_size=8", "--micro_batch_size=4", "--eval_interval=3"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(common + [f"--out_dir={full}"])
    run(common + [f"--out_dir={part}", "--stop_at_step=3"])
    assert json.load(open(os.path.join(part, "config.json")))  # a loadable checkpoint after the interruption
    run(common + [f"--out_dir={part}", "--init_from=resume"])
    a = {r["step"]: r["loss"] for r in log(full) if "loss" in r}
    b = {r["step"]: r["loss"] for r in log(part) if "loss" in r}
    assert sorted(b) == list(range(1, 7))
    assert b[4] == a[4] and b[6] == a[6]  # the next-step loss after resuming is the uninterrupted one
    wa, wb = weights(full), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_torchrun_two_processes_match_one(shapes, tmp_path, distributed):
    """Same global batch: 1 process x 4 accumulation steps == 2 ranks x 2 (gloo on CPU), with length
    grouping. For FSDP2 the checkpoint is also gathered from the shards, and val loss runs sharded."""
    common = shapes + TINY + SCRATCH_VISION + ["--max_steps=3", "--global_batch_size=16", "--micro_batch_size=4",
                                               "--eval_interval=3", "--eval_batches=0", "--group_by_length=2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run(common + [f"--out_dir={one}"])
    run(common + [f"--out_dir={two}", f"--distributed={distributed}"], nproc=2)
    la, lb = [r for r in log(one) if "loss" in r], [r for r in log(two) if "loss" in r]
    assert len(la) == len(lb) == 3
    for ra, rb in zip(la, lb):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5 * max(1, ra["loss"])
        # the logged gradient norm is the global one (under FSDP gathered from the shards), not a rank's
        assert 0 < ra["grad_norm"] < float("inf") and abs(ra["grad_norm"] - rb["grad_norm"]) < 1e-4 * max(1, ra["grad_norm"])
    vals = [r["val_loss"] for r in log(two) if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0]
    wa, wb = weights(one), weights(two)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    # lr 1e-3: a mismatched gradient moves weights by ~1e-3. Not tighter: on AdamW's first step a gradient
    # that is 0 up to fp32 noise (a key bias) moves its weight by lr * noise / eps, machine-dependent
    assert worst < 1e-4, worst


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumes_exactly(shapes, tmp_path):
    """FSDP2 checkpoints the optimizer with torch.distributed.checkpoint (each rank its shards) beside a
    consolidated model.safetensors; stopped at step 3 and resumed on 2 ranks == 6 uninterrupted steps,
    and on 1 process (no FSDP) the sharded state reads back too."""
    common = shapes + TINY + SCRATCH_VISION + ["--max_steps=6", "--global_batch_size=8", "--micro_batch_size=4",
                                               "--eval_interval=3", "--eval_batches=0", "--distributed=fsdp"]
    full, part, one = (str(tmp_path / k) for k in ("full", "part", "one"))
    run(common + [f"--out_dir={full}"], nproc=2)
    run(common + [f"--out_dir={part}", "--stop_at_step=3"], nproc=2)
    state = torch.load(os.path.join(part, "train_state.pt"), weights_only=True)
    assert state["optimizer"] == "sharded" and os.path.isdir(os.path.join(part, "sharded"))
    shutil.copytree(part, one)
    run(common + [f"--out_dir={part}", "--init_from=resume"], nproc=2)
    a = {r["step"]: r["loss"] for r in log(full) if "loss" in r}
    b = {r["step"]: r["loss"] for r in log(part) if "loss" in r}
    assert sorted(b) == list(range(1, 7)) and b[4] == a[4] and b[6] == a[6]
    wa, wb = weights(full), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    run(common + [f"--out_dir={one}", "--init_from=resume"])  # 1 process: the shards read back as whole tensors
    c = {r["step"]: r["loss"] for r in log(one) if "loss" in r}
    assert abs(c[4] - a[4]) < 1e-5 * a[4] and abs(c[6] - a[6]) < 1e-4 * a[6]


@pytest.mark.slow
def test_fsdp_bf16_gradient_checkpointing_resumes_exactly(shapes, tmp_path):
    """The 7B recipe's settings on 2 gloo ranks: FSDP2 with bf16 compute (its mixed-precision policy:
    bf16 gathers, fp32 gradient reduction) and activation checkpointing; fp32 masters in the checkpoint;
    stopped and resumed == uninterrupted, and close to one process under bf16 autocast."""
    # the tower frozen, as in the recipe (trained in fp32 under CPU autocast, its LayerNorms would see bf16
    # inputs with fp32 weights, which CPU autocast, unlike CUDA's, does not cast)
    common = [a for a in shapes + TINY + SCRATCH_VISION if a not in ("--dtype=float32", "--lr_vision=1e-3")] + [
        "--dtype=bfloat16", "--gradient_checkpointing=True", "--max_steps=4", "--global_batch_size=8",
        "--micro_batch_size=4", "--eval_interval=2", "--eval_batches=0"]
    one, full, part = (str(tmp_path / k) for k in ("one", "full", "part"))
    run(common + [f"--out_dir={one}"])
    run(common + [f"--out_dir={full}", "--distributed=fsdp"], nproc=2)
    run(common + [f"--out_dir={part}", "--distributed=fsdp", "--stop_at_step=2"], nproc=2)
    run(common + [f"--out_dir={part}", "--distributed=fsdp", "--init_from=resume"], nproc=2)
    a, b, c = ({r["step"]: r["loss"] for r in log(o) if "loss" in r} for o in (full, part, one))
    assert sorted(b) == [1, 2, 3, 4] and b[3] == a[3] and b[4] == a[4]
    wa, wb = weights(full), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the trained LM and projector are the fp32 masters; the frozen tower was kept (and is saved) in bf16
    assert {(k.split(".")[0], v.dtype) for k, v in wa.items() if v.is_floating_point()} == {
        ("lm", torch.float32), ("projector", torch.float32), ("vision", torch.bfloat16)}
    # one process autocasts, FSDP2 casts the gathered parameters: both bf16 compute, not the same rounding
    assert all(abs(a[s] - c[s]) < 0.03 * c[s] for s in a), (a, c)


@pytest.mark.slow
def test_short_training_learns(shapes, tmp_path):
    out = str(tmp_path / "learn")
    run(shapes + TINY + ["--n_embd=64", "--max_steps=40", "--global_batch_size=16", "--micro_batch_size=16",
                         "--eval_interval=40", "--lr_lm=1e-2", "--lr_projector=1e-2", f"--out_dir={out}"])
    vals = [r["val_loss"] for r in log(out) if "val_loss" in r]
    assert vals[0] > 5.0 and vals[-1] < 0.5 * vals[0], vals


@pytest.mark.slow
def test_lora_sft_trains_adapters_only_and_resumes_exactly(shapes, tmp_path):
    """sft.py --lora_r: from a checkpoint, the LM's own weights stay as they were except the adapted
    projections (saved merged), the projector trains; stopped and resumed equals uninterrupted."""
    start = str(tmp_path / "start")
    run(shapes + TINY + ["--max_steps=2", "--global_batch_size=8", "--micro_batch_size=8", f"--out_dir={start}"])
    common = shapes + ["--max_len=256", "--eval_batches=2", "--dtype=float32", "--device=cpu", f"--init_from={start}",
                       "--lora_r=4", "--lora_alpha=8", "--lr_lm=1e-2", "--max_steps=6", "--global_batch_size=8",
                       "--micro_batch_size=4", "--eval_interval=3"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(common + [f"--out_dir={full}"])
    w0, w1 = weights(start), weights(full)
    adapted = [k for k in w0 if k.startswith("lm.") and k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))]
    assert adapted and all(not torch.equal(w0[k], w1[k]) for k in adapted)  # merged adapters moved them
    frozen = [k for k in w0 if k.startswith("lm.") and ("norm" in k or "embed_tokens" in k)]
    assert frozen and all(torch.equal(w0[k], w1[k]) for k in frozen)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if k.startswith("projector."))
    assert not any("lora_" in k for k in w1)  # the model directory holds plain (merged) weights
    run(common + [f"--out_dir={part}", "--stop_at_step=3"])
    run(common + [f"--out_dir={part}", "--init_from=resume"])
    wb = weights(part)
    assert all(torch.allclose(w1[k], wb[k], atol=1e-6) for k in w1)
