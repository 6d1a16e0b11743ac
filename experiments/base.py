# The shapes world's base model, the starting point of every method experiment: LLaVA's stage 1
# (projector on captions) then stage 2 (LM + projector on the instruction mix), from the world's
# shipped LM and CLIP, over 3 training seeds (the data files are fixed; the seed sets the projector's
# init and the batch order). A method experiment adds its own runs starting from {out}/base/seed{seed}/stage2,
# importing these (from experiments.base import out_dir, runs, seeds).
#   python -m experiments.run experiments/base.py
out_dir = "out/exp_base"
seeds = [1, 2, 3]
# The last step measures the room LLaVA-Reasoner's answer-checked mining has: 16 answers sampled at T = 1.0
# to each of the first 200 mining questions (data/shapes/questions.json), and the share of questions right
# in 25-85 % of them (best_of.json's in_band), where a right and a wrong answer can be paired.
runs = {
    "base": {"steps": ["sft.py config/shapes_stage1.py --seed={seed} --out_dir={dir}/stage1",
                       "sft.py config/shapes_stage2.py --seed={seed} --init_from={dir}/stage1 --out_dir={dir}/stage2",
                       "evaluate.py --task=cot --data_path=data/shapes/questions.json --max_questions=200 --best_of=16 "
                       "--init_from={dir}/stage2 --seed={seed} --out_dir={dir}/band"],
             "model": "{dir}/stage2", "extra": {"band": "{dir}/band/best_of.json", "band_greedy": "{dir}/band/metrics.json"}},
}
