"""
The shapes suite: the synthetic world's evaluation sets in the seven benchmarks' real formats (written by
`python -m shapes.prepare` into data/shapes/eval/), scored by the same rules as the real files. The world
knows each image, which adds one split no real benchmark has: multiple choice by how many of a colour or
shape question's options are in the image, where "pick an option that is there" scores 100 % at 1 and
1 in k at k (a prior the base model was found to lean on).
"""
import json
import os

from tasks.prompts import DIRECT_SUFFIX

# the suite's files in its directory (MME's per-subtask answer files are in its mme/ folder); an entry is
# scored by the benchmark of its name unless SCORER says otherwise, and asked in that benchmark's mode
# unless SUFFIX gives another: the knowledge questions are short answers (VQA's rule), and the arithmetic
# of cot.jsonl is asked a second time in LLaVA-Reasoner's direct mode
FILES = dict(pope="pope.jsonl", mc="mc.jsonl", vqa="vqa.jsonl", cot="cot.jsonl", chair="chair.jsonl",
             mme="mme.jsonl", mmbench="mmbench.tsv", knowledge="knowledge.jsonl", direct_cot="cot.jsonl")
SCORER = dict(knowledge="vqa", direct_cot="vqa")
SUFFIX = dict(direct_cot=DIRECT_SUFFIX)


def held_out_splits(metrics):
    """The knowledge questions pooled by whether their rule-object combination was held out of training:
    {'seen': ..., 'held-out': ...} from the '<rule> seen' / '<rule> held-out' splits (accuracy weighted by n)."""
    out = {}
    for which in ('seen', 'held-out'):
        parts = [m for split, m in metrics.items() if split.endswith(' ' + which)]
        if parts:
            n = sum(m['n'] for m in parts)
            out[which] = dict(accuracy=sum(m['accuracy'] * m['n'] for m in parts) / n, n=n)
    return out


def options_in_image(scene, category, options):
    """How many of a colour or shape question's options are a colour / shape of some object in the scene
    (None for the other kinds). A model that only asks "is this option in the image" is right every time
    at 1 and 1 in k at k."""
    if category not in ('color', 'shape'):
        return None
    present = {o[category] for o in scene['objects']}
    return sum(o in present for o in options)


def mc_by_options_in_image(mc_rows, scenes_file, judge):
    """{'<k> opts in image': dict(accuracy, n)} over the mc rows whose image is an eval scene of
    scenes_file (the world's scene graphs); judge(row) -> the verdict dict with its 'score'."""
    with open(scenes_file) as f:
        scenes = {sc["id"]: sc for sc in json.load(f)["eval"]}
    groups = {}
    for r in mc_rows:
        scene = scenes.get(os.path.splitext(os.path.basename(r["image"] or ""))[0])
        k = scene and options_in_image(scene, r.get("category"), r["options"])
        if k:
            groups.setdefault(f"{k} opts in image", []).append(judge(r)["score"])
    return {split: dict(accuracy=sum(g) / len(g), n=len(g)) for split, g in sorted(groups.items())}
