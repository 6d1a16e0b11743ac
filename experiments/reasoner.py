# LLaVA-Reasoner on the shapes world, from the base runs of experiments/base.py (same out_dir: finished
# base steps are reused): the direct-only baseline (the paper's ②: direct answers only) vs CoT SFT (CoT + direct copies
# of the same questions), then from the CoT-SFT model: mine answer-checked pairs on other scenes'
# questions, DPO on them, and best-of-8 on the CoT eval set with the DPO model as the verifier
# (reward log pi_dpo / pi_sft of candidates the SFT model samples) vs the majority answer vs greedy;
# every model also answers the CoT eval questions in the direct mode (the shapes suite's direct_cot).
# Variations of the DPO step: ten times its lr; four times the mining questions; pairs checked by the
# whole chain (an oracle).
# Held equal: the seed's base checkpoint, the 3,000 SFT questions and the optimizer steps (the direct
# baseline takes 2 epochs of its half-size file), the evaluation suite.
#   python -m experiments.run experiments/reasoner.py
from experiments.base import out_dir, runs as _base, seeds  # the base runs, their out_dir and seeds: one definition
_SFT = "{out}/cot_sft/seed{seed}/sft"


def reasoner(sample="", dpo="", pairs=None):
    """From the seed's CoT-SFT model: mine pairs (unless given), DPO on them, best-of-8 with the DPO
    model as the verifier of the SFT model's samples."""
    steps = []
    if pairs is None:
        steps.append(f"selfreward.py config/shapes_reasoner_sample.py --seed={{seed}} --init_from={_SFT} --out_dir={{dir}}/pairs {sample}")
        pairs = "{dir}/pairs/pairs.json"
    steps += [f"dpo.py config/shapes_reasoner_dpo.py --seed={{seed}} --init_from={_SFT} --data_path={pairs} --out_dir={{dir}}/dpo {dpo}",
              f"evaluate.py --task=cot --data_path=data/shapes/eval/cot.jsonl --init_from={_SFT} --best_of=8 "
              "--verifier={dir}/dpo --seed={seed} --out_dir={dir}/best_of"]
    return {"steps": steps, "model": "{dir}/dpo", "extra": {"best_of": "{dir}/best_of/best_of.json"}}
runs = {
    **_base,
    "direct_sft": {"steps": ["sft.py config/shapes_direct_sft.py --seed={seed} --init_from={out}/base/seed{seed}/stage2 "
                             "--out_dir={dir}/sft"], "model": "{dir}/sft"},
    "cot_sft": {"steps": ["sft.py config/shapes_cot_sft.py --seed={seed} --init_from={out}/base/seed{seed}/stage2 "
                          "--out_dir={dir}/sft"], "model": "{dir}/sft"},
    "cot_dpo": reasoner(),
    # the DPO recipe's lr is the paper's ratio to its SFT; ten times that, on the same pairs
    "cot_dpo_lr10": reasoner(dpo="--lr_lm=2.5e-4", pairs="{out}/cot_dpo/seed{seed}/pairs/pairs.json"),
    # all 2,000 mining questions instead of 500: about 4x the pairs (and DPO steps)
    "cot_dpo_2000q": reasoner(sample="--max_prompts=2000"),
    # an oracle no real data set offers, to measure what the outcome check costs: a sample counts as
    # right only when its whole chain is the gold one (selfreward.py --check=chain)
    "cot_dpo_chain": reasoner(sample="--check=chain"),
}

