# Captions that follow the co-occurrence prior (issue 9): the base (stage 1 + stage 2, shipped LM and CLIP)
# trained on a world whose descriptions name an object with its partner ("A red circle is at the top,
# with a square nearby."; prepare_shapes.py --partner_clause) against the default world, same seeds,
# same recipe and steps, each evaluated on its own world's eval files (the same scenes, questions and
# options; only CHAIR's reference captions differ, and they are not scored). Make the data first:
#   python prepare_shapes.py --partner_clause=True --out_dir=data/shapes_pc
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
    "base": {"steps": _base("data/shapes"), "model": "{dir}/stage2"},
    "clause": {"steps": _base("data/shapes_pc"), "model": "{dir}/stage2",
               "eval_args": "--shapes_dir=data/shapes_pc/eval --image_root=data/shapes_pc/images"},
}
