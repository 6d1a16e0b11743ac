"""prepare_reverie.py on small files in REVERIE's two formats: the rows each setting
writes (worked out by hand), the consistency filter, subsampling, mixing, image remapping, and the
errors for malformed input. And the shapes world's rows: true of their scenes."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import ROOT, run_inprocess

import data as D
from lucid import errors


def raw_rows():
    """Instruction 1 (a.png) has two confusing answers (two raw rows), instruction 2 (b.png) one."""
    common = dict(image="imgs/a.png", question="What color is the cat?", correct_answer="Black.",
                  correct_rationale="The cat on the sofa is black.")
    return [dict(common, confusing_answer="White.", incorrect_rationale="No part of the cat is white."),
            dict(common, confusing_answer="Brown.", incorrect_rationale="The cat has no brown fur."),
            dict(image="imgs/b.png", question="<image>\nHow many dogs?", correct_answer="2",
                 confusing_answer="3", correct_rationale="Two dogs lie on the grass.",
                 incorrect_rationale="Only two dogs are visible, not three.")]


def world(tmp_path, rows=None, name="raw.json"):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    for n in ("a", "b"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "imgs" / f"{n}.png")
    path = tmp_path / name
    path.write_text(json.dumps(raw_rows() if rows is None else rows))
    return path


def prepare(tmp_path, data, *args, ok=True, out="out.json"):
    """prepare_reverie.py in this process (a Python start-up per case would be most of the test's time):
    (its rows, its summary), or with ok=False the one line a user would see."""
    argv = [f"--data_path={data}", f"--image_root={tmp_path}", f"--out_path={tmp_path / out}", *args]
    with pytest.MonkeyPatch.context() as mp:
        try:
            run_inprocess("prepare_reverie.py", argv, mp)
        except errors.USER_ERRORS as e:
            assert not ok, e
            return f"error: {errors.message(e)}"
    assert ok, "prepare_reverie.py did not fail"
    return json.loads((tmp_path / out).read_text()), json.loads((tmp_path / out.replace(".json", "_summary.json")).read_text())


def turns(rec):
    return [t["value"] for t in rec["conversations"]]


def test_separate_rows_as_the_paper_writes_them(tmp_path):
    rows, summary = prepare(tmp_path, world(tmp_path))
    assert summary["rows"] == {"positive": 2, "negative": 3} and summary["instructions"] == 2 and summary["format"] == "raw"
    by_kind = {}
    for r in rows:
        by_kind.setdefault((r["image"], r["id"].split("_")[2]), []).append(turns(r))
    assert by_kind["imgs/a.png", "positive"] == [["<image>\nWhat color is the cat?", "Black.", "Explain why.",
                                                  "The cat on the sofa is black."]]
    assert sorted(by_kind["imgs/a.png", "negative"]) == [
        ["<image>\nWhat color is the cat?", "Black.", "Explain why this answer is wrong: Brown.", "The cat has no brown fur."],
        ["<image>\nWhat color is the cat?", "Black.", "Explain why this answer is wrong: White.", "No part of the cat is white."]]
    assert by_kind["imgs/b.png", "positive"][0][0] == "<image>\nHow many dogs?"  # <image> first, once
    D.load_records(str(tmp_path / "out.json"), str(tmp_path))  # sft.py reads it


@pytest.mark.parametrize("args, kinds, n_turns", [
    (["--rationales=none"], {"answer": 5}, {2}),                       # as many rows as 'both' has: 3 + 2
    (["--rationales=none", "--answer_rows=one"], {"answer": 2}, {2}),
    (["--rationales=positive"], {"positive": 2}, {4}),
    (["--rationales=negative"], {"negative": 3}, {4}),
    (["--layout=joint"], {"joint": 2}, {8, 6}),                       # Q A + why + why-not for each confusing one
    (["--rationales=none", "--layout=joint"], {"answer": 2}, {2}),
])
def test_rationale_settings(tmp_path, args, kinds, n_turns):
    rows, summary = prepare(tmp_path, world(tmp_path), *args)
    assert summary["rows"] == kinds
    assert {len(r["conversations"]) for r in rows} == n_turns
    assert all(turns(r)[1] in ("Black.", "2") for r in rows)  # the first response is always the correct one


def test_answer_only_rows_match_both_also_without_a_rationale(tmp_path):
    """An instruction whose rationales are all unusable gets no row from 'both', so none from the answer-only
    baseline with answer_rows=match (it keeps the questions, the answer tokens and the steps equal); one
    with answer_rows=one."""
    rows = raw_rows()
    rows[2].update(correct_rationale="", incorrect_rationale="")  # instruction 2 (b.png): nothing to reflect on
    for layout in ("separate", "joint"):
        both, s_both = prepare(tmp_path, world(tmp_path, rows), f"--layout={layout}")
        none, s_none = prepare(tmp_path, world(tmp_path, rows), f"--layout={layout}", "--rationales=none")
        assert sum(s_both["rows"].values()) == sum(s_none["rows"].values()) == (3 if layout == "separate" else 1)
        assert {r["image"] for r in none} == {r["image"] for r in both} == {"imgs/a.png"}
    _, s_one = prepare(tmp_path, world(tmp_path, rows), "--rationales=none", "--answer_rows=one")
    assert s_one["rows"] == {"answer": 2}


def test_numeric_answers_from_the_generator_are_read_as_text(tmp_path):
    """REVERIE's generator parses its model's output with ast.literal_eval, so a count arrives as an int."""
    rows = raw_rows()
    rows[2].update(correct_answer=2, confusing_answer=3)
    out, summary = prepare(tmp_path, world(tmp_path, rows))
    assert summary["instructions"] == 2
    (neg,) = [r for r in out if r["image"] == "imgs/b.png" and "_negative_" in r["id"]]
    assert turns(neg)[1:3] == ["2", "Explain why this answer is wrong: 3"]
    rows[2].update(correct_answer=True)  # a bool is not an answer the generator writes
    assert "'correct_answer' must be a string, got bool" in prepare(tmp_path, world(tmp_path, rows), ok=False)


def test_joint_conversation(tmp_path):
    rows, _ = prepare(tmp_path, world(tmp_path), "--layout=joint", "--positive_prompt=Why?",
                      "--negative_prompt=Why is '{answer}' wrong?")
    (b,) = [r for r in rows if r["image"] == "imgs/b.png"]
    assert turns(b) == ["<image>\nHow many dogs?", "2", "Why?", "Two dogs lie on the grass.", "Why is '3' wrong?",
                        "Only two dogs are visible, not three."]


def test_judge_filter_and_dropped_counts(tmp_path):
    rows = raw_rows()
    rows[2]["gemini_pro_judge"] = "Yes"          # the rationales contradict: instruction 2 goes
    rows[0]["chatgpt_judge"] = "No"
    rows[1]["incorrect_rationale"] = "   "        # one empty rationale: that negative row goes
    _, summary = prepare(tmp_path, world(tmp_path, rows))
    assert summary["rows"] == {"positive": 1, "negative": 1}
    assert summary["dropped"] == {"inconsistent rationales (judge)": 1, "empty confusing_answer or incorrect_rationale": 1}
    _, summary = prepare(tmp_path, world(tmp_path, rows), "--filter_inconsistent=False")
    assert summary["instructions"] == 2
    rows[2]["gemini_pro_judge"] = "maybe"
    assert "record 2: 'gemini_pro_judge' must be 'Yes' or 'No'" in prepare(tmp_path, world(tmp_path, rows), ok=False)


def test_released_format(tmp_path):
    """reverie.json's 4-turn rows: kept in their own wording; a negative row (its request says 'wrong')
    gets the instruction's correct answer as its first response."""
    def row(answer, request, rationale):
        return dict(id="x", image="imgs/a.png", conversations=[
            {"from": "human", "value": "What color is the cat?\n<image>"}, {"from": "gpt", "value": answer},
            {"from": "human", "value": request}, {"from": "gpt", "value": rationale}])
    released = [row("Black.", "Please explain the reason.", "It is black."),
                row("White.", "Why is this answer wrong?", "Nothing white."),
                dict(id="y", image="imgs/b.png", conversations=[{"from": "human", "value": "<image>\nQ?"},
                                                                {"from": "gpt", "value": "A."}] * 2)]
    released[2]["conversations"][2]["value"] = "Explain why."
    rows, summary = prepare(tmp_path, world(tmp_path, released, "reverie.json"))
    assert summary["format"] == "released" and summary["rows"] == {"positive": 2, "negative": 1}
    neg = next(r for r in rows if "negative" in r["id"])
    assert turns(neg) == ["<image>\nWhat color is the cat?", "Black.", "Why is this answer wrong?", "Nothing white."]
    rows, summary = prepare(tmp_path, world(tmp_path, released, "reverie.json"), "--rationales=none")
    assert summary["rows"] == {"answer": 3}
    bad = [dict(released[0], conversations=released[0]["conversations"][:2])]
    assert "record 0: reverie.json rows are 4 turns" in prepare(tmp_path, world(tmp_path, bad, "r2.json"), ok=False)


def test_subsample_mix_and_determinism(tmp_path):
    rows = [dict(r, image=f"imgs/{'ab'[i % 2]}.png", question=f"Q{i}?") for i, r in
            enumerate(raw_rows() * 10)]  # 30 instructions, one row each
    (tmp_path / "base.json").write_text(json.dumps([dict(id=f"b{i}", conversations=[
        {"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]) for i in range(10)]))
    path = world(tmp_path, rows)
    a, summary = prepare(tmp_path, path, "--max_instructions=7", f"--base_path={tmp_path}/base.json", "--base_ratio=0.5")
    assert summary["instructions"] == 7 and summary["base_rows"] == 5 and len(a) == 7 * 2 + 5
    questions = {turns(r)[0] for r in a if r["id"].startswith("reverie")}
    assert len(questions) == 7  # both rows of each kept instruction, no other
    b, _ = prepare(tmp_path, path, "--max_instructions=7", f"--base_path={tmp_path}/base.json", "--base_ratio=0.5",
                   out="again.json")
    assert a == b
    c, _ = prepare(tmp_path, path, "--max_instructions=7", "--seed=1", out="other.json")
    assert {turns(r)[0] for r in c} != questions


def test_image_map_and_missing_images(tmp_path):
    rows = raw_rows()
    rows[0]["image"] = rows[1]["image"] = "/gemini/data/VG_100K_2/a.png"
    rows[2]["image"] = "coco/train2017/zzz.png"
    path = world(tmp_path, rows)
    last = prepare(tmp_path, path, "--image_map=VG_100K_2:imgs,train2017:imgs", ok=False)
    assert last.startswith("error: ") and "1 images not found" in last and "imgs/zzz.png (" in last and "record 2" in last
    rows[2]["image"] = "coco/train2017/b.png"
    out, _ = prepare(tmp_path, world(tmp_path, rows), "--image_map=VG_100K_2:imgs,train2017:imgs")
    assert {r["image"] for r in out} == {"imgs/a.png", "imgs/b.png"}


@pytest.mark.parametrize("rows, message", [
    ([{k: v for k, v in raw_rows()[0].items() if k != "confusing_answer"}], "record 0: missing field 'confusing_answer'"),
    ([dict(raw_rows()[0], correct_answer="")], "record 0: empty image, question or correct_answer"),
    ([{"img": "a.png", "q": "?"}], "record 0: unknown format ['img', 'q']"),
    ([dict(raw_rows()[0], correct_rationale="", confusing_answer="")], "no rows to write"),
])
def test_malformed_input_is_named(tmp_path, rows, message):
    last = prepare(tmp_path, world(tmp_path, rows), ok=False)
    assert last.startswith("error: ") and message in last, last


def test_bad_file_exits_with_one_line(tmp_path):
    """What a user meets on the command line: status 1, one 'error:' line naming the file and record, no traceback."""
    p = subprocess.run([sys.executable, "prepare_reverie.py", f"--data_path={world(tmp_path, [{'q': 1}])}",
                        f"--image_root={tmp_path}", f"--out_path={tmp_path / 'out.json'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'raw.json'}: record 0: unknown format")
    assert not (tmp_path / "out.json").exists()


def test_shapes_world_rows_are_true_of_their_scenes(tmp_path):
    """shapes/prepare.py's REVERIE raw rows: the correct answer is what the world's own question
    function answers for the scene, the confusing one differs, the partner kind asks about an absent
    partner, and prepare_reverie.py reads the file with every image present."""
    from shapes import prepare as W
    d = tmp_path / "w"
    p = subprocess.run([sys.executable, "-m", "shapes.prepare", f"--out_dir={d}", "--n_train=100", "--n_val=5", "--n_test=5",
                        "--n_eval=60", "--n_reverie=100"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    scenes = {s["id"]: s for s in json.loads((d / "scenes.json").read_text())["train"]}
    rows = json.loads((d / "reverie_raw.json").read_text())
    assert len(rows) == 100 and {r["kind"] for r in rows} == set(W.REVERIE_KINDS)
    for r in rows:
        scene = scenes[r["image"].split("/")[1][:-4]]
        assert r["confusing_answer"].lower() != r["correct_answer"].lower()
        if r["kind"] == "partner":
            shape = r["question"].split("Is there a ")[1].split(" ")[0]
            assert r["correct_answer"].lower().startswith("no") and all(o["shape"] != shape for o in scene["objects"])
            assert any(o["shape"] == W.PARTNER[shape] for o in scene["objects"])
        if r["kind"] == "count":
            shape = r["question"].split("How many ")[1].split(" ")[0]
            n = sum(W.PLURALS[o["shape"]] == shape for o in scene["objects"])
            assert r["correct_answer"].rstrip(".") == str(n)
    out, summary = prepare(d / "images", d / "reverie_raw.json")
    # the rows whose rationale states a rule wrong carry the judge verdict 'yes': the judge filter drops them
    flagged = sum(r["judge"] == "yes" for r in rows)
    assert flagged >= 1 and all(r["kind"] == "knowledge" for r in rows if r["judge"] == "yes")
    assert summary["rows"] == {"positive": 100 - flagged, "negative": 100 - flagged}
