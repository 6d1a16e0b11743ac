"""Bad input, as a user meets it: every kind ends in one line naming the file, the record and the problem
(exit status 1, no traceback), or, where the user asked to skip, in a counted skip in the report.

The exit behaviour itself (the one-line message, status 1, DataLoader workers, LUCID_TRACEBACK) is checked
on real subprocesses; the many kinds of bad file run the scripts in-process (runpy), which is the same
code without a Python start-up per case."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from lucid import errors
from conftest import ROOT, run_inprocess, tiny_world_vlm

TINY = ["--init_from=scratch", "--n_layer=1", "--n_head=2", "--n_embd=32", "--max_len=256", "--eval_batches=1",
        "--num_workers=0", "--dtype=float32", "--device=cpu", "--max_steps=2", "--global_batch_size=4",
        "--micro_batch_size=4", "--save_checkpoint=False", "--val_data_path=None"]


@pytest.fixture
def world(shapes, tmp_path):
    """(sft.py arguments without data_path, a few good records whose images are under tmp_path/images)."""
    src = next(a.split("=", 1)[1] for a in shapes if a.startswith("--data_path=")).rsplit("/", 1)[0]
    os.makedirs(tmp_path / "images")
    recs = json.load(open(os.path.join(src, "train.json")))[:8]
    for r in recs:
        name = os.path.basename(r["image"])
        Image.open(os.path.join(src, "images", r["image"])).save(tmp_path / "images" / name)
        r["image"] = name
    args = [a for a in shapes if not a.startswith(("--data_path=", "--val_data_path=", "--image_root="))]
    return args + TINY + [f"--image_root={tmp_path}/images", f"--out_dir={tmp_path}/out"], recs


def write(path, records):
    with open(path, "w") as f:
        json.dump(records, f)
    return str(path)


def run_subprocess(script, args, **env):
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env})


def assert_one_line_error(p, *parts):
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(s in last for s in parts), last
    return last


def truncated_png(path, like):
    data = open(like, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])  # a valid header (the up-front check passes), half the pixels


def text(path, content):
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


# the kinds of bad training file: how to make each from good records (the line it must give: EXPECT)
def bad_training_files(tmp_path, recs):
    turn = recs[0]["conversations"]
    d = tmp_path
    (d / "images" / "not_an_image.png").write_text("hello")
    (d / "zero.png").write_bytes(b"")
    return {
        "missing file": str(d / "nope.json"),
        "zero-byte json": text(d / "zero.json", ""),
        "empty jsonl": text(d / "empty.jsonl", "\n\n"),
        "truncated json": text(d / "cut.json", json.dumps(recs)[:300]),
        "bad jsonl line": text(d / "bad.jsonl", json.dumps(recs[0]) + "\n{oops\n"),
        "not utf-8": text(d / "latin1.json", json.dumps(recs[:1]).replace("Describe", "D\u00e9crire").encode("latin-1")),
        "not a list": write(d / "obj.json", recs[0]),
        "record not an object": write(d / "str.json", recs[:2] + ["just text"]),
        "turn without value": write(d / "turn.json", [dict(recs[0], conversations=[{"from": "human"}] + turn[1:])]),
        "unknown role": write(d / "role.json", [dict(recs[0], conversations=[dict(turn[0], **{"from": "bot"})] + turn[1:])]),
        "placeholder mismatch": write(d / "ph.json", [dict(recs[0], conversations=[dict(turn[0], value="<image><image> hi")] + turn[1:])]),
        "image not a path": write(d / "img.json", [dict(recs[0], image=7)]),
        "missing image": write(d / "mi.json", recs[:3] + [dict(recs[3], image="gone.png")]),
        "not an image": write(d / "ni.json", [dict(recs[0], image="not_an_image.png")]),
        "zero-byte image": write(d / "zi.json", [dict(recs[0], image=str(d / "zero.png"))]),
        "image outside the root": write(d / "out.json", [dict(recs[0], image="../../etc/passwd")]),
        "empty answer": write(d / "ea.json", recs[:2] + [dict(recs[2], conversations=turn[:1] + [dict(turn[1], value="  ")])]),
        "over-long sample": write(d / "long.json", [dict(recs[0], conversations=[  # the image after 400 words of text
            dict(turn[0], value="x " * 400), dict(turn[1], value="ok")] + turn)]),
        "bad ratio": write(d / "ok.json", recs) + ":abc",
    }


EXPECT = {  # kind -> (text the line must hold besides the file name, record index or None)
    "missing file": ("data file not found", None),
    "zero-byte json": ("no records (the file is empty)", None),
    "empty jsonl": ("no records (the file is empty)", None),
    "truncated json": (": line 1 column ", None),
    "bad jsonl line": ("line 2 (record 1): invalid JSON", None),
    "not utf-8": ("not UTF-8 text (byte 0xe9", None),
    "not a list": ("expected a JSON list of records, got a dict", None),
    "record not an object": ("record is a str, not an object", 2),
    "turn without value": ("turn 0 needs 'from' and 'value'", 0),
    "unknown role": ("unknown 'from' 'bot'", 0),
    "placeholder mismatch": ("2 <image> placeholder(s) in the human turns but 1 image(s)", 0),
    "image not a path": ("'image' must be a path or a list of paths", 0),
    "missing image": ("image not found", 3),
    "not an image": ("cannot read image", 0),
    "zero-byte image": ("cannot read image", 0),
    "image outside the root": ("leaves the image root", 0),
    "empty answer": ("turn 1: empty assistant answer", 2),
    "over-long sample": ("the image would be truncated", 0),
    "bad ratio": ("the sample ratio after ':' must be a number, got 'abc'", None),
}


def test_every_bad_training_file_is_one_clear_error(world, tmp_path, monkeypatch):
    args, recs = world
    files = bad_training_files(tmp_path, recs)
    assert set(files) == set(EXPECT)
    for kind, spec in files.items():
        problem, record = EXPECT[kind]
        with pytest.raises(errors.UserError) as e:
            run_inprocess("sft.py", args + [f"--data_path={spec}"], monkeypatch)
        msg = errors.message(e.value)
        name = os.path.basename(spec.split(":")[0])
        assert problem in msg and name in msg, (kind, msg)
        if record is not None:
            assert f"record {record}" in msg, (kind, msg)


def test_skip_bad_counts_every_kind_and_reports_it(world, tmp_path, monkeypatch, capsys):
    """skip_bad: bad samples found up front and images that fail only when decoded mid-run are both counted."""
    args, recs = world
    truncated_png(tmp_path / "images" / "trunc.png", tmp_path / "images" / recs[1]["image"])
    (tmp_path / "images" / "not_an_image.png").write_text("hello")
    turn = recs[0]["conversations"]
    data = write(tmp_path / "mixed.json", recs[:4] + [
        dict(recs[4], image="gone.png"), dict(recs[5], image="not_an_image.png"), dict(recs[6], image="trunc.png"),
        dict(recs[7], conversations=turn[:1] + [dict(turn[1], value="")])])
    with pytest.warns(UserWarning, match="skipping bad sample"):
        run_inprocess("sft.py", args + [f"--data_path={data}", "--skip_bad=True", "--max_steps=0", "--epochs=3.0"],
                      monkeypatch)
    out = capsys.readouterr().out
    assert "skipping 3 of 8 samples: {'missing image': 1, 'corrupt image': 1, 'empty answer': 1}" in out, out
    # 3 epochs: the truncated image is drawn, and skipped, 3 times
    assert ("skipped 3 more samples during training (images that failed to decode; counted each time one was drawn): "
            "{'corrupt image': 3}") in out, out


@pytest.mark.slow
def test_the_scripts_end_in_one_line_and_status_1(world, tmp_path):
    """Real processes: the line on stderr, status 1, no traceback; a DataLoader worker's error shows as its
    own line too; LUCID_TRACEBACK=1 prints the traceback as well."""
    args, recs = world
    data = write(tmp_path / "mi.json", recs[:3] + [dict(recs[3], image="gone.png")])
    p = run_subprocess("sft.py", args + [f"--data_path={data}"])
    assert_one_line_error(p, "mi.json: record 3 (id ", "image not found: ", "gone.png")
    truncated_png(tmp_path / "images" / "trunc.png", tmp_path / "images" / recs[1]["image"])
    data = write(tmp_path / "tr.json", recs[:3] + [dict(recs[3], image="trunc.png")])
    p = run_subprocess("sft.py", args + [f"--data_path={data}", "--num_workers=1"])  # fails mid-run, in the worker
    assert_one_line_error(p, "tr.json: record 3 (id ", "cannot read image", "trunc.png")
    p = run_subprocess("sft.py", args + [f"--data_path={data}", "--bacth_size=3"])
    assert_one_line_error(p, "'bacth_size'")
    p = run_subprocess("sft.py", args + [f"--data_path={data}", "--init_from=resume"], LUCID_TRACEBACK="1")
    assert p.returncode == 1 and "Traceback" in p.stderr and "FileNotFoundError" in p.stderr


def test_score_only_answers_that_do_not_match_their_questions(tmp_path):
    q = tmp_path / "pope.jsonl"
    q.write_text("".join(json.dumps(dict(question_id=i, image="a.png", text="Is there a cat?", label="yes")) + "\n"
                         for i in range(3)))
    a = tmp_path / "answers.jsonl"
    a.write_text("".join(json.dumps(dict(question_id=i, text="Yes")) + "\n" for i in (0, 1, 2, 7, 8)))
    args = ["--task=pope", f"--data_path={q}", f"--out_dir={tmp_path}/scored"]
    p = run_subprocess("evaluate.py", args + [f"--predictions={a}"], PYTHONWARNINGS="default")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "answers.jsonl: 2 of 5 answers have a question_id that no question of" in p.stderr and "not scored" in p.stderr
    # our warning (raised in tasks/benchmark.py) reads as one line 'warning: ...', not Python's path:line: UserWarning
    assert p.stderr.startswith("warning: ") and "UserWarning" not in p.stderr, p.stderr[:300]
    a.write_text("".join(json.dumps(dict(question_id=i, text="Yes")) + "\n" for i in (7, 8)))
    p = run_subprocess("evaluate.py", args + [f"--predictions={a}"])
    assert_one_line_error(p, "answers.jsonl: none of its 2 answers is to a question of", "pope.jsonl")
    a.write_bytes(b'{"question_id": 0, "text": "Oui \xe9"}\n')
    p = run_subprocess("evaluate.py", args + [f"--predictions={a}"])
    assert_one_line_error(p, "answers.jsonl: line 1: not UTF-8 text")


def test_bad_pair_file_is_one_line(world, tmp_path):
    args, recs = world
    src = next(a.split("=", 1)[1] for a in args if a.startswith("--tokenizer_path=")).rsplit("/", 1)[0]
    tiny_world_vlm(src).save_pretrained(str(tmp_path / "model"))
    pairs = write(tmp_path / "pairs.json", [dict(image=recs[0]["image"], question="What is there?", chosen="A ring.")])
    p = run_subprocess("dpo.py", [f"--init_from={tmp_path}/model", f"--data_path={pairs}", f"--image_root={tmp_path}/images",
                                  "--val_data_path=None", f"--out_dir={tmp_path}/dpo", "--device=cpu"])
    assert_one_line_error(p, "pairs.json: record 0", "'rejected'")
