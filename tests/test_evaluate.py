"""evaluate.py as a subprocess: score-only mode on hand-made answer files (metrics worked out by hand,
the same cases as test_scoring.py), errors that name the file and question, and model mode end to end
on a tiny llava-hf model (one process and torchrun with 2)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from conftest import ROOT, make_tokenizer, tiny_configs
from shapes.prepare import PARTNER

OPTS = ["red", "green", "blue", "white"]
# (question, answer text) per task; expected metrics in the tests below
SUITE = {
    "pope": [  # random: TP TN FP TP; popular: TN TP FP FN
        (dict(text="Is there a dog in the image?", label="yes", category="random"), "Yes, there is a dog in the image."),
        (dict(text="Is there a cat in the image?", label="no", category="random"), "No, there is not a cat."),
        (dict(text="Is there a car in the image?", label="no", category="random"), "I don't see a car."),
        (dict(text="Is there a cup in the image?", label="yes", category="random"), ""),
        (dict(text="Is there a bus in the image?", label="no", category="popular"), "There is no bus. Yes"),
        (dict(text="Is there a dog in the image?", label="yes", category="popular"), "Yes."),
        (dict(text="Is there a man in the image?", label="no", category="popular"), "NO"),
        (dict(text="Is there a cow in the image?", label="yes", category="popular"), "no"),
    ],
    "mc": [
        (dict(question="What color is the ring?", options=OPTS, answer="B", category="color"), "B"),
        (dict(question="What color is the cross?", options=OPTS, answer="B", category="color"), "The answer is C."),
        (dict(question="What color is the dot?", options=OPTS, answer="A", category="shape"), "a"),
        (dict(question="Which color is warm?", options=OPTS, answer="A", category="shape", image=None), "There is a circle."),
    ],
    "vqa": [
        (dict(question="How many circles?", answers=["2"] * 5 + ["two"] * 5, category="count"), "Two"),
        (dict(question="How many squares?", answers=["3"] + ["4"] * 9, category="count"), "3"),
        (dict(text="What is in the top left?", answer="red circle"), "The red circle."),
    ],
    "cot": [
        (dict(question="How many red objects are in the top row?", answer="2"), "Two circles...\n### Answer: 3\nWait.\n### Answer: two"),
        (dict(question="How many blue objects?", answer="2"), "The answer is 2."),
        (dict(question="What color is left of the ring?", options=OPTS[:3], answer="B"), "It is green.\n### Answer: (B)"),
        (dict(question="What color is the dot?", options=OPTS[:3], answer="C"), "### Answer: A"),
    ],
    "chair": [
        (dict(objects=["person", "dog"]), "A man walks two puppies."),
        (dict(objects=["hot dog"]), "A hot dog next to teddy bears and a cat."),
        (dict(objects=["cat", "car"], text="Describe the image."), "There is a kitten and another kitten."),
        (dict(objects=["automobile"]), "An empty street."),
    ],
}
SYNONYMS = "dog, puppy, doggy\nhot dog\nteddy bear, teddybear\nperson, man, people, child, children\ncat, kitten\ncar, automobile\n"


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def make_suite(d, tasks=SUITE):
    """Question files (shapes_dir layout), answer files (a shapes out_dir), images, synonyms."""
    os.makedirs(d / "images", exist_ok=True)
    os.makedirs(d / "answers", exist_ok=True)
    for i in range(4):
        Image.new("RGB", (32, 32), ((60 * i) % 256, 200, 40 * i)).save(d / "images" / f"img{i}.png")
    for task, items in tasks.items():
        qs = []
        for j, (q, _) in enumerate(items):
            q = dict(dict(question_id=100 * (list(SUITE).index(task) + 1) + j, image=f"img{j % 4}.png"), **q)
            if q["image"] is None:  # a text-only question
                del q["image"]
            qs.append(q)
        write_jsonl(d / f"{task}.jsonl", qs)
        write_jsonl(d / "answers" / f"{task}_predictions.jsonl",
                    [dict(question_id=q["question_id"], text=a) for q, (_, a) in zip(qs, items)])
    (d / "synonyms.txt").write_text(SYNONYMS)
    return d


def run(args, ok=True, nproc=1, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "evaluate.py", *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "evaluate.py", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert (p.returncode == 0) == ok, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f] if str(path).endswith(".jsonl") else json.load(f)


def check_expected_pope(pope):
    """The hand-worked POPE figures of SUITE (see tests/test_scoring.py for the arithmetic)."""
    assert list(pope) == ["random", "popular", "average"]
    assert pope["random"]["accuracy"] == 0.75 and pope["random"]["precision"] == pytest.approx(2 / 3)
    assert pope["random"]["recall"] == 1.0 and pope["random"]["f1"] == pytest.approx(0.8) and pope["random"]["yes_ratio"] == 0.75
    assert pope["popular"] == dict(accuracy=0.5, precision=0.5, recall=0.5, f1=0.5, yes_ratio=0.5, n=4)
    assert pope["average"]["f1"] == pytest.approx(0.65) and pope["average"]["precision"] == pytest.approx(7 / 12)
    assert pope["average"]["n"] == 8


def check_expected(m):
    """The hand-worked figures of SUITE (see tests/test_scoring.py for the arithmetic)."""
    check_expected_pope(m["pope"])
    assert m["mc"] == {"color": dict(accuracy=0.5, no_letter=0.0, n=2), "shape": dict(accuracy=0.5, no_letter=0.5, n=2),
                       "overall": dict(accuracy=0.5, no_letter=0.25, n=4)}
    # vqa: count (1 + .3)/2 (the official 10-answer rule: 1 match of 10 is .3); 'all' 1; overall 2.3/3
    assert m["vqa"]["count"]["accuracy"] == pytest.approx(0.65) and m["vqa"]["all"] == dict(accuracy=1.0, n=1)
    assert m["vqa"]["overall"]["accuracy"] == pytest.approx(2.3 / 3)
    assert m["cot"] == {"all": dict(accuracy=0.5, missing_marker=0.25, n=4)}
    c = m["chair"]["all"]
    assert c["chair_s"] == 0.25 and c["chair_i"] == pytest.approx(2 / 7) and c["recall"] == pytest.approx(4 / 6)
    assert c["avg_len"] == 6.25 and c["n"] == 4


def test_score_only_pope_reviewer_interface(tmp_path):
    """python evaluate.py --task=pope --data_path=Q --predictions=A --out_dir=D: no model; D/metrics.json
    holds the splits (by 'category') and 'average' at its top level, fractions in [0, 1]."""
    d = make_suite(tmp_path, {"pope": SUITE["pope"]})
    out = tmp_path / "D"
    p = run(["--task=pope", f"--data_path={d}/pope.jsonl", f"--predictions={d}/answers/pope_predictions.jsonl",
             f"--out_dir={out}", "--init_from=/nonexistent"])  # no model is loaded
    m = read(out / "metrics.json")
    assert set(m) == {"random", "popular", "average"}
    for split in m.values():
        assert all(0 <= split[k] <= 1 for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
    assert m["random"]["f1"] == pytest.approx(0.8) and m["average"]["accuracy"] == pytest.approx(0.625)
    preds = read(out / "predictions.jsonl")
    assert len(preds) == 8 and list(preds[0])[:3] == ["question_id", "prompt", "text"]
    assert preds[2]["text"] == "I don't see a car." and preds[2]["pred"] == "yes" and preds[2]["label"] == "no"
    assert preds[0]["prompt"].endswith("\nAnswer the question using a single word or phrase.")
    assert read(out / "run.json")["init_from"] is None
    assert "random" in p.stdout and "average" in p.stdout


def test_score_only_shapes_suite(tmp_path):
    """The shapes task re-scores a directory of <task>_predictions.jsonl: every rule, one metrics.json."""
    d = make_suite(tmp_path)
    out = tmp_path / "scored"
    p = run(["--task=shapes", f"--shapes_dir={d}", f"--predictions={d}/answers", f"--out_dir={out}"])
    m = read(out / "metrics.json")
    assert list(m) == ["pope", "mc", "vqa", "cot", "chair"]
    check_expected(m)
    for task, items in SUITE.items():
        preds = read(out / f"{task}_predictions.jsonl")
        assert [r["text"] for r in preds] == [a for _, a in items]
    chair = read(out / "chair_predictions.jsonl")
    assert chair[1]["hallucinated"] == ["teddy bear", "cat"] and chair[2]["prompt"] == "Describe the image."
    assert chair[0]["prompt"] == "Describe the image in detail."
    cot = read(out / "cot_predictions.jsonl")
    assert cot[1]["missing_marker"] and cot[0]["prompt"].endswith("Generate a reason first and then output a short answer.")
    header = next(line for line in p.stdout.splitlines() if line.startswith("task"))
    assert "CHAIR_s" in header and "no_marker" in header and "f1" in header


def test_prompt_suffix_asks_the_same_questions_in_another_mode(tmp_path):
    """--prompt_suffix replaces the task's mode suffix: the CoT questions asked for a direct answer
    (LLaVA-Reasoner's suffix) and scored by the VQA rule."""
    d = make_suite(tmp_path, {"cot": SUITE["cot"][:2]})
    write_jsonl(d / "direct.jsonl", [dict(question_id=q["question_id"], text=a) for q, a in zip(read(d / "cot.jsonl"), ["3", "2"])])
    run(["--task=vqa", f"--data_path={d}/cot.jsonl", f"--predictions={d}/direct.jsonl", f"--out_dir={tmp_path}/out",
         "--prompt_suffix=Answer the question with a short answer."])
    preds = read(tmp_path / "out" / "predictions.jsonl")
    assert [p["prompt"] for p in preds] == [q + "\nAnswer the question with a short answer." for q in
                                             ("How many red objects are in the top row?", "How many blue objects?")]
    assert [p["score"] for p in preds] == [0.0, 1.0]


def llava_pope_layout(d):
    """SUITE's POPE questions laid out as LLaVA ships POPE: llava_pope_test.jsonl (question_id, image,
    text, category; no label; the suffix already in some texts) and POPE's coco/coco_pope_<category>.json
    (JSON lines despite the name, question_id from 1 per file, the labels)."""
    make_suite(d, {"pope": SUITE["pope"]})
    qs = read(d / "pope.jsonl")
    os.makedirs(d / "coco")
    for category in ("random", "popular"):
        write_jsonl(d / "coco" / f"coco_pope_{category}.json",
                    [dict(question_id=i + 1, image=q["image"], text=q["text"], label=q["label"])
                     for i, q in enumerate(q for q in qs if q["category"] == category)])
    for i, q in enumerate(qs):
        del q["label"]
        if i % 2:
            q["text"] += "\nAnswer the question using a single word or phrase."
    write_jsonl(d / "llava_pope_test.jsonl", qs)
    return d


def test_score_only_pope_llava_layout(tmp_path):
    """llava_pope_test.jsonl + coco/coco_pope_<category>.json, as LLaVA's eval_pope.py reads them: the
    labels are found beside the question file and the figures are those of the labelled file."""
    d = llava_pope_layout(tmp_path)
    run(["--task=pope", f"--data_path={d}/llava_pope_test.jsonl", f"--predictions={d}/answers/pope_predictions.jsonl",
         f"--out_dir={d}/D"])
    m = read(d / "D" / "metrics.json")
    check_expected_pope(m)
    assert [r["label"] for r in read(d / "D" / "predictions.jsonl")] == [q["label"] for q, _ in SUITE["pope"]]
    # the labels elsewhere: pope_annotation_dir; in another order: an error naming both files
    os.rename(d / "coco", d / "labels")
    p = run(["--task=pope", f"--data_path={d}/llava_pope_test.jsonl", f"--predictions={d}/answers/pope_predictions.jsonl"],
            ok=False)
    assert "coco_pope_random.json (POPE's labels for the 'random' questions) does not exist" in p.stderr
    lines = (d / "labels" / "coco_pope_popular.json").read_text().splitlines()
    (d / "labels" / "coco_pope_popular.json").write_text("\n".join([lines[1], lines[0]] + lines[2:]) + "\n")
    p = run(["--task=pope", f"--data_path={d}/llava_pope_test.jsonl", f"--predictions={d}/answers/pope_predictions.jsonl",
             f"--pope_annotation_dir={d}/labels"], ok=False)
    assert "coco_pope_popular.json: line 1 ('img1.png', 'Is there a dog in the image?') is not " in p.stderr
    assert "llava_pope_test.jsonl: record 4 ('img0.png', 'Is there a bus in the image?')" in p.stderr


def test_score_only_scienceqa(tmp_path):
    """LLaVA's ScienceQA file (.json list of conversations): gold from 'The answer is X.', IMG split."""
    def problem(i, image, options, gold):
        return dict(id=str(i), **({"image": image} if image else {}), conversations=[
            {"from": "human", "value": f"Context: N/A\nQuestion: Q{i}?\nOptions: {options}" + ("\n<image>" if image else "")},
            {"from": "gpt", "value": f"The answer is {gold}."}])
    (tmp_path / "sqa.json").write_text(json.dumps([problem(1, "1/image.png", "(A) x (B) y", "B"),
                                                   problem(2, "2/image.png", "(A) x (B) y (C) z", "A"),
                                                   problem(3, None, "(A) x (B) y", "A")]))
    write_jsonl(tmp_path / "answers.jsonl", [dict(question_id="1", text="B"), dict(question_id="2", text="C"),
                                             dict(question_id="3", text="The answer is A.")])
    run(["--task=mc", f"--data_path={tmp_path}/sqa.json", f"--predictions={tmp_path}/answers.jsonl"])
    m = read(tmp_path / "answers_scored" / "metrics.json")  # default out_dir beside the answer file
    # img: 1 right of 2; no_img 1 of 1; overall 2/3
    assert m["img"]["accuracy"] == 0.5 and m["no_img"]["accuracy"] == 1.0 and m["overall"]["accuracy"] == pytest.approx(2 / 3)


def test_errors_name_file_and_question(tmp_path):
    d = make_suite(tmp_path, {"pope": SUITE["pope"]})
    answers = d / "answers" / "pope_predictions.jsonl"
    lines = answers.read_text().splitlines()
    answers.write_text("\n".join(lines[:2] + lines[3:]) + "\n")  # question 102 unanswered
    p = run(["--task=pope", f"--data_path={d}/pope.jsonl", f"--predictions={answers}"], ok=False)
    assert f"{answers}: no answer for question_id 102" in p.stderr
    answers.write_text(lines[0] + "\n{not json\n")
    p = run(["--task=pope", f"--data_path={d}/pope.jsonl", f"--predictions={answers}"], ok=False)
    assert f"{answers}: line 2: invalid JSON" in p.stderr
    os.remove(d / "images" / "img1.png")  # model mode: checked before any model is loaded
    p = run(["--task=pope", f"--data_path={d}/pope.jsonl", f"--image_root={d}/images", "--init_from=/nonexistent"], ok=False)
    assert "pope.jsonl: question_id 101: image not found" in p.stderr


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A tiny random VLM exported in the llava-hf layout, with tokenizer and image processor."""
    import model as M
    tok = make_tokenizer()
    v, t = tiny_configs(vocab_size=len(tok))
    torch.manual_seed(0)
    d = str(tmp_path_factory.mktemp("llava") / "llava")
    M.VLM.from_parts(lm=t, vision=v, tokenizer=tok).save_llava_hf(d)
    return d


def test_model_mode_shapes_suite(tmp_path, tiny_llava):
    """Every task generated by the model (batches of 3: left padding; one mc question without an
    image), then scored: one prediction per question, every split in metrics.json."""
    d = make_suite(tmp_path)
    out = tmp_path / "eval"
    p = run(["--task=shapes", f"--shapes_dir={d}", f"--image_root={d}/images", f"--init_from={tiny_llava}",
             f"--out_dir={out}", "--batch_size=3", "--max_new_tokens=6", "--device=cpu"])
    m = read(out / "metrics.json")
    assert {t: list(s) for t, s in m.items()} == {"pope": ["random", "popular", "average"],
                                                  "mc": ["color", "shape", "overall"],
                                                  "vqa": ["all", "count", "overall"], "cot": ["all"], "chair": ["all"],
                                                  "direct_cot": ["all"]}
    # the cot questions a second time, in LLaVA-Reasoner's direct mode, scored by the VQA rule
    direct = read(out / "direct_cot_predictions.jsonl")
    assert [r["question_id"] for r in direct] == [r["question_id"] for r in read(out / "cot_predictions.jsonl")]
    assert all(r["prompt"].endswith("\nAnswer the question with a short answer.") and "Generate a reason" not in r["prompt"]
               for r in direct) and "missing_marker" not in direct[0]
    assert set(m["pope"]["random"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio", "n"}
    assert set(m["chair"]["all"]) == {"chair_s", "chair_i", "recall", "avg_len", "n"}
    for task, items in SUITE.items():
        preds = read(out / f"{task}_predictions.jsonl")
        assert [r["question_id"] for r in preds] == [100 * (list(SUITE).index(task) + 1) + j for j in range(len(items))]
        assert all(isinstance(r["text"], str) for r in preds)
    assert read(out / "run.json")["init_from"] == tiny_llava
    assert "questions/s" in p.stdout + p.stderr


@pytest.mark.slow
def test_model_mode_llava_hf_with_llava_pope_files(tmp_path, tiny_llava):
    """What a GPU user runs: init_from = a llava-hf directory, LLaVA's POPE files as shipped. The answers
    it writes, re-scored without a model, give the same metrics."""
    d = llava_pope_layout(tmp_path)
    run(["--task=pope", f"--data_path={d}/llava_pope_test.jsonl", f"--image_root={d}/images", f"--init_from={tiny_llava}",
         f"--out_dir={d}/gen", "--batch_size=4", "--max_new_tokens=4", "--device=cpu"])
    preds = read(d / "gen" / "predictions.jsonl")
    assert [r["label"] for r in preds] == [q["label"] for q, _ in SUITE["pope"]]
    assert all(r["prompt"].count("Answer the question using a single word or phrase.") == 1 for r in preds)
    run(["--task=pope", f"--data_path={d}/llava_pope_test.jsonl", f"--predictions={d}/gen/predictions.jsonl",
         f"--out_dir={d}/rescored"])
    assert read(d / "rescored" / "metrics.json") == read(d / "gen" / "metrics.json")


@pytest.mark.slow
def test_torchrun_two_ranks_match_one(tmp_path, tiny_llava):
    """Questions sharded over 2 ranks (gloo) and gathered back in file order give the answers of one
    process (batch size 1, so every question is computed alone either way)."""
    d = make_suite(tmp_path, {"pope": SUITE["pope"]})
    common = ["--task=pope", f"--data_path={d}/pope.jsonl", f"--image_root={d}/images", f"--init_from={tiny_llava}",
              "--batch_size=1", "--max_new_tokens=4", "--device=cpu"]
    run(common + [f"--out_dir={tmp_path}/one"])
    run(common + [f"--out_dir={tmp_path}/two"], nproc=2)
    one, two = read(tmp_path / "one" / "predictions.jsonl"), read(tmp_path / "two" / "predictions.jsonl")
    assert [r["question_id"] for r in two] == [r["question_id"] for r in one] == list(range(100, 108))
    assert [r["text"] for r in two] == [r["text"] for r in one]
    assert read(tmp_path / "two" / "metrics.json") == read(tmp_path / "one" / "metrics.json")


@pytest.mark.slow
def test_shapes_eval_sets_with_oracle_answers_score_perfectly(tmp_path):
    """shapes/prepare.py's eval sets read as evaluate.py expects: their own gold answers (the true
    caption, the gold CoT chain, the label as a sentence) score 100%, and CHAIR finds no hallucination."""
    world = tmp_path / "shapes"
    p = subprocess.run([sys.executable, "-m", "shapes.prepare", f"--out_dir={world}", "--n_train=50", "--n_val=5",
                        "--n_test=5", "--n_eval=150", "--eval_pope=20", "--eval_mc=20",
                        "--eval_vqa=20", "--eval_cot=20", "--eval_chair=20", "--eval_knowledge=20"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    oracle = dict(pope=lambda r: r["label"].capitalize() + ".", mc=lambda r: f"The answer is {r['answer']}.",
                  vqa=lambda r: r["answer"].capitalize(), cot=lambda r: r["rationale"], chair=lambda r: r["caption"],
                  knowledge=lambda r: r["answer"], direct_cot=lambda r: r["answer"])
    os.makedirs(tmp_path / "oracle")
    for task, answer in oracle.items():  # (direct_cot: the arithmetic of cot.jsonl, answered directly)
        write_jsonl(tmp_path / "oracle" / f"{task}_predictions.jsonl",
                    [dict(question_id=r["question_id"], text=answer(r))
                     for r in read(world / "eval" / f"{'cot' if task == 'direct_cot' else task}.jsonl")])
    run([f"--shapes_dir={world}/eval", f"--predictions={tmp_path}/oracle", f"--out_dir={tmp_path}/out"])
    m = read(tmp_path / "out" / "metrics.json")
    assert list(m["pope"]) == ["random", "popular", "adversarial", "average", "partner negatives", "other negatives"]
    for task in ("pope", "mc", "vqa", "cot", "knowledge", "direct_cot"):
        assert all(s["accuracy"] == 1.0 for s in m[task].values() if "accuracy" in s), (task, m[task])
    assert m["knowledge"]["seen"]["n"] + m["knowledge"]["held-out"]["n"] == 16  # 4 of each yes/no category; corners apart
    assert m["pope"]["average"]["f1"] == 1.0 and m["cot"]["overall"]["missing_marker"] == 0.0
    assert m["cot"]["overall"]["chain_true"] == 1.0 and m["cot"]["overall"]["right_answer_false_chain"] == 0.0
    assert m["pope"]["partner negatives"]["yes_rate"] == m["pope"]["other negatives"]["yes_rate"] == 0.0
    assert m["chair"]["all"]["chair_s"] == 0.0 and m["chair"]["all"]["chair_i"] == 0.0 and m["chair"]["all"]["recall"] == 1.0
    # multiple choice split by how many options are in the image: an answerer that takes another option that is
    # in the image whenever there is one is right exactly on the questions with one option there
    scenes = {sc["id"]: sc for sc in read(world / "eval" / "scenes.json")["eval"]}
    picks = []
    for r in read(world / "eval" / "mc.jsonl"):
        scene = scenes[os.path.basename(r["image"])[:-4]]
        present = {o[r["category"]] for o in scene["objects"]} if r["category"] in ("color", "shape") else set()
        other = [i for i, o in enumerate(r["options"]) if o in present and "ABCD"[i] != r["answer"]]
        picks.append(dict(question_id=r["question_id"], text="ABCD"[other[0]] if other else r["answer"]))
    write_jsonl(tmp_path / "oracle" / "mc_predictions.jsonl", picks)
    # POPE answered by the co-occurrence prior: 'yes' to what is there and to its absent partners
    prior = []
    for r in read(world / "eval" / "pope.jsonl"):
        shapes = {o["shape"] for o in scenes[os.path.basename(r["image"])[:-4]]["objects"]}
        asked = r["text"].split()[3]
        prior.append(dict(question_id=r["question_id"], text="yes" if asked in shapes | {PARTNER[s] for s in shapes} else "no"))
    write_jsonl(tmp_path / "oracle" / "pope_predictions.jsonl", prior)
    run([f"--shapes_dir={world}/eval", f"--predictions={tmp_path}/oracle", f"--out_dir={tmp_path}/out2"])
    mc, pope = read(tmp_path / "out2" / "metrics.json")["mc"], read(tmp_path / "out2" / "metrics.json")["pope"]
    assert pope["partner negatives"]["yes_rate"] == 1.0 and pope["other negatives"]["yes_rate"] == 0.0, pope
    assert pope["adversarial"]["accuracy"] == 0.5 and pope["random"]["accuracy"] > 0.5
    assert mc["1 opts in image"]["accuracy"] == 1.0 and mc["2 opts in image"]["accuracy"] == 0.0, mc
    assert sum(v["n"] for k, v in mc.items() if "in image" in k) == mc["color"]["n"] + mc["shape"]["n"]


def test_mme_and_mmbench_score_only_from_the_real_formats(tmp_path):
    """evaluate.py --task=mme on LLaVA's llava_mme.jsonl + MME's folder and --task=mmbench on an
    MMBench TSV, each with an answer file as LLaVA's scripts write it: the hand-worked figures of
    test_scoring, one table, metrics.json."""
    from test_scoring import MMB_ROWS, write_mme, write_mmbench
    path = write_mme(tmp_path / "MME")
    qs = [json.loads(line) for line in path.read_text().splitlines()]
    answers = ["Yes", "No", "no", "No, there is none.", "Maybe", "no", "yes", "yes"]
    write_jsonl(tmp_path / "mme_answers.jsonl", [dict(question_id=q["question_id"], prompt=q["text"], text=a)
                                                 for q, a in zip(qs, answers)])
    p = run(["--task=mme", f"--data_path={path}", f"--mme_root={tmp_path}/MME",
             f"--predictions={tmp_path}/mme_answers.jsonl", f"--out_dir={tmp_path}/mme_out"])
    m = read(tmp_path / "mme_out" / "metrics.json")
    assert m["existence"]["score"] == 125.0 and m["perception"] == dict(score=175.0, subtasks=2, n=6)
    assert "score" in next(line for line in p.stdout.splitlines() if line.startswith("task"))
    tsv = write_mmbench(tmp_path / "mmbench_dev.tsv", MMB_ROWS)
    rounds = [("10", 0, "B"), ("10", 1, "A"), ("10", 2, "The answer is **d**"), ("10", 3, "C"),
              ("11", 0, "C"), ("11", 1, "B"), ("11", 2, "red")]
    write_jsonl(tmp_path / "mmb_answers.jsonl", [dict(question_id=int(i), round_id=r, text=a) for i, r, a in rounds])
    run(["--task=mmbench", f"--data_path={tsv}", f"--predictions={tmp_path}/mmb_answers.jsonl", f"--out_dir={tmp_path}/mmb"])
    m = read(tmp_path / "mmb" / "metrics.json")
    assert m["overall"] == dict(accuracy=0.5, single=1.0, n=2)
    preds = read(tmp_path / "mmb" / "predictions.jsonl")
    assert [(p["round_id"], p["pred"]) for p in preds][-1] == (2, "B") and "image_b64" not in preds[0]
    write_jsonl(tmp_path / "mmb_short.jsonl", [dict(question_id=int(i), round_id=r, text=a) for i, r, a in rounds[:-1]])
    p = run(["--task=mmbench", f"--data_path={tsv}", f"--predictions={tmp_path}/mmb_short.jsonl"], ok=False)
    assert "mmb_short.jsonl: no answer for question_id '11' round 2" in p.stderr


def test_chain_facts_checks_each_claim_against_the_scene():
    """tasks.shapes.chain_problems reads the world's arithmetic chains claim by claim: every gold chain
    (the three kinds, on 300 scenes) passes, and each kind of false claim is caught whatever the final
    answer: a shape listed wrong, an object's shape wrong, a corner rule wrong, bad arithmetic, terms that
    are not the named shapes' corners, an answer that is not the sum's, the wrong object looked at, a
    sentence the check cannot read. chain_facts counts the right answers that follow a false chain."""
    import random
    from shapes.prepare import ARITH_KINDS, CORNERS, arith_question, cot_format, position_phrase, sample_scenes
    from tasks.shapes import chain_facts, chain_problems
    rng = random.Random(0)
    cases = []
    for sc in sample_scenes("eval", 300, 7):
        for kind in ARITH_KINDS:
            a = arith_question(sc, rng, kind)
            if a:
                cases.append((sc, a[1], cot_format(a[1], a[2], a[3])[1], a[3]))
    position = lambda o: position_phrase(o["row"], o["col"])
    assert len(cases) > 600 and not [c for c in cases if chain_problems(c[2], c[1], c[0], CORNERS, position)]
    total = next(c for c in cases if c[1].endswith("in total?") and "square" in c[2] and "cross" not in c[2])
    sc, q, gold, short = total
    two = next(c for c in cases if "the object in the" in c[1] and "together" in c[1])
    other_cell = next(p for p in ["in the top left", "in the center", "at the bottom", "on the right"]
                      if p not in two[1] and f"the object {p}" not in two[2].lower())
    wrong = {  # each keeps the final answer line as it is
        "shape listed": (q, gold.replace("a square", "a cross", 1)),
        "corner rule": (q, gold.replace("square has 4", "square has 5")),
        "arithmetic": (q, gold.replace(f"= {short}.", f"= {int(short) + 1}.")),
        "terms": (q, gold.replace(" + ", " + 1 + ", 1)),
        "answer": (q, gold.replace(f"### Answer: {short}", f"### Answer: {int(short) + 2}")),
        "object looked at": (two[1], two[2].replace(two[1].split("the object ")[1].split(" and")[0], other_cell, 1)),
        "unread": (q, gold.replace("\n###", " Then I checked.\n###")),
        # (one object named by its colour, the other by its cell: references of both kinds in one chain)
        "objects named otherwise": (two[1], two[2].replace(two[2].split(" is ")[0], f"The {two[0]['objects'][0]['color']} object", 1)),
    }
    for what, (question, text) in wrong.items():
        scene = two[0] if question == two[1] else sc
        assert text != (two[2] if question == two[1] else gold), what
        assert chain_problems(text, question, scene, CORNERS, position), what
    assert not chain_problems(gold.replace(f"### Answer: {short}", f"### Answer: {short}."), q, sc, CORNERS, position)
    # a square taken for a diamond has the same corners: the right answer after a false chain
    lucky = next(c for c in cases if " square" in c[2] and c[1].endswith("in total?"))
    rows = [dict(image=f"eval/{c[0]['id']}.png", question=c[1], text=c[2], answers=[c[3]]) for c in cases[:9]]
    rows.append(dict(image=f"eval/{lucky[0]['id']}.png", question=lucky[1], answers=[lucky[3]],
                     text=lucky[2].replace("a square", "a diamond").replace("A square", "A diamond")))
    judge = lambda r: dict(score=float(r["text"].split("### Answer:")[-1].strip() in r["answers"]))
    m = chain_facts(rows, {c[0]["id"]: c[0] for c in cases}, judge)
    assert m == dict(chain_true=0.9, n_right=10, right_answer_false_chain=0.1), m
