"""Calibrated self-rewarding: the scoring rules on hand-made trees, the diverse proposal against a
direct group beam search, batched trees == one prompt and one node at a time, and selfreward.py end
to end (pairs dpo.py reads, resume, torchrun, bad prompt files)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data as D
import model as M
from methods import csr as S
from conftest import ROOT, run_script, tiny_world_vlm

CLIP = os.path.join(ROOT, "shapes", "models", "clip")

# ----------------------------------------------------------------------------- the rules, by hand


def test_sibling_ranks_and_rewards_by_hand():
    assert S.sibling_ranks([0.2, 0.9, 0.5]) == pytest.approx([1.0, 1 / 3, 2 / 3])  # best gets 1/n
    assert S.sibling_ranks([1.0, 1.0]) == [0.5, 1.0]  # ties keep their order
    lm, clip = [-1.0, -0.5, -2.0], [30.0, 10.0, 20.0]
    # raw: 0.9 * clip + 0.1 * lm
    assert S.sentence_rewards(lm, clip, 0.9, "raw") == pytest.approx([26.9, 8.95, 17.8])
    # rank: lm ranks [2/3, 1/3, 1], clip ranks [1/3, 1, 2/3] -> -(0.9 rc + 0.1 rl)
    assert S.sentence_rewards(lm, clip, 0.9, "rank") == pytest.approx([-(0.3 + 0.2 / 3), -(0.9 + 0.1 / 3), -(0.6 + 0.1)])
    assert S.sentence_rewards(lm, clip, 0.0, "rank") == pytest.approx([-2 / 3, -1 / 3, -1.0])  # lambda 0: the LM alone


def hand_tree():
    """root -> a (lm -1, clip 30), b (lm -0.5, clip 10); a -> a1 (final), a2 (final); b -> b1 (final),
    b-end (end-of-sequence alone: b's response is complete)."""
    t = [S.root()]
    for parent, sentence, final, lm, clip in [(0, "A", False, -1.0, 30.0), (0, "B", False, -0.5, 10.0)]:
        t.append(S.new_node(parent, sentence, sentence, final, lm, clip))
    S.score_level(t, [1, 2], 0.5, "raw")
    for parent, sentence, final, lm, clip in [(1, "A1", True, -2.0, 20.0), (1, "A2", True, -1.0, 0.0),
                                              (2, "B1", True, -3.0, 40.0), (2, "", True, 0.0, None)]:
        t.append(S.new_node(parent, sentence, t[parent]["text"] + " " + sentence if sentence else t[parent]["text"],
                            final, lm, clip))
    S.score_level(t, [3, 4, 5, 6], 0.5, "raw")
    return t


def test_tree_scores_and_pair_by_hand():
    t = hand_tree()
    # raw, lambda 0.5: a 14.5, b 4.75; a1 9, a2 -0.5, b1 18.5; b-end: b's path and length
    assert [n["reward"] for n in t[1:]] == pytest.approx([14.5, 4.75, 9.0, -0.5, 18.5, 0.0])
    assert [n["length"] for n in t[1:]] == [1, 1, 2, 2, 2, 1]
    scores = [S.response_score(n) for n in t[3:]]
    assert scores == pytest.approx([23.5 / 2, 14.0 / 2, 23.25 / 2, 4.75])
    chosen, rejected, why = S.pick_pair(t)
    assert (chosen, rejected, why) == (3, 6, None)  # "A A1" best, "B" (ended after one sentence) worst
    # the released code's length counts the root: a1 23.5/3, a2 14/3, b1 23.25/3, b-end 4.75/2
    assert S.pick_pair(t, "nodes") == (3, 6, None)
    assert S.response_score(t[6], "nodes") == pytest.approx(4.75 / 2)
    assert S.response_score(t[0]) == -math.inf


def test_rank_tree_and_pruning_by_hand():
    t = [S.root()]
    for lm, clip in [(-1.0, 5.0), (-0.2, 1.0), (-0.5, 9.0), (-3.0, 2.0)]:
        t.append(S.new_node(0, f"s{len(t)}", f"s{len(t)}", False, lm, clip))
    S.score_level(t, [1, 2, 3, 4], 0.9, "rank")
    # lm ranks [3/4, 1/4, 2/4, 1], clip ranks [2/4, 4/4, 1/4, 3/4]
    assert [n["reward"] for n in t[1:]] == pytest.approx([-(0.45 + 0.075), -(0.9 + 0.025), -(0.225 + 0.05), -(0.675 + 0.1)])
    # by the LM alone: best s2 (-0.2), worst two s1 (-1) and s4 (-3); by reward: best s3, worst s4 and s2
    assert S.prune(t, [1, 2, 3, 4], 1, 2, "lm") == [2, 1, 4]
    assert S.prune(t, [1, 2, 3, 4], 1, 2, "reward") == [3, 4, 2]
    assert S.prune(t, [1, 2, 3], 1, 2, "lm") == [2, 3, 1]  # no more than keep_best + keep_worst: all, ranked
    assert S.prune(t, [1, 2, 3, 4], 2, 0, "lm") == [2, 3]


def test_repeated_proposals_count_as_copies_in_the_ranks():
    """A node whose K proposals are all one sentence: that sentence stands for K copies and takes their
    mean rank, 0.6 of 5 (the released code keeps the copies, ranked 1/5 .. 5/5), not the worst rank 1/1
    a lone node would get. Two copies beside a single sentence share ranks 1/3 and 2/3."""
    assert S.sibling_ranks([0.5], [5]) == pytest.approx([0.6])
    assert S.sibling_ranks([0.5]) == [1.0]
    assert S.sibling_ranks([0.9, 0.1], [2, 1]) == pytest.approx([0.5, 1.0])
    assert S.sibling_ranks([0.1, 0.9], [2, 1]) == pytest.approx([(2 / 3 + 1) / 2, 1 / 3])
    assert S.sentence_rewards([-1.0], [20.0], 0.9, "rank", [5]) == pytest.approx([-0.6])
    t = [S.root(), S.new_node(0, "A.", "A.", True, -1.0, 20.0)]
    t[1]["copies"] = 5
    S.score_level(t, [1], 0.9, "rank")
    assert t[1]["reward"] == pytest.approx(-0.6)


def test_tied_leaves_break_as_the_released_code_does():
    """With rank rewards, tied response scores are common: chosen is the first tied leaf in depth-first
    order, rejected the last (the released construct.py's path order), not the first / last node made."""
    t = [S.root()]
    for parent, sentence, final in [(0, "A.", False), (0, "B.", True), (1, "A1.", True), (1, "A2.", True)]:
        t.append(S.new_node(parent, sentence, (t[parent]["text"] + " " + sentence).strip(), final))
    for i, (path, length) in enumerate([(-1.0, 1), (-1.0, 1), (-2.0, 2), (-2.0, 2)], start=1):
        t[i].update(path=path, length=length)  # every leaf scores -1.0: all tied
    assert S.depth_first(t) == [0, 1, 3, 4, 2]
    assert S.pick_pair(t) == (3, 2, None)  # depth first: A A1, A A2, B; by creation it would be (2, 4)


def test_degenerate_trees_give_no_pair():
    t = [S.root(), S.new_node(0, "A", "A", True, -1.0, 3.0)]
    S.score_level(t, [1])
    assert S.pick_pair(t) == (None, None, "single leaf")
    t = [S.root(), S.new_node(0, "A", "A", False, -1.0, 3.0)]
    S.score_level(t, [1])
    t += [S.new_node(1, "", "A", True), S.new_node(1, "B.", "A B.", True, -1.0, 3.0)]
    t[2]["text"] = t[3]["text"] = "A B."  # two leaves that read the same
    S.score_level(t, [2, 3])
    assert S.pick_pair(t) == (None, None, "identical")


def test_search_settings_are_checked():
    with pytest.raises(ValueError, match="combine"):
        S.check_search({"combine": "mean"})
    with pytest.raises(ValueError, match="unknown"):
        S.check_search({"lambda": 0.5})
    with pytest.raises(ValueError, match="lam"):
        S.check_search({"lam": 1.5})

# ----------------------------------------------------------------------------- the search on a tiny model


@pytest.fixture(scope="module")
def world(shapes, tmp_path_factory):
    """The tiny shapes world, a tiny untrained chat-template VLM on its tokenizer, saved as a checkpoint."""
    d = os.path.dirname(shapes[0].split("=", 1)[1])
    vlm = tiny_world_vlm(d, max_positions=1024)
    with torch.no_grad():  # sharper next-token distributions (tied embeddings): no near-ties for argmax to flip on
        vlm.lm.get_input_embeddings().weight.mul_(4.0)
    ckpt = str(tmp_path_factory.mktemp("csr") / "base")
    vlm.save_pretrained(ckpt)
    return dict(dir=d, ckpt=ckpt, vlm=M.VLM.from_pretrained(ckpt).eval())


def prompt_batch(world, n=3):
    vlm = world["vlm"]
    prompts = D.load_prompts(f"{world['dir']}/prompts.json", f"{world['dir']}/images", n)
    ids = [D.build_prompt("<image>\n" + p["prompt"], vlm.tokenizer, "chat", vlm.image_token_id, vlm.num_image_tokens)
           for p in prompts]
    px = torch.stack([D.process_image(D.load_image(p["path"]), vlm.image_processor) for p in prompts])
    return prompts, ids, px


@torch.no_grad()
def group_beam_reference(vlm, ids, px, K, penalty, max_new, end_ids):
    """Group beam search with one beam per group, written out: no KV cache, no batching, every step a
    full forward per group over its whole sequence; each group's choice is penalised by the number of
    earlier groups that picked the same token at this step."""
    seqs, scores, done = [[] for _ in range(K)], [[] for _ in range(K)], [False] * K
    for _ in range(max_new):
        counts = torch.zeros(vlm.lm.config.vocab_size)
        for k in range(K):
            if done[k]:
                continue
            x = torch.tensor([ids + seqs[k]])
            lp = F.log_softmax(vlm(x, px[None]).float()[0, -1], -1) - penalty * counts
            t = int(lp.argmax())
            seqs[k].append(t); scores[k].append(float(lp[t]))
            counts[t] += 1
            done[k] = t in end_ids
        if all(done):
            break
    return seqs, scores


@pytest.mark.parametrize("penalty", [3.0, 0.05])
def test_diverse_proposals_match_a_direct_group_beam_search(world, penalty):
    vlm = world["vlm"]
    prompts, ids, px = prompt_batch(world, 2)
    ids[1] = ids[1][:-3] + ids[1][-2:]  # prompts of different lengths: left padding is exercised
    dot = vlm.tokenizer.convert_tokens_to_ids(".")
    end = [vlm.tokenizer.eos_token_id, dot]
    x, mask = D.collate_prompts(ids, vlm.tokenizer.pad_token_id)
    g = vlm.generate(x, px, mask, max_new_tokens=8, eos_token_id=vlm.tokenizer.eos_token_id, stop_token_ids=[dot],
                     group_size=4, diversity_penalty=penalty)
    for b in range(2):
        seqs, scores = group_beam_reference(vlm, ids[b], px[b], 4, penalty, 8, end)
        for k in range(4):
            r = 4 * b + k
            n = int(g.lengths[r])
            assert g.tokens[r, :n].tolist() == seqs[k]
            assert g.scores[r, :n].tolist() == pytest.approx(scores[k], abs=1e-4)
    if penalty == 3.0:  # a strong penalty: the groups start with different tokens
        assert len({int(t) for t in g.tokens[:4, 0]}) == 4
    # logprobs are the model's own, unpenalised: the first row of each group is plain greedy
    plain = vlm.generate(x, px, mask, max_new_tokens=8, stop_token_ids=[dot])
    assert g.tokens[0, :int(plain.lengths[0])].tolist() == plain.tokens[0, :int(plain.lengths[0])].tolist()


SEARCH = dict(max_new_tokens=6, max_sentences=3, proposals=4)


def test_batched_trees_equal_one_prompt_and_one_node_at_a_time(world):
    vlm = world["vlm"]
    prompts = D.load_prompts(f"{world['dir']}/prompts.json", f"{world['dir']}/images", 3)
    scorer = S.ClipScorer(CLIP)
    stats, alone_stats = {}, {}
    with torch.no_grad():
        batched = S.search_prompts(vlm, scorer, prompts, SEARCH, stats=stats)
        alone = [S.search_prompts(vlm, scorer, [p], dict(SEARCH, max_nodes=1), stats=alone_stats)[0] for p in prompts]
    for a, b in zip(batched, alone):
        assert [(n["parent"], n["sentence"], n["final"]) for n in a] == [(n["parent"], n["sentence"], n["final"]) for n in b]
        assert [n["lm"] for n in a] == pytest.approx([n["lm"] for n in b], abs=1e-4)
        assert [n["clip"] for n in a[1:]] == pytest.approx([n["clip"] for n in b[1:]], abs=1e-3)
        assert S.pick_pair(a)[:2] == S.pick_pair(b)[:2]
    assert stats["sentences"] == alone_stats["sentences"] > 0
    assert alone_stats["generate_calls"] > stats["generate_calls"]  # one call per node vs one per level
    # a repeated proposal is one more copy of its sibling: the copies account for every repeat
    assert [[n["copies"] for n in t] for t in batched] == [[n["copies"] for n in t] for t in alone]
    assert sum(n["copies"] - 1 for t in batched for n in t) == stats["duplicates"] == alone_stats["duplicates"]
    assert stats["lone"] == sum(1 for t in batched for i in range(len(t))
                                if len(kids := [n for n in t if n["parent"] == i and n["sentence"]]) == 1 and kids[0]["copies"] > 1)
    for tree in batched:  # the tree's shape follows the rules: K proposals, then best 1 + worst 2 live
        depth1 = [n for n in tree if n["parent"] == 0]
        assert 1 <= len(depth1) <= 4
        expanded = {n["parent"] for n in tree[1:]}
        assert not any(tree[i]["final"] for i in expanded)
        for depth in (1, 2):  # at most keep_best + keep_worst nodes of a level grow children
            assert sum(tree[i]["length"] == depth for i in expanded) <= 3
        assert all(n["length"] <= 3 for n in tree) and any(n["length"] == 3 for n in tree)

# ----------------------------------------------------------------------------- selfreward.py end to end


def sr_args(world, out, *extra):
    return [f"--init_from={world['ckpt']}", f"--data_path={world['dir']}/prompts.json", f"--image_root={world['dir']}/images",
            f"--clip_path={CLIP}", f"--out_dir={out}", "--device=cpu", "--dtype=float32", "--max_new_tokens=6",
            "--max_sentences=3", "--proposals=3", "--batch_size=4", *extra]


def test_selfreward_writes_pairs_dpo_reads_and_resumes(world, tmp_path):
    out = str(tmp_path / "sr")
    p = run_script("selfreward.py", sr_args(world, out, "--max_prompts=6"))
    assert "pairs" in p.stdout
    summary = json.load(open(f"{out}/summary.json"))
    pairs_json = open(f"{out}/pairs.json").read()
    rows = [json.loads(line) for line in open(f"{out}/trees.jsonl")]
    assert [r["id"] for r in rows] == [p["id"] for p in D.load_prompts(f"{world['dir']}/prompts.json", f"{world['dir']}/images", 6)]
    assert summary["prompts"] == 6 and summary["pairs"] + sum(summary["skipped"].values()) == 6
    pairs = D.load_pairs(f"{out}/pairs.json", f"{world['dir']}/images")  # what dpo.py reads
    assert len(pairs) == summary["pairs"] > 0
    for pr in pairs:
        tree = next(r for r in rows if r["id"] == pr["id"])
        scores = [n["score"] for n in tree["nodes"] if n["final"] and n["score"] is not None]
        assert pr["chosen"] == tree["nodes"][tree["chosen"]]["text"] and max(scores) == tree["nodes"][tree["chosen"]]["score"]
        assert min(scores) == tree["nodes"][tree["rejected"]]["score"]
    # a crash after 4 prompts (the journal holds the first batch and half a line), then the same command
    journal = f"{out}/trees.rank0.jsonl"
    lines = open(journal).read().splitlines(keepends=True)
    open(journal, "w").write("".join(lines[:4]) + lines[4][:40])
    for f in ("pairs.json", "trees.jsonl", "summary.json"):
        os.remove(f"{out}/{f}")
    p = run_script("selfreward.py", sr_args(world, out, "--max_prompts=6"))
    assert "4 already done, 2 to go" in p.stdout
    assert open(f"{out}/pairs.json").read() == pairs_json
    # other settings, same out_dir: refused instead of mixing trees of two searches
    r = subprocess.run([sys.executable, "selfreward.py", *sr_args(world, out, "--max_prompts=6", "--lam=0.5")], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    assert r.returncode != 0 and "other settings (lam)" in r.stderr, r.stderr[-2000:]


def test_selfreward_torchrun_two_ranks_match_one(world, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_script("selfreward.py", sr_args(world, one, "--max_prompts=5"))
    run_script("selfreward.py", sr_args(world, two, "--max_prompts=5"), nproc=2)
    assert open(f"{one}/pairs.json").read() == open(f"{two}/pairs.json").read()
    t1 = [json.loads(line) for line in open(f"{one}/trees.jsonl")]
    t2 = [json.loads(line) for line in open(f"{two}/trees.jsonl")]
    assert [r["id"] for r in t1] == [r["id"] for r in t2]
    for a, b in zip(t1, t2):
        assert [n["text"] for n in a["nodes"]] == [n["text"] for n in b["nodes"]]


@pytest.mark.parametrize("rec, problem", [
    ({"id": "x", "image": "missing.png", "input": "<image>\nDescribe."}, "image not found"),
    ({"id": "x", "image": "train/IMG", "input": "<image>\n "}, "empty prompt"),
    ({"id": "x", "image": "train/IMG", "question": "Describe."}, "unknown prompt format"),
    ({"id": "x", "image": "train/IMG", "conversations": [{"from": "gpt", "value": "Hi."}]}, "must start with a human turn"),
    ({"id": "x", "input": "Describe."}, "exactly one image"),
])
def test_bad_prompt_files_name_file_record_and_problem(world, tmp_path, rec, problem):
    img = sorted(os.listdir(f"{world['dir']}/images/train"))[0]
    good = {"id": "ok", "image": f"train/{img}", "input": "Describe the image.\n<image>"}
    rec = json.loads(json.dumps(rec).replace("IMG", img))
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([good, rec]))
    with pytest.raises(D.DataError, match=rf"prompts.json: record 1 \(id 'x'\): .*{problem}"):
        D.load_prompts(str(path), f"{world['dir']}/images")
    path.write_text(json.dumps([good, dict(good)]))
    with pytest.raises(D.DataError, match="record 1 .*duplicate id 'ok'"):
        D.load_prompts(str(path), f"{world['dir']}/images")


def test_prompt_formats_and_coco_prefix(world, tmp_path):
    img = sorted(os.listdir(f"{world['dir']}/images/train"))[0]
    os.symlink(f"{world['dir']}/images/train/{img}", tmp_path / f"COCO_train2014_{img}")
    rows = [{"id": 1, "image": img, "input": "What is this photo about'?\n<image>"},
            {"id": 2, "image": img, "conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                                      {"from": "gpt", "value": "A cat."}]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = D.load_prompts(str(tmp_path / "p.jsonl"), str(tmp_path), image_prefix="COCO_train2014_")
    assert [(p["id"], p["prompt"], p["image"]) for p in got] == [
        ("1", "What is this photo about'?", f"COCO_train2014_{img}"), ("2", "Describe it.", f"COCO_train2014_{img}")]
