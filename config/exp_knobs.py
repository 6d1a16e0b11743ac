# Measured on the first shipped LM and CLIP with a 1-epoch stage 2 ("shipped" below means those): re-run it at
# `git checkout dd1b8d3`; since 2026-12-06 models/shapes and config/shapes_stage2.py are the new base's.
# Issue 9's knob tries, one seed (README: "Small objects, a deeper LM, multiple-choice recall"): the base
# (stage 1 + stage 2) on the shipped LM and CLIP, on a 6-layer LM, and on the small-object world (30 % of
# the objects drawn small, the annotator naming them as partners; its own CLIP, position-aware) with the
# shipped LM and with the 6-layer one; and the shipped LM after 1,500 more steps with multiple-choice recall
# facts; and the base on data whose multiple-choice questions take their wrong options from the scene itself
# (mc_hard). All on the world before partner_clause (the default then). Make those worlds and models first
# (2,340 s for the 6-layer LM, 211 s for the CLIP, 609 s for the continued LM on the 2-core machine):
#   python prepare_shapes.py --partner_clause=False --out_dir=data/shapes_plain
#   python prepare_shapes.py --partner_clause=False --mc_hard=0.7 --out_dir=data/shapes_mch
#   python prepare_shapes.py --partner_clause=False --small_p=0.3 --out_dir=data/shapes_s30
#   python pretrain_shapes.py --which=clip --small_p=0.3 --clip_position=1 --out_dir=out/models/clip_s30
#   python pretrain_shapes.py --which=lm --lm_n_layer=6 --out_dir=out/models/lm6
#   python pretrain_shapes.py --which=lm --lm_init=models/shapes/lm --lm_steps=1500 --recall_mc=0.3 --lm_lr=1e-3 --out_dir=out/models/lm_mc
#   python experiment.py config/exp_knobs.py
out_dir = "out/exp_knobs"
seeds = [1]
_LM6, _LM_MC, _CLIP = "out/models/lm6/lm", "out/models/lm_mc/lm", "out/models/clip_s30/clip"


def _base(lm="models/shapes/lm", clip="models/shapes/clip", data="data/shapes_plain"):
    """LLaVA's two stages from this LM and CLIP on this world's files."""
    files = f"--image_root={data}/images --out_dir={{dir}}"
    return [f"sft.py config/shapes_stage1.py --seed={{seed}} --lm_path={lm} --vision_path={clip} "
            f"--data_path={data}/captions.json --val_data_path={data}/captions_val.json {files}/stage1",
            f"sft.py config/shapes_stage2.py --seed={{seed}} --init_from={{dir}}/stage1 "
            f"--data_path={data}/train.json --val_data_path={data}/val.json {files}/stage2"]


_SMALL = {"eval_args": "--shapes_dir=data/shapes_s30/eval --image_root=data/shapes_s30/images"}
_PLAIN = {"eval_args": "--shapes_dir=data/shapes_plain/eval --image_root=data/shapes_plain/images"}
runs = {
    "shipped": {"steps": _base(), "model": "{dir}/stage2", **_PLAIN},
    "lm6": {"steps": _base(lm=_LM6), "model": "{dir}/stage2", **_PLAIN},
    "lm_mc": {"steps": _base(lm=_LM_MC), "model": "{dir}/stage2", **_PLAIN},
    "mc_hard": {"steps": _base(data="data/shapes_mch"), "model": "{dir}/stage2", **_PLAIN},
    "small": {"steps": _base(clip=_CLIP, data="data/shapes_s30"), "model": "{dir}/stage2", **_SMALL},
    "small_lm6": {"steps": _base(lm=_LM6, clip=_CLIP, data="data/shapes_s30"), "model": "{dir}/stage2", **_SMALL},
}
