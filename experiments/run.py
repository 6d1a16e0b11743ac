"""
Run training pipelines over several seeds, evaluate every result on the shapes suite, and print one
table of mean +- spread: the protocol every method comparison in this repository uses (same base
checkpoint, same data, same steps, only the method differs; >= 3 seeds).

    python -m experiments.run experiments/base.py                 # the base model: stage 1 + stage 2, 3 seeds
    python -m experiments.run experiments/base.py --seeds=[1,2,3,4,5]
    python -m experiments.run experiments/csr.py --only="['base','csr1']"   # some of a config's runs

An experiment config defines `runs`: {name: {"steps": [command, ...], "model": dir, "extra": {key: path},
"eval_args": str}} ("extra" optional: JSON files the steps wrote, tabulated under metrics[key]; "eval_args"
optional: this run's own evaluate.py arguments, e.g. another world's eval suite). Commands are
python scripts with arguments, run in order from the repository root; in them and in "model",
{seed} is the seed, {dir} the run's own directory (<out_dir>/<name>/seed<seed>) and {out} out_dir,
so a method run starts from the base run of the same seed with e.g. --init_from={out}/base/seed{seed}/stage2.
Runs go in the order given, all seeds of one before the next. A step that finished leaves a marker
(<dir>/.step<i>.done) and is not run again, so an interrupted experiment resumes where it stopped.

Writes <out_dir>/results.json ({run: {seed: metrics.json of the model}}) and table.json (the means and
spreads), and prints the table: each figure is mean +- half the range over seeds (min..max would be
as long; with 3 seeds the standard deviation says little more).
"""
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import data as D
from shapes import prepare as W

# -----------------------------------------------------------------------------
out_dir = "out/exp"
seeds = [1, 2, 3]
runs = {}                  # set by the experiment config (see the docstring)
only = []                  # run and tabulate only these runs of the config, e.g. --only="['base','csr1']"
eval_args = ""             # extra arguments for every evaluate.py call
threads = 0                # OMP/torch threads of each step (0 = torch's default)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------

# the figures a reader compares, as (label, task, split, metric); metrics.json has them all
ROWS = [("POPE random acc", "pope", "random", "accuracy"), ("POPE popular acc", "pope", "popular", "accuracy"),
        ("POPE adversarial acc", "pope", "adversarial", "accuracy"),
        ("POPE random FP rate", "pope", "random", "fp_rate"), ("POPE adversarial FP rate", "pope", "adversarial", "fp_rate"),
        ("POPE yes ratio", "pope", "average", "yes_ratio"),
        ("POPE FP rate on absent partners (any category)", "pope", "partner negatives", "yes_rate"),
        ("POPE FP rate on other absent shapes", "pope", "other negatives", "yes_rate"), ("multiple choice", "mc", "overall", "accuracy"),
        ("MC colour/shape, 1 option in the image", "mc", "1 opts in image", "accuracy"),
        ("MC colour/shape, 2 options in the image", "mc", "2 opts in image", "accuracy"),
        ("MC colour/shape, 3 options in the image", "mc", "3 opts in image", "accuracy"),
        ("VQA", "vqa", "overall", "accuracy"), ("VQA exist", "vqa", "exist", "accuracy"),
        ("VQA count", "vqa", "count", "accuracy"), ("VQA color", "vqa", "color", "accuracy"),
        ("VQA shape", "vqa", "shape", "accuracy"), ("VQA position", "vqa", "position", "accuracy"),
        ("knowledge, direct", "knowledge", "overall", "accuracy"), ("knowledge, seen combinations", "knowledge", "seen", "accuracy"),
        ("knowledge, held-out combinations", "knowledge", "held-out", "accuracy"),
        ("knowledge: roll, held-out", "knowledge", "roll held-out", "accuracy"),
        ("knowledge: warm, held-out", "knowledge", "warm held-out", "accuracy"),
        ("knowledge: corners", "knowledge", "corners", "accuracy"),
        ("arithmetic, CoT", "cot", "overall", "accuracy"), ("arithmetic CoT: total", "cot", "total", "accuracy"),
        ("arithmetic CoT: together", "cot", "together", "accuracy"), ("arithmetic CoT: difference", "cot", "difference", "accuracy"),
        ("arithmetic CoT without '### Answer:'", "cot", "overall", "missing_marker"),
        ("arithmetic CoT chain verbatim the true one", "cot", "overall", "chain_exact"),
        ("arithmetic CoT right answer after a chain not verbatim the true one", "cot", "overall", "right_answer_wrong_chain"),
        ("arithmetic CoT chain with every claim true (checked on the scene)", "cot", "overall", "chain_true"),
        ("arithmetic CoT right answers after a chain with a false claim (share of the right ones)", "cot", "overall",
         "right_answer_false_chain"),
        ("mining questions, greedy CoT", "band_greedy", "overall", "accuracy"),
        ("mining questions, greedy chain with every claim true", "band_greedy", "overall", "chain_true"),
        ("mining questions, right answers after a false chain (greedy)", "band_greedy", "overall",
         "right_answer_false_chain"),
        ("arithmetic, direct", "direct_cot", "overall", "accuracy"),
        ("mining questions, one sample right (16 at T=1)", "band", "overall", "sample"),
        ("mining questions right in 25-85 % of 16 samples", "band", "overall", "in_band"),
        ("CoT best-of-N: greedy", "best_of", "overall", "greedy"), ("CoT best-of-N: one sample", "best_of", "overall", "sample"),
        ("CoT best-of-N: majority", "best_of", "overall", "majority"),
        ("CoT best-of-N: verifier", "best_of", "overall", "verifier"), ("CoT best-of-N: oracle", "best_of", "overall", "oracle"),
        ("CoT best-of-N: verifier's within-question AUC", "best_of", "overall", "verifier_auc"),
        ("MME existence acc+", "mme", "existence", "acc_plus"), ("MME count acc+", "mme", "count", "acc_plus"),
        ("MME perception score (4 subtasks, of 800; not a percentage)", "mme", "perception", "score"),
        ("MMBench circular", "mmbench", "overall", "accuracy"), ("MMBench first round alone", "mmbench", "overall", "single"),
        ("CHAIR_S", "chair", "all", "chair_s"),
        ("CHAIR_I", "chair", "all", "chair_i"), ("CHAIR recall", "chair", "all", "recall"),
        ("CHAIR hallucinations that are an absent partner", "chair", "all", "partner_share")]


