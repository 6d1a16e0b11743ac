# The shapes world's base model, the starting point of every method experiment: LLaVA's stage 1
# (projector on captions) then stage 2 (LM + projector on the instruction mix), from the world's
# shipped LM and CLIP, over 3 training seeds (the data files are fixed; the seed sets the projector's
# init and the batch order). A method experiment adds its own runs starting from {out}/base/seed{seed}/stage2,
# importing these (from experiments.base import out_dir, runs, seeds).
#   python -m experiments.run experiments/base.py
out_dir = "out/exp_base"
seeds = [1, 2, 3]
runs = {
    "base": {"steps": ["sft.py config/shapes_stage1.py --seed={seed} --out_dir={dir}/stage1",
                       "sft.py config/shapes_stage2.py --seed={seed} --init_from={dir}/stage1 --out_dir={dir}/stage2"],
             "model": "{dir}/stage2"},
}
