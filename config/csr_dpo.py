# Calibrated self-rewarding's DPO (Zhou et al. 2024, CSR): on the model's best vs worst calibrated
# descriptions (selfreward.py, CSR mode), sigmoid loss on summed log-probs, beta 0.1, LoRA r 128 /
# alpha 256 on the LM, lr 1e-7 with the projector at 2e-5, 1 epoch, batch 1 per GPU; the reference is
# the same network with its adapters off (the previous iteration). The checkpoint holds the merged
# model: the next iteration's init_from.
#   torchrun --standalone --nproc_per_node=8 dpo.py config/csr_dpo.py
# Data: CSR's format, {"id", "image", "conversations", "rejected_conversations"} (json list).
init_from = "llava-hf/llava-1.5-7b-hf"
data_path = "out/csr-sample1/pairs.json"   # from: torchrun ... selfreward.py config/csr_sample.py
val_data_path = None
image_root = "data/coco/train2014"
beta = 0.1
loss_type = "sigmoid"
reference = "adapters_off"
lora_r = 128
lora_alpha = 256
lora_dropout = 0.0             # LLaVA's scripts set 0.05, but the released run had none in effect: TRL's disable_dropout=True
max_len = 2048
global_batch_size = 8
micro_batch_size = 1           # x 8 GPUs = 8
epochs = 1.0
lr_vision = 0.0
lr_projector = 2e-5
lr_lm = 1e-7
warmup_ratio = 0.03
eval_interval = 500
num_workers = 8
gradient_checkpointing = True
distributed = "ddp"            # LoRA: the trainable state is small, every GPU holds the whole (bf16) model
out_dir = "out/csr-iter1"
wandb_run_name = "csr-iter1"
