# LLaVA-Reasoner on the shapes world, from the base runs of config/exp_base.py (same out_dir: finished
# base steps are reused): the format-only baseline (direct answers only) vs CoT SFT (CoT + direct copies
# of the same questions), then from the CoT-SFT model: mine answer-checked pairs on other scenes'
# questions, DPO on them, and best-of-8 on the CoT eval set with the DPO model as the verifier
# (reward log pi_dpo / pi_sft of candidates the SFT model samples) vs the majority answer vs greedy.
# Held equal: the seed's base checkpoint, the 3,000 SFT questions and the optimizer steps (the direct
# baseline takes 2 epochs of its half-size file), the evaluation suite.
#   python experiment.py config/exp_reasoner.py
out_dir = "out/exp_base"
seeds = [1, 2, 3]
_BASE = ["sft.py config/shapes_stage1.py --seed={seed} --out_dir={dir}/stage1",
         "sft.py config/shapes_stage2.py --seed={seed} --init_from={dir}/stage1 --out_dir={dir}/stage2"]
_SFT = "{out}/cot_sft/seed{seed}/sft"
runs = {
    "base": {"steps": _BASE, "model": "{dir}/stage2"},
    "direct_sft": {"steps": ["sft.py config/shapes_direct_sft.py --seed={seed} --init_from={out}/base/seed{seed}/stage2 "
                             "--out_dir={dir}/sft"], "model": "{dir}/sft"},
    "cot_sft": {"steps": ["sft.py config/shapes_cot_sft.py --seed={seed} --init_from={out}/base/seed{seed}/stage2 "
                          "--out_dir={dir}/sft"], "model": "{dir}/sft"},
    "cot_dpo": {"steps": [f"selfreward.py config/shapes_reasoner_sample.py --seed={{seed}} --init_from={_SFT} --out_dir={{dir}}/pairs",
                          f"dpo.py config/shapes_reasoner_dpo.py --seed={{seed}} --init_from={_SFT} "
                          "--data_path={dir}/pairs/pairs.json --out_dir={dir}/dpo",
                          f"evaluate.py --task=cot --data_path=data/shapes/eval/cot.jsonl --init_from={_SFT} --best_of=8 "
                          "--verifier={dir}/dpo --seed={seed} --out_dir={dir}/best_of"],
                "model": "{dir}/dpo", "extra": {"best_of": "{dir}/best_of/best_of.json"}},
}
