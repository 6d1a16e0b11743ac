# LLaVA-Reasoner's CoT SFT on the shapes world, from the two-stage base (config/shapes_stage2.py): each
# question of reasoner_sft.json twice, as a CoT sample (rationale, then '### Answer: X') and a direct one
# (X), the prompt suffix alone selecting the mode. The paper's recipe (1 epoch, cosine, warmup 3 %, batch
# 32) at the base's own scale: its lr is a quarter of the stage before it (5e-6 after LLaVA-NeXT's 2e-5),
# so here a quarter of stage 2's 1e-3. The vision tower stays frozen, as in the world's stage 2 (the
# paper trains it at a tenth of the LM's lr).
#   python sft.py config/shapes_cot_sft.py --init_from=out/shapes_stage2
init_from = "out/shapes_stage2"
data_path = "data/shapes/reasoner_sft.json"
val_data_path = None
image_root = "data/shapes/images"
template = "chat"
max_len = 512
global_batch_size = 32
micro_batch_size = 16
epochs = 1.0
lr_vision = 0.0
lr_projector = 2.5e-4
lr_lm = 2.5e-4
warmup_ratio = 0.03
eval_interval = 100
out_dir = "out/shapes_cot_sft"
wandb_run_name = "shapes-cot-sft"
