"""Crash safety: a kill at any instant of a checkpoint write leaves one whole checkpoint (the old or the
new, with the run's log beside it), and sft.py killed with SIGKILL mid-checkpoint resumes to the weights
of an uninterrupted run."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lucid import checkpoint
import model as M
from conftest import ROOT, Killed, Killer, make_tokenizer, run_sft, tiny_configs


def tiny_vlm(seed):
    torch.manual_seed(seed)
    vision, text = tiny_configs()
    return M.VLM.from_parts(lm=text, vision=vision, tokenizer=make_tokenizer())


def test_kill_at_every_instant_of_a_checkpoint_write(tmp_path, monkeypatch):
    a, b = tiny_vlm(0), tiny_vlm(1)
    wa, wb = a.state_dict(), b.state_dict()
    path = str(tmp_path / "run")
    outcomes, k = [], 0
    while True:
        k += 1
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()
        checkpoint.save_checkpoint(path, a, {}, dict(step=1))  # checkpoint A, and what the run wrote beside it
        with open(os.path.join(path, "log.jsonl"), "w") as f:
            f.write('{"step": 1}\n')
        os.makedirs(os.path.join(path, "eval"))
        with open(os.path.join(path, "eval", "metrics.json"), "w") as f:
            f.write("{}")
        with monkeypatch.context() as mp:
            killer = Killer(mp, k)
            try:
                checkpoint.save_checkpoint(path, b, {}, dict(step=2))  # checkpoint B over it, killed at op k
                finished = True
            except Killed:
                finished = False
        # before any recovery, a reader (evaluate.py on this path) finds a whole checkpoint
        w = M.VLM.from_pretrained(path).state_dict()
        assert all(torch.equal(w[n], wa[n]) for n in w) or all(torch.equal(w[n], wb[n]) for n in w), k
        checkpoint.recover_dir(path)  # what the next run does first
        assert sorted(os.listdir(tmp_path)) == ["run"], (k, os.listdir(tmp_path))  # no stale temporaries
        w = M.VLM.from_pretrained(path).state_dict()
        step = checkpoint.load_train_state(path)["step"]
        want = wa if step == 1 else wb
        assert all(torch.equal(w[n], want[n]) for n in w), (k, step)  # weights and train state agree
        with open(os.path.join(path, "log.jsonl")) as f:
            assert f.read() == '{"step": 1}\n', k
        assert os.path.isfile(os.path.join(path, "eval", "metrics.json")), k
        outcomes.append(step)
        if finished:
            break
    assert killer.n == k - 1 and len(outcomes) > 10  # every operation of the save was a kill point
    assert outcomes[0] == 1 and outcomes[-1] == 2 and outcomes == sorted(outcomes)  # old until the commit, then new


def test_exception_while_writing_keeps_the_old_checkpoint(tmp_path):
    a = tiny_vlm(0)
    path = str(tmp_path / "ckpt")
    a.save_pretrained(path)
    with pytest.raises(RuntimeError, match="disk full"):
        with checkpoint.atomic_dir(path) as d:
            open(os.path.join(d, "config.json"), "w").close()
            raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    w = M.VLM.from_pretrained(path).state_dict()
    assert all(torch.equal(w[n], v) for n, v in a.state_dict().items())


def test_weights_are_never_carried_from_the_old_directory(tmp_path):
    """A sharded checkpoint's index left over beside new single-file weights would load the old shards."""
    path = str(tmp_path / "ckpt")
    tiny_vlm(0).save_pretrained(path)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {}}, f)
    open(os.path.join(path, "notes.txt"), "w").close()
    b = tiny_vlm(1)
    b.save_pretrained(path)
    assert sorted(os.listdir(path)).count("notes.txt") == 1
    assert not os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    w = M.VLM.from_pretrained(path).state_dict()
    assert all(torch.equal(w[n], v) for n, v in b.state_dict().items())


# ----------------------------------------------------------------------------- sft.py under kill -9

TINY = ["--init_from=scratch", "--n_layer=1", "--n_head=2", "--n_embd=32", "--max_len=256", "--eval_batches=2",
        "--num_workers=0", "--dtype=float32", "--device=cpu", "--max_steps=6", "--global_batch_size=8",
        "--micro_batch_size=4", "--eval_interval=2"]
# Runs sft.py with os.replace watched: SIGKILL at the chosen moment of the second checkpoint (step 4).
#   swap:  right after out_dir was renamed aside, before the new one is renamed in (out_dir is missing)
#   write: at the first fsync of the new checkpoint's files (half written)
KILL = """
import os, runpy, signal, sys
out, when = sys.argv[1], sys.argv[2]
real_replace, real_fsync, seen = os.replace, os.fsync, {"new": 0}
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def replace(src, dst):
    real_replace(src, dst)
    if dst == out + ".new":
        seen["new"] += 1
    if when == "swap" and dst == out + ".old" and seen["new"] == 2:
        die()
def fsync(fd):
    if when == "write" and os.path.exists(out + ".partial") and seen["new"] == 1 and os.listdir(out + ".partial"):
        die()
    real_fsync(fd)
os.replace, os.fsync = replace, fsync
sys.argv = ["sft.py"] + sys.argv[3:]
runpy.run_path("sft.py", run_name="__main__")
"""


def log_rows(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(shapes, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full") / "run")
    run_sft(shapes + TINY + [f"--out_dir={out}"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("when", ["swap", "write"])
def test_sft_killed_mid_checkpoint_resumes_to_the_same_weights(shapes, uninterrupted, tmp_path, when):
    import subprocess
    import sys
    out = str(tmp_path / "run")
    p = subprocess.run([sys.executable, "-c", KILL, out, when, *shapes, *TINY, f"--out_dir={out}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == -9, p.stderr[-2000:]  # it was killed, not finished
    assert os.path.exists(out) == (when == "write")  # 'swap': out_dir itself is gone
    r = run_sft(shapes + TINY + [f"--out_dir={out}", "--init_from=resume"])
    assert f"resuming from {out} at step {4 if when == 'swap' else 2}" in r.stdout
    assert "a kill interrupted the last checkpoint write: " + ("finished an interrupted swap" if when == "swap"
                                                              else "removed a half-written checkpoint") in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["run"]  # the temporaries are gone
    full, resumed = load_file(os.path.join(uninterrupted, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # every step logged once, with the uninterrupted run's losses (the lost steps' rows were dropped)
    a = [(r["step"], r["loss"]) for r in log_rows(uninterrupted) if "loss" in r]
    b = [(r["step"], r["loss"]) for r in log_rows(out) if "loss" in r]
    assert a == b
    if when == "swap":  # resuming a finished run says so and changes nothing
        r = run_sft(shapes + TINY + [f"--out_dir={out}", "--init_from=resume"])
        assert "already finished (6 of 6 steps); nothing to do" in r.stdout
        again = load_file(os.path.join(out, "model.safetensors"))
        assert all(torch.equal(again[k], resumed[k]) for k in full)
