"""LLaVA-Reasoner's answer-checked pair mining (selfreward.py mode=answer): the answer matcher on
hand-made cases, the accuracy band and the pair draw, the question formats and their errors, and the
script end to end (samples journal, resume, torchrun, pairs dpo.py reads); best-of-N's majority vote
and verifier reward by hand and against dpo.py's scoring, and evaluate.py --best_of end to end."""
import json
import os

import pytest
import torch

from methods import reasoner as A
from tasks import benchmark as B
import tasks.cot
import tasks.prompts
import data as D
from conftest import ROOT, run_script, tiny_world_vlm

MC = dict(options=["red", "blue", "green"], answer="B")


@pytest.mark.parametrize("pred, q, right", [
    ("B", MC, True), ("(B)", MC, True), ("The answer is B.", MC, True), ("blue", MC, True),  # the option's text
    ("A", MC, False), ("C. green", MC, False), ("red or blue", MC, False),
    ("12", dict(answers=["12"]), True), ("12.5", dict(answers=["12"]), True), ("11.4", dict(answers=["12"]), True),
    ("12.7", dict(answers=["12"]), False), ("11.3", dict(answers=["12"]), False),  # outside 5 %
    ("1,000", dict(answers=["1020"]), True), ("40%", dict(answers=["41%"]), True),
    ("12 cm", dict(answers=["12"]), True), ("12 cm", dict(answers=["12 cm"]), True), ("12 cm", dict(answers=["12 m"]), False),
    ("two", dict(answers=["2"]), True), ("0", dict(answers=["0"]), True), ("0.01", dict(answers=["0"]), False),
    ("Red circle.", dict(answers=["red circle"]), True), ("the circle", dict(answers=["circle", "ring"]), True),
    ("square", dict(answers=["circle", "ring"]), False),
])
def test_answer_matcher_by_hand(pred, q, right):
    assert tasks.cot.answer_correct(pred, q) is right


def test_marker_missing_repeated_or_empty():
    q = dict(answers=["3"])
    rows = A.check_answers(q, ["It has 3.\n### Answer: 3", "### Answer: 4\nno wait\n### Answer: 3", "I count 3.",
                               "### Answer: 3\n### Answer: 4", "### Answer:"])
    assert [(r["answer"], r["correct"]) for r in rows] == [("3", True), ("3", True), (None, False), ("4", False), ("", False)]


def test_chain_oracle_checks_the_whole_chain():
    """check=chain (analysis only): a right short answer after another chain is not right."""
    q = dict(answers=["1"], rationale="The top row has a red circle. It is red.\n### Answer: 1")
    texts = [q["rationale"] + "\n", "The top row has a red ring. It is red.\n### Answer: 1", "### Answer: 0"]
    assert [r["correct"] for r in A.check_answers(q, texts)] == [True, True, False]
    assert [r["correct"] for r in A.check_answers(q, texts, by_chain=True)] == [True, False, False]


def samples(right, wrong):
    return [dict(text=f"r{i}", correct=True) for i in range(right)] + [dict(text=f"w{i}", correct=False) for i in range(wrong)]


