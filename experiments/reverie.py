# Reflective instruction tuning (REVERIE) on the shapes world: stage 2 on the instruction mix plus the
# world's 2,000 REVERIE questions (data/shapes/reverie_raw.json: a correct and a confusing answer,
# two rationales from the scene graph), answer-only vs with rationales, from each seed's stage-1
# checkpoint of experiments/base.py (same out_dir: finished base steps are reused).
# Held equal between answer_only and reflective: the stage-1 checkpoint, the instruction mix, the 2,000
# questions, the number of rows (answer_only repeats each question's answer once per row reflective
# has: answer_rows=match), hence the optimizer steps and the answer tokens; only the rationale turns
# differ. The ablations (one row per question: positive, negative, joint) compare with answer_only_one.
#   python -m experiments.run experiments/reverie.py                       # all runs
#   python -m experiments.run experiments/reverie.py --only="['base','answer_only','reflective']"
from experiments.base import out_dir, runs as _base, seeds  # the base runs, their out_dir and seeds: one definition
_BASE = _base["base"]["steps"]


def reverie(args):
    """prepare_reverie.py with these settings, then stage 2 from the base run's stage 1 on the mix + its rows."""
    return {"steps": [f"prepare_reverie.py {args} --out_path={{dir}}/reverie.json",
                      "sft.py config/shapes_stage2.py --seed={seed} --init_from={out}/base/seed{seed}/stage1 "
                      "--data_path=data/shapes/train.json,{dir}/reverie.json --out_dir={dir}/stage2"],
            "model": "{dir}/stage2"}


runs = {
    "base": {"steps": _BASE, "model": "{dir}/stage2"},
    "answer_only": reverie("--rationales=none --answer_rows=match"),
    "reflective": reverie("--rationales=both"),
    "answer_only_one": reverie("--rationales=none --answer_rows=one"),
    "positive_only": reverie("--rationales=positive"),
    "negative_only": reverie("--rationales=negative"),
    "joint": reverie("--rationales=both --layout=joint"),
}
