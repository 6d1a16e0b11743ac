"""What every rank must do together, on 2 gloo processes, in paths the training-loop tests
(test_train.py) do not reach. Under FSDP2 every collective must be run by every rank, so a rank whose
micro-batch is text-only (no vision all-gathers) or whose generation ends first (fewer LM all-gathers)
would leave the other waiting forever; each rank's results must equal one unsharded process's on the
same inputs. Data validation is split over the ranks and gathered: both must end with the verdicts of
one process (the same good records, skip counts and first error), or they disagree on the steps.
Only rank 0 reads the model; rank 1 builds it on the meta device and is sent its shards.

Run by the test below under torchrun; `python tests/test_distributed.py OUT` is the worker."""
import json
import os
import pathlib
import sys
import warnings

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import make_tokenizer, run_script, tiny_configs  # noqa: E402
import data as D  # noqa: E402
import model as M  # noqa: E402


def tiny_vlm():
    tok = make_tokenizer()
    v, t = tiny_configs(vocab_size=len(tok), tie=True)  # tied, as the shapes LM: the meta-device build must keep the tie
    torch.manual_seed(0)
    return M.VLM.from_parts(lm=t, vision=v, tokenizer=tok)


def inputs(vlm, rank):
    """Rank 0: two rows with an image each; rank 1: two text-only rows (no pixel_values at all)."""
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(5, 100, (2, 30), generator=g)  # 0-4 are the specials, <image> among them
    px = None
    if rank == 0:
        ids[:, 1:1 + vlm.num_image_tokens] = vlm.image_token_id
        px = torch.randn(2, 3, 32, 32, generator=g)
    labels = ids.clone()
    labels[:, :20] = M.IGNORE_INDEX
    return ids, px, labels


def results(vlm, rank):
    """What each rank computes: eval loss, token log-probs, a generation (rank 0 stops at its first
    token, rank 1 runs to max_new_tokens), and a training step's loss with vision and projector frozen."""
    ids, px, labels = inputs(vlm, rank)
    vlm.eval()
    with torch.no_grad():  # generate and token_logprobs first: before any forward() the root is still sharded
        stops = range(vlm.lm.config.vocab_size) if rank == 0 else ()
        gen = vlm.generate(ids[:, :22], px, max_new_tokens=5, eos_token_id=[], stop_token_ids=stops)
        out = dict(tokens=gen.tokens, lengths=gen.lengths, logprobs=vlm.token_logprobs(ids, px, None, labels),
                   loss=vlm(ids, px, None, labels, reduction="sum"))
    vlm.train()
    for p in [*vlm.vision.parameters(), *vlm.projector.parameters()]:
        p.requires_grad_(False)
    loss = vlm(ids, px, None, labels)
    loss.backward()
    out["train_loss"] = loss.detach()
    return out


def write_records(d):
    """Eight records with an image each: record 3's is missing (rank 1 checks it), 5's truncated."""
    os.makedirs(d / "images", exist_ok=True)
    recs = []
    for i in range(8):
        recs.append(dict(id=f"q{i}", image=f"{i}.png", conversations=[{"from": "human", "value": "<image>\nWhat?"},
                                                                      {"from": "gpt", "value": "A circle."}]))
        if i != 3:
            Image.effect_noise((32, 32), 40).convert("RGB").save(d / "images" / f"{i}.png")
    data = open(d / "images" / "5.png", "rb").read()
    open(d / "images" / "5.png", "wb").write(data[:len(data) // 2])
    with open(d / "data.json", "w") as f:
        json.dump(recs, f)


def verdicts(vlm, d, rank, world_size):
    """validate()'s outcome per mode: (good indices, skip counts, lengths) with skip_bad, the error without."""
    out = {}
    for mode in (True, "full"):
        for skip in (True, False):
            ds = D.SFTDataset(D.load_records(str(d / "data.json"), str(d / "images")), vlm.tokenizer, vlm.image_processor,
                              "vicuna_v1", vlm.image_token_id, vlm.num_image_tokens, str(d / "images"), max_len=200,
                              skip_bad=skip)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    out[mode, skip] = (ds.validate(mode, rank, world_size), dict(ds.skipped), sorted(ds.lengths.items()))
                except D.DataError as e:
                    out[mode, skip] = str(e)
    return out


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    write_records(tmp_path)
    run_script("tests/test_distributed.py", [str(tmp_path)], nproc=2, timeout=300)  # a hang fails here, by the timeout
    one = verdicts(tiny_vlm(), tmp_path, 0, 1)
    assert one[True, True][:2] == ([0, 1, 2, 4, 5, 6, 7], {"missing image": 1})
    assert one["full", True][:2] == ([0, 1, 2, 4, 6, 7], {"missing image": 1, "corrupt image": 1})
    assert "record 3" in one[True, False] and "image not found" in one[True, False]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got.pop("verdicts") == one  # rank 0 raises the error rank 1 found
        want = results(tiny_vlm(), rank)
        assert got["lengths"].tolist() == ([1, 1] if rank == 0 else [5, 5])
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"rank {rank}, {k}: {m}")


def rank0_only():
    """What lucid.common.build calls on rank 0 only: rank 1 builds on the meta device and gets its shards
    (and its rotary tables) from rank 0 in lucid.common.shard, so it must never read the weights."""
    assert int(os.environ["RANK"]) == 0, "rank 1 read the weights"
    return tiny_vlm()


if __name__ == "__main__":
    from lucid import common
    run = common.setup(1, "cpu")
    rank, d = run.dist.rank, pathlib.Path(sys.argv[1])
    vlm = common.build(rank0_only, run, "fsdp")
    checked = verdicts(vlm, d, rank, 2)
    assert common.on_meta(vlm) == (rank == 1)
    common.shard(vlm, run)
    assert vlm.lm.lm_head.weight is vlm.lm.model.embed_tokens.weight
    torch.save(dict(results(vlm, rank), verdicts=checked), d / f"rank{rank}.pt")
    common.finish(run.dist)  # barrier, destroy, leave without the interpreter teardown gloo aborts in
