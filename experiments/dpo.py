# DPO on the shapes world against the base it starts from: the base runs of experiments/base.py (reused:
# same out_dir, their finished steps are not run again), then for each seed dpo.py on data/shapes/pairs.json
# (the world's true answers vs the co-occurrence prior's) from that seed's stage-2 checkpoint. One table,
# base and dpo side by side; held equal: base checkpoint, pair file, steps, evaluation suite.
#   python -m experiments.run experiments/dpo.py
from experiments.base import out_dir, runs as _base, seeds  # the base runs, their out_dir and seeds: one definition
runs = {
    **_base,
    "dpo": {"steps": ["dpo.py config/shapes_dpo.py --seed={seed} --init_from={out}/base/seed{seed}/stage2 --out_dir={dir}/dpo"],
            "model": "{dir}/dpo"},
}
