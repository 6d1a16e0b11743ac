# Measured on the first shipped LM and CLIP with a 1-epoch stage 2 ("shipped" below means those): re-run it at
# `git checkout dd1b8d3`; since 2026-12-06 models/shapes and config/shapes_stage2.py are the new base's.
# Multiple choice and the LM's attention heads (issue 9): the base (stage 1 + stage 2, default world,
# shipped CLIP) on the shipped LM (4 layers x 128, 4 heads) against an LM of the same size and recipe with
# 8 heads of 16 dimensions (the multiple-choice letter needs several lookups at once: the question's
# object, its colour in the image, the option that names it, the letter before it). Same data, recipe
# and steps. Make the LM first (pretrain_shapes.py's corpus, tokenizer and steps; ~23 minutes here):
#   python pretrain_shapes.py --which=lm --lm_n_head=8 --out_dir=out/models/lm_h8
#   python experiment.py config/exp_lm_heads.py --seeds=[1]
out_dir = "out/exp_lm_heads"
seeds = [1, 2, 3]


def _base(lm):
    return [f"sft.py config/shapes_stage1.py --seed={{seed}} --lm_path={lm} --out_dir={{dir}}/stage1",
            f"sft.py config/shapes_stage2.py --seed={{seed}} --init_from={{dir}}/stage1 --out_dir={{dir}}/stage2"]


runs = {
    "shipped": {"steps": _base("models/shapes/lm"), "model": "{dir}/stage2"},
    "heads8": {"steps": _base("out/models/lm_h8/lm"), "model": "{dir}/stage2"},
}
