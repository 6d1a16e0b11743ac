# REVERIE on LLaVA-1.5-7B with LoRA, the setting of the paper's table (LLaVA-1.5-7B-LoRA 76.3 -> 80.5 on
# ScienceQA-IMG): LLaVA-1.5's finetune_lora.sh recipe, r 128, alpha 256, lr 2e-4 for the adapters and
# 2e-5 for the projector, global batch 128, 1 epoch. The LM's own weights stay frozen; the checkpoint
# holds the merged weights. Same data as config/llava15_7b_reverie.py (run prepare_reverie.py first).
#   torchrun --standalone --nproc_per_node=8 sft.py config/llava15_7b_reverie_lora.py
exec(open("config/llava15_7b_reverie.py").read())
lora_r = 128
lora_alpha = 256
lr_lm = 2e-4
lr_projector = 2e-5
distributed = "ddp"           # the frozen LM and the adapters fit one 80 GB GPU with gradient checkpointing
out_dir = "out/llava15-7b-reverie-lora"
wandb_run_name = "llava15-7b-reverie-lora"
