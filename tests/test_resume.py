"""Resume is exact when training draws random numbers, and a kill leaves nothing behind.

A resumed run restores the RNG right before its first step (checkpoint.restore_rng), so every step draws
what it drew in the uninterrupted run: with LoRA dropout and the LM's own attention dropout on, stopped
and resumed equals uninterrupted bitwise (losses, weights, optimizer state), for sft.py and dpo.py, in one
process and on 2 ranks. And a kill at any filesystem step of the resumed log's rewrite leaves no
temporary file once the next run has recovered: each step is logged once."""
import json
import os
import shutil
import tempfile

import pytest
import torch
from safetensors.torch import load_file

import data as D
from conftest import Killed, Killer, run_script, tiny_world_vlm
from lucid import checkpoint


@pytest.fixture(scope="module")
def dropout_start(shapes, tmp_path_factory):
    """A tiny chat-template VLM whose LM has attention dropout 0.1, saved as a checkpoint."""
    d = os.path.dirname(shapes[0].split("=", 1)[1])
    start = str(tmp_path_factory.mktemp("dropout") / "start")
    tiny_world_vlm(d, lm_dropout=0.1).save_pretrained(start)
    return d, start


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def optimizer_tensors(out):
    state = torch.load(os.path.join(out, "train_state.pt"), map_location="cpu", weights_only=True)["optimizer"]["state"]
    return {(i, k): v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}


@pytest.mark.slow
@pytest.mark.parametrize("script,nproc", [("sft.py", 1), ("sft.py", 2), ("dpo.py", 1), ("dpo.py", 2)])
def test_resume_with_dropout_equals_the_uninterrupted_run(dropout_start, tmp_path, script, nproc):
    d, start = dropout_start
    data = ([f"--data_path={d}/train.json", f"--val_data_path={d}/val.json", "--max_len=256", "--eval_batches=2"]
            if script == "sft.py" else [f"--data_path={d}/pairs.json", f"--val_data_path={d}/pairs_val.json", "--eval_pairs=16"])
    common = data + [f"--init_from={start}", f"--image_root={d}/images", "--device=cpu", "--dtype=float32",
                     "--num_workers=1", "--lora_r=4", "--lora_alpha=8", "--lora_dropout=0.1", "--lr_lm=1e-2",
                     "--lr_projector=1e-3", "--max_steps=4", "--global_batch_size=8", "--micro_batch_size=4",
                     "--eval_interval=2"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_script(script, common + [f"--out_dir={full}"], nproc)
    run_script(script, common + [f"--out_dir={part}", "--stop_at_step=2"], nproc)
    run_script(script, common + [f"--out_dir={part}", "--init_from=resume"], nproc)
    a = {r["step"]: r["loss"] for r in read_log(full) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_log(part) if "loss" in r}
    assert sorted(b) == [1, 2, 3, 4] and b == a, (a, b)  # every step once, each loss the uninterrupted one
    wa, wb = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(part, "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = optimizer_tensors(full), optimizer_tensors(part)
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


def test_kill_during_the_log_clean_up_leaves_no_temporary(tmp_path, monkeypatch):
    """A resumed run drops the log rows after its checkpoint's step by rewriting log.jsonl (write_atomic:
    a temporary, its permissions, the rename). Killed at each of those steps, then the next run: recovery
    removes the temporary, the rewrite happens, and every step is logged once. A checkpoint written into a
    directory that holds such a temporary does not carry it over."""
    rows = "".join(json.dumps(dict(step=s, loss=1.0 / s)) + "\n" for s in range(1, 7))  # the kill lost steps 4-6
    for k in range(1, 5):  # kill at the k-th operation (k = 4: no kill)
        run = tmp_path / f"kill{k}"
        run.mkdir()
        (run / "log.jsonl").write_text(rows)
        with monkeypatch.context() as m:  # write_atomic's steps; its clean-up (unlink) dies with the process
            Killer(m, k, ops=((tempfile, "mkstemp"), (os, "chmod"), (os, "replace")), after=((os, "unlink"),))
            try:
                checkpoint.JsonLog(str(run), master=True, fresh=False, resume_step=3)
            except Killed:
                pass
        leftovers = [f for f in os.listdir(run) if D.atomic_temporary(f)]
        assert len(leftovers) == (1 if k in (2, 3) else 0), (k, leftovers)  # made, not yet renamed
        # the next run: recovery, then the log's rewrite, then steps 4-6 again
        did = checkpoint.recover_dir(str(run))
        assert ("removed 1 temporary file of interrupted writes" in did) == (k in (2, 3)), did
        log = checkpoint.JsonLog(str(run), master=True, fresh=False, resume_step=3)
        for s in range(4, 7):
            log(s, loss=1.0 / s)
        assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5, 6], k
        assert sorted(os.listdir(run)) == ["log.jsonl"], k

    # a checkpoint swap into a directory holding a temporary (an older run's, with write_atomic's old name too)
    run = tmp_path / "swap"
    run.mkdir()
    (run / "log.jsonl").write_text(rows)
    (run / ".log.jsonl.k3j_9x2a.tmp").write_text("half a log")
    (run / "eval").mkdir()
    (run / "eval" / ".metrics.json.ab12cd34").write_text("{")
    with checkpoint.atomic_dir(str(run)) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("{}")
    assert sorted(os.listdir(run)) == ["config.json", "eval", "log.jsonl"] and os.listdir(run / "eval") == []
    shutil.rmtree(run)
