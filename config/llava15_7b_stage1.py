# LLaVA-1.5-7B stage 1: feature alignment. Only the projector trains, on LCS-558K captions with the
# `plain` template (<image> + caption, caption supervised). Published recipe: lr 1e-3, global batch 256,
# 1 epoch, cosine, warmup 3%, no weight decay, max length 2048.
#   torchrun --standalone --nproc_per_node=8 sft.py config/llava15_7b_stage1.py
# Data: liuhaotian/LLaVA-Pretrain (blip_laion_cc_sbu_558k.json + images/), unpacked under data/llava/.
init_from = "parts"
lm_path = "lmsys/vicuna-7b-v1.5"
vision_path = "openai/clip-vit-large-patch14-336"
tokenizer_path = "lmsys/vicuna-7b-v1.5"
projector_type = "mlp2x_gelu"
vision_feature_layer = -2
data_path = "data/llava/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
val_data_path = None
image_root = "data/llava/LLaVA-Pretrain/images"
template = "plain"
pad_to_square = False          # LLaVA-1.5 pads to square only in stage 2
max_len = 2048
global_batch_size = 256
micro_batch_size = 32          # x 8 GPUs = 256: no accumulation
epochs = 1.0
lr_vision = 0.0                # frozen
lr_projector = 1e-3
lr_lm = 0.0                    # frozen
weight_decay = 0.0
warmup_ratio = 0.03
eval_interval = 500
num_workers = 8
gradient_checkpointing = True
out_dir = "out/llava15-7b-stage1"
wandb_run_name = "llava15-7b-stage1"
