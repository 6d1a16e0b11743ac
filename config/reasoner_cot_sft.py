# LLaVA-Reasoner's CoT SFT (Zhang et al. 2024): ShareGPT-4o-Reasoning's 193k GPT-4o rationales (each
# ending '### Answer: X') mixed with direct-answer copies of the same questions, the prompt suffix alone
# selecting the mode (CoT: "Generate a reason first and then output a short answer."; direct: "Answer the
# question with a short answer."). Published recipe: 1 epoch, lr 5e-6 (vision tower 5e-7), global batch
# 32, cosine, warmup 3 %.
#   torchrun --standalone --nproc_per_node=8 sft.py config/reasoner_cot_sft.py
# The paper starts from LLaMA3-LLaVA-NeXT-8B, whose any-resolution image tiling model.py does not
# implement; this config starts from the LLaVA-1.5-7B that model.py reads (llava-hf format) instead.
# Data: LLaVA conversation records (the format ShareGPT-4o-Reasoning ships), CoT and direct samples in
# one file or several ("cot.json:1.0,direct.json:1.0"); images under image_root.
init_from = "llava-hf/llava-1.5-7b-hf"
data_path = "data/reasoner/sft_mix.json"
val_data_path = None
image_root = "data/reasoner/images"
template = "vicuna_v1"
pad_to_square = True
max_len = 2048
global_batch_size = 32
micro_batch_size = 4           # x 8 GPUs = 32: no accumulation
epochs = 1.0
lr_vision = 5e-7
lr_projector = 5e-6
lr_lm = 5e-6
weight_decay = 0.0
warmup_ratio = 0.03
eval_interval = 1000
num_workers = 8
gradient_checkpointing = True
distributed = "fsdp"           # 7B full fine-tuning: weights + grads + AdamW state sharded over the 8 GPUs
out_dir = "out/reasoner-cot-sft"
wandb_run_name = "reasoner-cot-sft"
