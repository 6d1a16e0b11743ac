# LLaVA-1.5-7B stage 2: visual instruction tuning. LLM + projector train on llava_v1_5_mix665k with the
# `vicuna_v1` template, images padded to square. Published recipe: lr 2e-5, global batch 128, 1 epoch,
# cosine, warmup 3%, no weight decay, max length 2048; the vision tower stays frozen.
#   torchrun --standalone --nproc_per_node=8 sft.py config/llava15_7b_stage2.py
# Data: liuhaotian/LLaVA-Instruct-150K llava_v1_5_mix665k.json, images (coco, gqa, ocr_vqa, textvqa, vg)
# under data/llava/ as in LLaVA's README. Starts from the stage-1 checkpoint directory.
init_from = "out/llava15-7b-stage1"
data_path = "data/llava/llava_v1_5_mix665k.json"
val_data_path = None
image_root = "data/llava"
template = "vicuna_v1"
pad_to_square = True
max_len = 2048
global_batch_size = 128
micro_batch_size = 16          # x 8 GPUs = 128: no accumulation
epochs = 1.0
lr_vision = 0.0
lr_projector = 2e-5
lr_lm = 2e-5
weight_decay = 0.0
warmup_ratio = 0.03
eval_interval = 1000
num_workers = 8
# LLaVA groups by modality and length within each global batch; we sort windows of 16 global batches
# (`python bench.py --which=data`: random 38 % padding; within one batch 16 % but no faster, since a
# step waits for its slowest rank; windows of 16: 1.7 %, a 0.57x step-time proxy)
group_by_length = 16
gradient_checkpointing = True
distributed = "fsdp"          # 7B weights + grads + AdamW state (~112 GB in fp32) must be sharded over the 8 GPUs
out_dir = "out/llava15-7b-stage2"
wandb_run_name = "llava15-7b-stage2"
