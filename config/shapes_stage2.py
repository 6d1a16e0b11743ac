# The shapes world's LLaVA stage 2: visual instruction tuning. LM + projector train on the world's
# instruction mix (descriptions, yes/no, counting, attributes, positions, multiple choice, CoT) with the
# LM's chat template, from the stage-1 checkpoint; the vision tower stays frozen.
#   python sft.py config/shapes_stage2.py        (after config/shapes_stage1.py)
init_from = "out/shapes_stage1"
data_path = "data/shapes/train.json"
val_data_path = "data/shapes/val.json"
image_root = "data/shapes/images"
template = "chat"
max_len = 512
global_batch_size = 32
micro_batch_size = 16
epochs = 2.0            # LLaVA-1.5 does 1; here 1 epoch left the base (on today's LM, with the position-blind
                        # CLIP) naming the wrong partner in its clauses ("A red ring ..., with a ring nearby"): docs/log.md
group_by_length = 16    # sort windows of 16 batches by length, as LLaVA-1.5's group_by_modality_length: the world's
                        # conversations run 20-370 tokens, and random batches were 43 % padding (stage 2: 363-414 s vs 598 s)
lr_vision = 0.0
lr_projector = 1e-3
lr_lm = 1e-3
warmup_ratio = 0.03
eval_interval = 100
out_dir = "out/shapes_stage2"
wandb_run_name = "shapes-stage2"