def test_band_and_pair_draw():
    # 32 samples: 7 right = 0.219 < 0.25, 8 right = 0.25 kept (the band is closed), 27 = 0.844 kept, 28 = 0.875 above
    assert A.pick_pairs(samples(7, 25), "q", 1)[1:] == ([], "below band")
    assert A.pick_pairs(samples(28, 4), "q", 1)[1:] == ([], "above band")
    for right in (8, 27):
        acc, pairs, why = A.pick_pairs(samples(right, 32 - right), "q", 1)
        assert acc == right / 32 and why is None and len(pairs) == 3 and len(set(pairs)) == 3
        assert all(c.startswith("r") and r.startswith("w") for c, r in pairs)
    # the draw is fixed by seed and question id, not by the order the samples came in
    s = samples(10, 22)
    assert A.pick_pairs(s, "q", 1) == A.pick_pairs(s[::-1], "q", 1)
    assert A.pick_pairs(s, "q", 1)[1] != A.pick_pairs(s, "q", 2)[1] or A.pick_pairs(s, "q", 1)[1] != A.pick_pairs(s, "p", 1)[1]
    # draw='distinct': identical texts count once (1 distinct right x 1 distinct wrong is one pair, however
    # many copies); draw='samples' (the default): pairs of samples, so the copies give 3 pairs
    dup = [dict(text="r", correct=True)] * 4 + [dict(text="w", correct=False)] * 4
    assert A.pick_pairs(dup, "q", 1, draw="distinct")[1] == [("r", "w")]
    assert A.pick_pairs(dup, "q", 1)[1] == [("r", "w")] * 3
    assert A.pick_pairs(samples(0, 4), "q", 1, min_accuracy=0.0)[1:] == ([], "all incorrect")


def test_pairs_drawn_from_the_samples_keep_how_often_a_chain_was_sampled():
    """The paper draws random pairs from the samples: a right chain the model wrote 9 times in 10 is the
    chosen one about 9 times in 10 (drawn from distinct texts it would be half the time)."""
    s = [dict(text="often", correct=True)] * 9 + [dict(text="rare", correct=True)] + \
        [dict(text=f"w{i}", correct=False) for i in range(10)]
    share = {draw: sum(c == "often" for q in range(300) for c, _ in A.pick_pairs(s, f"q{q}", 1, max_pairs=1, draw=draw)[1]) / 300
             for draw in ("samples", "distinct")}
    assert 0.8 < share["samples"] < 0.97 and 0.38 < share["distinct"] < 0.62, share
    with pytest.raises(ValueError, match="draw must be"):
        A.pick_pairs(s, "q", 1, draw="texts")


def test_weighted_voting():
    """Each sample votes for its short answer with weight softmax(reward): a well-rewarded minority answer
    wins over a poorly rewarded majority; with equal rewards it is the majority vote."""
    q = dict(answers=["4"])
    texts = ["a\n### Answer: 3", "b\n### Answer: 3", "c\n### Answer: 4", "d (no marker)"]
    assert A.majority_index(texts, q) == 0
    assert A.weighted_index(texts, q, [0.0, 0.0, 3.0, 9.0]) == 2  # the unmarked answer's weight votes for nothing
    assert A.weighted_index(texts, q, [1.0, 1.0, 1.0, 1.0]) == A.majority_index(texts, q) == 0
    assert A.weighted_index(["x", "y"], q, [0.0, 1.0]) == 0  # no answer at all


def test_question_formats(tmp_path):
    img = tmp_path / "a.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(img)
    recs = [{"question_id": 1, "image": "a.png", "question": "How many?", "answer": 3, "rationale": "I count three.\n### Answer: 3"},
            {"id": "s", "image": "a.png", "question": "Which colour?", "options": ["red", "blue"], "answer": "blue"},
            {"id": "c", "image": "a.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat shape?\nAnswer the question using a single word or phrase."},
                {"from": "gpt", "value": "I see a ring.\n### Answer: ring"}]},
            {"id": "m", "image": "a.png", "conversations": [
                {"from": "human", "value": "<image>\nWhich?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."},
                {"from": "gpt", "value": "B"}]}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = D.load_prompts(str(tmp_path / "q.jsonl"), str(tmp_path), parse=B.question_from_record)
    cot = "\n" + tasks.prompts.COT_SUFFIX
    assert [(q["id"], q["prompt"]) for q in got] == [("1", "How many?" + cot), ("s", "Which colour?\nA. red\nB. blue" + cot),
                                                     ("c", "What shape?" + cot), ("m", "Which?\nA. cat\nB. dog" + cot)]
    assert got[0]["answers"] == ["3"] and (got[1]["options"], got[1]["answer"]) == (["red", "blue"], "B")
    assert got[2]["answers"] == ["ring"] and got[3]["answer"] == "B"
    # the gold chain rides along where there is one (never used by the check)
    assert [q.get("rationale") for q in got] == ["I count three.\n### Answer: 3", None, "I see a ring.\n### Answer: ring", None]


