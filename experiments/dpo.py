# DPO on the shapes world against the base it starts from: the base runs of experiments/base.py (reused:
# same out_dir, their finished steps are not run again), then for each seed dpo.py on data/shapes/pairs.json
# (the world's true answers vs the co-occurrence prior's) from that seed's stage-2 checkpoint. One table,
# base and dpo side by side; held equal: base checkpoint, pair file, steps, evaluation suite.
#   python -m experiments.run experiments/dpo.py
out_dir = "out/exp_base"
seeds = [1, 2, 3]
runs = {
    "base": {"steps": ["sft.py config/shapes_stage1.py --seed={seed} --out_dir={dir}/stage1",
                       "sft.py config/shapes_stage2.py --seed={seed} --init_from={dir}/stage1 --out_dir={dir}/stage2"],
             "model": "{dir}/stage2"},
    "dpo": {"steps": ["dpo.py config/shapes_dpo.py --seed={seed} --init_from={out}/base/seed{seed}/stage2 --out_dir={dir}/dpo"],
            "model": "{dir}/dpo"},
}