def fill(s, name, seed):
    return s.format(seed=seed, out=out_dir, dir=os.path.join(out_dir, name, f"seed{seed}"))


def run_step(cmd, log_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {cmd}\n")
        log.flush()
        p = subprocess.run([sys.executable, *shlex.split(cmd)], stdout=log, stderr=subprocess.STDOUT, env=env)
    if p.returncode:
        raise SystemExit(f"step failed (exit {p.returncode}): {cmd}\n  its output: {log_path}")
    return time.time() - t0


def fp_rate(split):
    """POPE's false-positive rate: 'yes' to an absent object = (yes ratio - precision * yes ratio) / share of 'no'."""
    # yes_ratio = (TP + FP) / n, precision = TP / (TP + FP); POPE sets are balanced, so negatives are n / 2
    return 2 * split["yes_ratio"] * (1 - split["precision"]) if "precision" in split else float("nan")


def partner_share(predictions_path):
    """Of the objects CHAIR counts as hallucinated, the share that is the co-occurrence partner of an
    object truly in the image: the hallucination the world's bias invites (None if there are none)."""
    n = partner = 0
    for line in open(predictions_path):
        row = json.loads(line)
        for o in row["hallucinated"]:
            n += 1
            partner += any(W.PARTNER.get(t) == o for t in row["objects"])
    return partner / n if n else None


def figure(metrics, task, split, metric):
    s = metrics.get(task, {}).get(split)
    if s is None:
        return None
    return fp_rate(s) if metric == "fp_rate" else s.get(metric)


if not runs:
    raise SystemExit("no runs: give an experiment config, e.g. python -m experiments.run experiments/base.py")
if unknown := [n for n in only if n not in runs]:
    raise SystemExit(f"--only names runs the config does not have: {unknown}; it has {list(runs)}")
if only:  # a run's steps may start from another run's model: keep the config's order, so those come first
    runs = {n: spec for n, spec in runs.items() if n in only}
os.makedirs(out_dir, exist_ok=True)
results_path = os.path.join(out_dir, "results.json")
results = json.load(open(results_path)) if os.path.exists(results_path) else {}
for name, spec in runs.items():
    for seed in seeds:
        d = fill("{dir}", name, seed)
        os.makedirs(d, exist_ok=True)
        log_path = os.path.join(d, "log.txt")
        for i, step in enumerate(spec["steps"]):
            marker = os.path.join(d, f".step{i}.done")
            if os.path.exists(marker):
                continue
            cmd = fill(step, name, seed)
            print(f"[{name} seed {seed}] step {i + 1}/{len(spec['steps'])}: {cmd}", flush=True)
            dt = run_step(cmd, log_path)
            D.write_atomic(marker, json.dumps({"cmd": cmd, "seconds": round(dt, 1)}))
            print(f"  {dt:.0f}s", flush=True)
        model = fill(spec["model"], name, seed)
        metrics_path = os.path.join(model, "eval", "metrics.json")
        if not os.path.exists(metrics_path):
            print(f"[{name} seed {seed}] evaluate {model}", flush=True)
            run_step(f"evaluate.py --init_from={model} {eval_args} {fill(spec.get('eval_args', ''), name, seed)}", log_path)
        metrics = json.load(open(metrics_path))
        metrics["chair"]["all"]["partner_share"] = partner_share(os.path.join(model, "eval", "chair_predictions.jsonl"))
        for key, path in spec.get("extra", {}).items():
            metrics[key] = json.load(open(fill(path, name, seed)))
        results.setdefault(name, {})[str(seed)] = metrics
        D.write_atomic(results_path, json.dumps(results, indent=1))

# the table: one column per run, mean +- half range over its seeds (percentages)
table = {}
for name in runs:
    per_seed = [results[name][str(s)] for s in seeds]
    for label, task, split, metric in ROWS:
        vals = [figure(m, task, split, metric) for m in per_seed]
        vals = [v * (1 if metric == "score" else 100) for v in vals if v is not None]  # MME's score is no fraction
        if vals:
            table.setdefault(label, {})[name] = {"mean": statistics.fmean(vals), "half_range": (max(vals) - min(vals)) / 2,
                                                 "values": vals}
D.write_atomic(os.path.join(out_dir, "table.json"), json.dumps(table, indent=1))
names = list(runs)
print(f"\nseeds {seeds}; mean +- half range over seeds, percentages\n")
print("| " + " | ".join(["metric"] + names) + " |")
print("|" + "---|" * (len(names) + 1))
for label, cols in table.items():
    cells = [f"{cols[n]['mean']:.1f} ± {cols[n]['half_range']:.1f}" if n in cols else "" for n in names]
    print("| " + " | ".join([label] + cells) + " |")
print(f"\nwrote {results_path} and {os.path.join(out_dir, 'table.json')}")
