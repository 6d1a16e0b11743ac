# The shapes world's LLaVA stage 1: feature alignment, as LLaVA-1.5 does it, in miniature. Only the
# projector trains, on one caption per training scene with the `plain` template (<image> + caption),
# starting from the world's pretrained LM (the stand-in for Vicuna) and CLIP (for OpenAI CLIP), both
# shipped in shapes/models/ (regenerate with `python -m shapes.pretrain`).
#   python sft.py config/shapes_stage1.py        (after python -m shapes.prepare)
init_from = "parts"
lm_path = "shapes/models/lm"
vision_path = "shapes/models/clip"
tokenizer_path = None          # the LM's own, as with Vicuna
projector_type = "mlp2x_gelu"
vision_feature_layer = -2
data_path = "data/shapes/captions.json"
val_data_path = "data/shapes/captions_val.json"
image_root = "data/shapes/images"
template = "plain"
max_len = 512
global_batch_size = 32
micro_batch_size = 32
epochs = 1.0
lr_vision = 0.0                # frozen
lr_projector = 3e-3
lr_lm = 0.0                    # frozen
warmup_ratio = 0.03
eval_interval = 100
out_dir = "out/shapes_stage1"
wandb_run_name = "shapes-stage1"
