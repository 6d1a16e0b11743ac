# Multiple choice with hard wrong options (issue 9): the base (stage 1 + stage 2, shipped LM and CLIP)
# trained on data whose multiple-choice questions take their wrong options from the scene itself
# (prepare_shapes.py --mc_hard), against the same world without it, same seeds, same recipe and steps; the
# eval files are the plain world's (their multiple-choice options stay random). Measured on the world before
# partner_clause (seed 1, README); make both worlds first:
#   python prepare_shapes.py --partner_clause=False --out_dir=data/shapes_plain
#   python prepare_shapes.py --partner_clause=False --mc_hard=0.7 --out_dir=data/shapes_mch
#   python experiment.py config/exp_mc.py --seeds=[1]
out_dir = "out/exp_mc"
seeds = [1, 2, 3]


def _base(data):
    files = f"--image_root={data}/images --out_dir={{dir}}"
    return [f"sft.py config/shapes_stage1.py --seed={{seed}} --data_path={data}/captions.json "
            f"--val_data_path={data}/captions_val.json {files}/stage1",
            f"sft.py config/shapes_stage2.py --seed={{seed}} --init_from={{dir}}/stage1 "
            f"--data_path={data}/train.json --val_data_path={data}/val.json {files}/stage2"]


_EVAL = "--shapes_dir=data/shapes_plain/eval --image_root=data/shapes_plain/images"
runs = {
    "base": {"steps": _base("data/shapes_plain"), "model": "{dir}/stage2", "eval_args": _EVAL},
    "mc_hard": {"steps": _base("data/shapes_mch"), "model": "{dir}/stage2", "eval_args": _EVAL},
}
