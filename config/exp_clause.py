# Measured on the first shipped LM and CLIP with a 1-epoch stage 2 ("shipped" below means those): re-run it at
# `git checkout dd1b8d3`; since 2026-12-06 models/shapes and config/shapes_stage2.py are the new base's.
# Captions that follow the co-occurrence prior (issue 9): the base (stage 1 + stage 2, shipped LM and CLIP)
# on the default world, whose stage-2 descriptions name an object with its partner ("A red circle is at
# the top, with a square nearby."; prepare_shapes.py's partner_clause, the default since 2026-12-06),
# against the world without the clause, same seeds, same stage-1 captions, same recipe and steps, each
# evaluated on its own world's eval files (the same scenes, questions and options; only CHAIR's unscored
# reference captions differ). Make the second world first:
#   python prepare_shapes.py --partner_clause=False --out_dir=data/shapes_plain
#   python experiment.py config/exp_clause.py
out_dir = "out/exp_clause"
seeds = [1, 2, 3]


def _base(data):
    files = f"--image_root={data}/images --out_dir={{dir}}"
    return [f"sft.py config/shapes_stage1.py --seed={{seed}} --data_path={data}/captions.json "
            f"--val_data_path={data}/captions_val.json {files}/stage1",
            f"sft.py config/shapes_stage2.py --seed={{seed}} --init_from={{dir}}/stage1 "
            f"--data_path={data}/train.json --val_data_path={data}/val.json {files}/stage2"]


runs = {
    "base": {"steps": _base("data/shapes_plain"), "model": "{dir}/stage2",
             "eval_args": "--shapes_dir=data/shapes_plain/eval --image_root=data/shapes_plain/images"},
    "clause": {"steps": _base("data/shapes"), "model": "{dir}/stage2"},
}
