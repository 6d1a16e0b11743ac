"""experiments/run.py, the seed protocol every results table uses: each run's steps once per seed (a
finished step is not run again when the experiment is resumed), each model's metrics read, one table of
mean and half range over the seeds. The step here is a tiny script that writes a model's evaluation
files as evaluate.py would, so no model is trained."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_STEP = '''import json, os, sys
d, seed = sys.argv[1], int(sys.argv[2])
os.makedirs(d + "/m/eval", exist_ok=True)
open(d + "/calls", "a").write("x")
json.dump({"mc": {"overall": {"accuracy": seed / 10}}, "chair": {"all": {"chair_s": 0.1}}},
          open(d + "/m/eval/metrics.json", "w"))
row = {"objects": ["circle"], "hallucinated": ["square", "ring"][:seed]}  # square: the circle's partner
open(d + "/m/eval/chair_predictions.jsonl", "w").write(json.dumps(row) + "\\n")
'''


def run(tmp_path):
    (tmp_path / "step.py").write_text(FAKE_STEP)
    cfg = tmp_path / "exp.py"
    cfg.write_text(f"out_dir = {str(tmp_path / 'out')!r}\nseeds = [1, 3]\n"
                   f"runs = {{'a': {{'steps': ['{tmp_path}/step.py {{dir}} {{seed}}'], 'model': '{{dir}}/m'}}}}\n")
    r = subprocess.run([sys.executable, "-m", "experiments.run", str(cfg)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_experiment_tables_mean_and_half_range_and_resumes(tmp_path):
    out = run(tmp_path)
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    mc = table["multiple choice"]["a"]
    assert mc["values"] == [10.0, 30.0] and mc["mean"] == 20.0 and mc["half_range"] == 10.0
    # of the hallucinated objects, the share that is the partner of an object in the image
    assert table["CHAIR hallucinations that are an absent partner"]["a"]["values"] == [100.0, 50.0]
    assert "| multiple choice | 20.0 ± 10.0 |" in out
    assert set(json.loads((tmp_path / "out" / "results.json").read_text())["a"]) == {"1", "3"}
    run(tmp_path)  # resumed: every step has its marker, nothing runs again
    for seed in (1, 3):
        assert (tmp_path / "out" / "a" / f"seed{seed}" / "calls").read_text() == "x"