@pytest.mark.parametrize("rec, problem", [
    ({"id": "x", "image": "a.png", "question": "How many?"}, "no gold answer"),
    ({"id": "x", "image": "missing.png", "question": "How many?", "answer": "2"}, "image not found"),
    ({"id": "x", "question": "How many?", "answer": "2"}, "exactly one image"),
    ({"id": "x", "image": "a.png", "question": "Which?", "options": ["a", "b"], "answer": "C"}, "not an option letter"),
    ({"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhich?\nA. cat\nB. dog"},
                                                    {"from": "gpt", "value": "a horse"}]}, "names none of the options"),
    ({"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]}, "no assistant turn"),
])
def test_bad_question_files_name_file_record_and_problem(tmp_path, rec, problem):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "q.json").write_text(json.dumps([{"id": "ok", "image": "a.png", "question": "Q?", "answer": "1"}, rec]))
    with pytest.raises(D.DataError, match=rf"q.json: record 1 \(id 'x'\): .*{problem}"):
        D.load_prompts(str(tmp_path / "q.json"), str(tmp_path), parse=B.question_from_record)


# ----------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def world(shapes, tmp_path_factory):
    d = os.path.dirname(shapes[0].split("=", 1)[1])
    ckpt = str(tmp_path_factory.mktemp("reasoner") / "base")
    tiny_world_vlm(d, max_positions=1024).save_pretrained(ckpt)
    return dict(dir=d, ckpt=ckpt)


def args(world, out, *extra):
    return ["--mode=answer", f"--init_from={world['ckpt']}", f"--data_path={world['dir']}/questions.json",
            f"--image_root={world['dir']}/images", f"--out_dir={out}", "--device=cpu", "--dtype=float32",
            "--samples=4", "--max_new_tokens=6", "--batch_size=2", "--max_prompts=5", *extra]


