# DPO on the shapes world, from the two-stage base (config/shapes_stage2.py): pairs of the world's
# true answer vs the co-occurrence prior's (data/shapes/pairs.json: the absent partner described or
# affirmed, or a colour confused), full fine-tuning of the LM, a frozen copy as the reference.
#   python dpo.py config/shapes_dpo.py
init_from = "out/shapes_stage2"
data_path = "data/shapes/pairs.json"
val_data_path = "data/shapes/pairs_val.json"
image_root = "data/shapes/images"
beta = 0.1
loss_type = "sigmoid"
reference = "copy"
global_batch_size = 16
micro_batch_size = 16
epochs = 1.0
lr_vision = 0.0
lr_projector = 0.0
lr_lm = 2e-5
warmup_ratio = 0.1
eval_interval = 60
out_dir = "out/shapes_dpo"
wandb_run_name = "shapes-dpo"
