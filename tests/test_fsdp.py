"""FSDP2 paths no training loop in test_train.py reaches, on 2 gloo processes: every collective must be
run by every rank, so a rank whose micro-batch is text-only (no vision all-gathers) or whose generation
ends first (fewer LM all-gathers) would leave the other waiting forever. Each rank's results must equal
one unsharded process's on the same inputs.

Run by the test below under torchrun; `python tests/test_fsdp.py OUT` is the worker."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import make_tokenizer, run_script, tiny_configs  # noqa: E402
import model as M  # noqa: E402


def tiny_vlm():
    tok = make_tokenizer()
    v, t = tiny_configs(vocab_size=len(tok))
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


def test_fsdp_text_only_rank_and_uneven_generation_match_one_process(tmp_path):
    run_script("tests/test_fsdp.py", [str(tmp_path)], nproc=2, timeout=300)  # a hang fails here, by the timeout
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        want = results(tiny_vlm(), rank)
        assert got["lengths"].tolist() == ([1, 1] if rank == 0 else [5, 5])
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"rank {rank}, {k}: {m}")


if __name__ == "__main__":
    import torch.distributed as dist
    dist.init_process_group("gloo")
    vlm = M.shard_fsdp(tiny_vlm())
    torch.save(results(vlm, dist.get_rank()), os.path.join(sys.argv[1], f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