@pytest.mark.slow
def test_answer_mode_samples_resumes_and_two_ranks_match_one(world, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    p = run_script("selfreward.py", args(world, one))
    assert "questions | kept" in p.stdout
    rows = [json.loads(line) for line in open(f"{one}/samples.jsonl")]
    questions = D.load_prompts(f"{world['dir']}/questions.json", f"{world['dir']}/images", 5, parse=B.question_from_record)
    assert [r["id"] for r in rows] == [q["id"] for q in questions]
    assert all(len(r["samples"]) == 4 and r["answers"] == q["answers"] for r, q in zip(rows, questions))
    # sampled, not greedy: an untrained model's 4 answers to one question are not all the same
    assert any(len({s["text"] for s in r["samples"]}) > 1 for r in rows)
    summary = json.load(open(f"{one}/summary.json"))
    # the untrained model never writes the marker: every answer wrong, every question below the band
    assert summary["no_marker"] == summary["samples"] == 20 and summary["below_band"] == 5 and summary["pairs"] == 0
    # the same batches on 2 ranks: the same samples
    run_script("selfreward.py", args(world, two), nproc=2)
    assert open(f"{one}/samples.jsonl").read() == open(f"{two}/samples.jsonl").read()
    # a crash after the first batch (and half a line), then the same command: the rest is sampled, the first kept
    journal = f"{one}/samples.rank0.jsonl"
    lines = open(journal).read().splitlines(keepends=True)
    open(journal, "w").write("".join(lines[:2]) + lines[2][:30])
    p = run_script("selfreward.py", args(world, one))
    assert "2 already done, 3 to go" in p.stdout
    again = [json.loads(line) for line in open(f"{one}/samples.jsonl")]
    assert again[:2] == rows[:2] and len(again) == 5


def test_chain_check_needs_the_gold_chains(world, tmp_path):
    import subprocess, sys
    qs = [{k: v for k, v in q.items() if k != "rationale"} for q in json.load(open(f"{world['dir']}/questions.json"))[:3]]
    (tmp_path / "q.json").write_text(json.dumps(qs))
    a = args(world, str(tmp_path / "out"), "--check=chain")
    a[2] = f"--data_path={tmp_path}/q.json"
    p = subprocess.run([sys.executable, "selfreward.py", *a], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode != 0 and "check=chain needs each question's gold chain" in p.stderr and "Traceback" not in p.stderr


def test_answer_mode_pairs_from_a_journal_are_what_dpo_reads(world, tmp_path):
    """The pairs step on a journal written by hand (a trained model's answers): the band, the pair
    format and dpo.py's reader, without sampling anything."""
    out = tmp_path / "sr"
    out.mkdir()
    questions = D.load_prompts(f"{world['dir']}/questions.json", f"{world['dir']}/images", 3, parse=B.question_from_record)
    journal = []
    for q, n_right in zip(questions, (2, 4, 0)):  # accuracy 0.5 (kept), 1.0 (above), 0.0 (below)
        gold = q["answers"][0]
        texts = [f"Reason {i}.\n### Answer: {gold}" for i in range(n_right)] + \
                [f"Reason {i}.\n### Answer: {gold}{gold}x" for i in range(4 - n_right)]
        if n_right == 2:  # one right answer after the gold chain itself, one after another chain
            texts[0] = q["rationale"]
        checked = A.check_answers(q, texts)
        journal.append(dict(id=q["id"], image=q["image"], prompt=q["prompt"], answers=q["answers"], samples=checked,
                            accuracy=sum(c["correct"] for c in checked) / 4))
    (out / "samples.rank0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in journal))
    run_script("selfreward.py", args(world, str(out), "--max_prompts=3"))
    summary = json.load(open(out / "summary.json"))
    assert (summary["kept"], summary["above_band"], summary["below_band"], summary["pairs"]) == (1, 1, 1, 3)
    # 6 right answers, 1 after the gold chain; the kept question's 3 pairs over its 2 right x 2 wrong texts
    assert summary["right_answer_wrong_chain"] == pytest.approx(5 / 6)
    chosen = [p["chosen"] for p in json.load(open(out / "pairs.json"))]
    assert summary["chosen_wrong_chain"] == pytest.approx(sum(c != questions[0]["rationale"] for c in chosen) / 3)
    pairs = json.load(open(out / "pairs.json"))
    assert [p["id"] for p in pairs] == [f"{questions[0]['id']}_{k}" for k in range(3)]
    assert all(p["accuracy"] == 0.5 and p["question"] == questions[0]["prompt"] for p in pairs)
    loaded = D.load_pairs(str(out / "pairs.json"), f"{world['dir']}/images")  # what dpo.py reads
    assert all(p["prompt"][0]["value"].startswith("<image>\n") and "### Answer" in p["chosen"] for p in loaded)
    right = [s["text"] for s in journal[0]["samples"] if s["correct"]]
    wrong = [s["text"] for s in journal[0]["samples"] if not s["correct"]]
    assert len({(p["chosen"], p["rejected"]) for p in loaded} & {(a, b) for a in right for b in wrong}) == 3


# --- best-of-N: the majority vote and the verifier's pick (evaluate.py --best_of)

def test_majority_vote_by_hand():
    q_num, q_mc = dict(answers=["2"] * 10), dict(options=["red", "green", "blue"], answer="B")
    # '2', 'two' and '2.0' are one vote; the answer without a marker votes for nothing
    texts = ["a\n### Answer: 3", "b\n### Answer: two", "no marker 3", "c\n### Answer: 2.0", "d\n### Answer: 3 ",
             "e\n### Answer: 2"]
    assert A.majority_index(texts, q_num) == 1  # 2 has three votes, 3 two; the first '2' is at 1
    assert A.majority_index(["x\n### Answer: 3", "y\n### Answer: 2"], q_num) == 0  # a tie: the first seen
    assert A.majority_index(["none", "### Answer:"], q_num) == 0  # no votes at all
    # letters as evaluate.py reads them: '(B)', 'B. green' and 'green' are one vote
    mc = ["### Answer: A", "### Answer: (B)", "### Answer: C", "### Answer: B. green", "### Answer: green"]
    assert A.majority_index(mc, q_mc) == 1
    assert A.vote_key("Two.", q_num) == A.vote_key("2", q_num) == 2.0
    assert A.vote_key("The Red ", dict(answers=["red"])) == "red" and A.vote_key(None, q_num) is None


def test_ranking_auc_by_hand():
    # question 1: the right sample's reward above both wrong ones: 2 of 2 pairs; question 2: one pair
    # tied (a half), one ordered against the score (0): 0.5 of 2
    assert A.ranking_auc([[3.0, 1.0, 2.0], [1.0, 1.0, 0.0]], [[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]]) == pytest.approx(2.5 / 4)
    assert A.ranking_auc([[1.0, 2.0]], [[1.0, 1.0]]) is None  # no pair with different scores


def test_best_index_takes_the_first_of_equal_rewards():
    assert A.best_index([0.5, 2.0, -1.0, 2.0]) == 1 and A.best_index(torch.tensor([-3.0, -2.0])) == 1


def test_answer_logps_batched_match_one_at_a_time_and_the_dpo_reward(world):
    """answer_logps over 2 questions x 3 answers (one forward, each image encoded once) equals each
    answer scored alone on build_pair's chosen tokens (what dpo.py trains), and a model verifying
    itself gives every answer the reward 0."""
    vlm = tiny_world_vlm(world["dir"]).eval()
    qs = D.load_prompts(f"{world['dir']}/questions.json", f"{world['dir']}/images", 2, parse=B.question_from_record)
    texts = [["The top row has a red circle.\n### Answer: 1", "### Answer: 0", "I count none."],
             ["Yes.", "The left column has a blue square and a red ring. One of them is red.\n### Answer: 1", "x"]]
    with torch.no_grad():
        got = A.answer_logps(vlm, qs, texts)
        assert got.shape == (2, 3)
        for i, q in enumerate(qs):
            for j, t in enumerate(texts[i]):
                pair = dict(image=q["image"], prompt=[{"from": "human", "value": "<image>\n" + q["prompt"]}],
                            chosen=t, rejected=t)
                b = D.build_pair(pair, vlm.tokenizer, "chat", vlm.image_token_id, vlm.num_image_tokens)
                _, px, _ = D.prompt_inputs([q], vlm)
                ids = torch.tensor([b["chosen_ids"]])
                alone = -vlm(ids, px, torch.ones_like(ids), torch.tensor([b["chosen_labels"]]), reduction="row")
                assert got[i, j].item() == pytest.approx(alone.item(), abs=1e-4)
        assert torch.equal(A.answer_logps(vlm, qs, texts) - got, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="same number of answers"):
        A.answer_logps(vlm, qs, [texts[0], texts[1][:2]])


def test_evaluate_best_of_verifier_vs_majority(world, tmp_path):
    """evaluate.py --best_of: N samples per cot question, scored by the cot rule; every pick's accuracy
    lies between 0 and the oracle's, 'sample' is the mean over the N, and the verifier picks the
    highest reward. With the model as its own verifier every reward is 0: it picks the first sample."""
    d, out = world["dir"], tmp_path / "bo"
    qs = [json.loads(line) for line in open(f"{d}/eval/cot.jsonl")][:4]
    (tmp_path / "cot.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    common = ["--task=cot", f"--data_path={tmp_path}/cot.jsonl", f"--image_root={d}/images", f"--init_from={world['ckpt']}",
              "--best_of=3", "--max_new_tokens=8", "--batch_size=3", "--device=cpu"]
    run_script("evaluate.py", common + [f"--verifier={world['ckpt']}", f"--out_dir={out}"])
    best, rows = json.load(open(out / "best_of.json")), [json.loads(line) for line in open(out / "best_of_predictions.jsonl")]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in qs]
    for r in rows:
        assert len(r["samples"]) == len(r["scores"]) == len(r["rewards"]) == 3
        assert r["rewards"] == [pytest.approx(0.0, abs=1e-4)] * 3 and r["verifier_pick"] == A.best_index(r["rewards"])
        assert r["sample"] == pytest.approx(sum(r["scores"]) / 3) and r["oracle"] == max(r["scores"])
        assert r["majority_pick"] == A.majority_index(r["samples"], r)
        assert r["weighted_pick"] == r["majority_pick"]  # equal rewards: weighted voting is the majority vote
    overall = best["overall"]  # 4 questions of 3 kinds: a split per kind and the pooled one
    assert overall["n"] == 4 and set(overall) == {"greedy", "sample", "majority", "verifier", "weighted", "oracle", "n",
                                                  "verifier_auc", "in_band"}
    # in_band: the questions right in 25-85 % of their samples (with 3 samples: exactly 1 of 3 right)
    assert overall["in_band"] == pytest.approx(sum(0.25 <= r["sample"] <= 0.85 for r in rows) / 4)
    assert overall["verifier_auc"] in (None, 0.5)  # every reward 0: every ordered pair a tie
    assert all(0 <= overall[k] <= overall["oracle"] for k in ("sample", "majority", "verifier"))
    # the greedy column is the ordinary cot evaluation of the same run
    assert overall["greedy"] == pytest.approx(json.load(open(out / "metrics.json"))["overall"]["accuracy"])


@pytest.mark.slow
def test_the_verifier_scores_the_tokens_dpo_trained_on(world, tmp_path):
    """The reward is summed over what dpo.py trained the verifier on: its train_state.pt says max_words 2 and
    drop_eos True, so each answer's first two words without the end of turn (not the whole answer)."""
    import model as M
    d = world["dir"]
    ver = str(tmp_path / "verifier")
    tiny_world_vlm(d, max_positions=1024, seed=1).save_pretrained(ver)  # other weights than the SFT model's
    torch.save({"config": json.dumps({"max_words": 2, "drop_eos": True}), "step": 1}, os.path.join(ver, "train_state.pt"))
    qs = [json.loads(line) for line in open(f"{d}/eval/cot.jsonl")][:2]
    (tmp_path / "cot.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    out = tmp_path / "bo"
    run_script("evaluate.py", ["--task=cot", f"--data_path={tmp_path}/cot.jsonl", f"--image_root={d}/images",
                               f"--init_from={world['ckpt']}", "--best_of=2", "--max_new_tokens=12", "--device=cpu",
                               f"--verifier={ver}", f"--out_dir={out}"])
    rows = [json.loads(line) for line in open(out / "best_of_predictions.jsonl")]
    questions = [dict(q, path=D.resolve_image(f"{d}/images", q["image"])) for q in B.read_benchmark(f"{tmp_path}/cot.jsonl", "cot")]
    sft, v = M.VLM.from_pretrained(world["ckpt"]).eval(), M.VLM.from_pretrained(ver).eval()
    texts = [r["samples"] for r in rows]
    with torch.no_grad():
        want = (A.answer_logps(v, questions, texts, 2, True) - A.answer_logps(sft, questions, texts, 2, True)).tolist()
        whole = (A.answer_logps(v, questions, texts) - A.answer_logps(sft, questions, texts)).tolist()
    got = torch.tensor([r["rewards"] for r in rows])
    assert torch.allclose(got, torch.tensor(want), atol=1e-4), (got, want)
    assert not torch.allclose(got, torch.tensor(whole), atol=1e-4), (got, whole)  # the cut changes the reward
