# LLaVA-Reasoner's DPO (Zhang et al. 2024, "Improve Vision Language Model Chain-of-thought Reasoning"):
# on pairs of the CoT-SFT model's own correct vs incorrect reasoning chains (selfreward.py answer mode),
# sigmoid loss on summed log-probs, beta 0.1, lr 5e-7, 1 epoch, global batch 32, the reference a frozen
# copy of the SFT model, vision tower and projector frozen, chosen and rejected cut to their first 90
# words (and, cut, not taught to end there), no SFT term.
#   torchrun --standalone --nproc_per_node=8 dpo.py config/reasoner_dpo.py
# Data: LLaVA-Reasoner's format, one {"id", "image", "question", "chosen", "rejected"} per line.
init_from = "out/reasoner-cot-sft"
data_path = "data/reasoner/dpo_pairs.jsonl"
val_data_path = None
image_root = "data/reasoner/images"
beta = 0.1
loss_type = "sigmoid"
reference = "copy"
max_words = 90
drop_eos = True
max_len = 2048
global_batch_size = 32
micro_batch_size = 4           # x 8 GPUs = 32: no accumulation
epochs = 1.0
lr_vision = 0.0
lr_projector = 0.0
lr_lm = 5e-7
warmup_ratio = 0.03
eval_interval = 500
num_workers = 8
gradient_checkpointing = True
distributed = "fsdp"           # the policy's weights, grads and AdamW state and the reference copy, sharded
out_dir = "out/reasoner-dpo"
wandb_run_name = "reasoner-dpo"
