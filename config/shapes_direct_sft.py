# The direct-only baseline of LLaVA-Reasoner's CoT SFT (the paper's row ②, vs CoT SFT ④; config/shapes_cot_sft.py): the same questions'
# direct copies only (the short answer, no rationale), the same recipe, and 2 epochs, so that it takes
# the same number of optimizer steps as the CoT mix (which has each question twice).
#   python sft.py config/shapes_direct_sft.py --init_from=out/shapes_stage2
init_from = "out/shapes_stage2"
data_path = "data/shapes/reasoner_direct.json"
val_data_path = None
image_root = "data/shapes/images"
template = "chat"
max_len = 512
global_batch_size = 32
micro_batch_size = 16
epochs = 2.0
lr_vision = 0.0
lr_projector = 2.5e-4
lr_lm = 2.5e-4
warmup_ratio = 0.03
eval_interval = 100
out_dir = "out/shapes_direct_sft"
wandb_run_name = "shapes-direct-sft"
