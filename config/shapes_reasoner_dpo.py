# LLaVA-Reasoner's DPO on the shapes world (config/reasoner_dpo.py's recipe at this scale): pairs of the
# CoT-SFT model's own correct vs incorrect chains (config/shapes_reasoner_sample.py), sigmoid loss on
# summed log-probs, beta 0.1, 1 epoch, the reference a frozen copy of the SFT model, vision tower and
# projector frozen, chosen and rejected cut to their first 90 words and not taught to end there, no SFT
# term. The lr keeps the paper's ratio to its SFT (5e-7 after 5e-6): a tenth of config/shapes_cot_sft.py's.
# The batch is 16, not 32: a CPU-sized mining run gives hundreds of pairs, not 64.8k.
#   python dpo.py config/shapes_reasoner_dpo.py --init_from=out/shapes_cot_sft --data_path=out/shapes_reasoner_pairs/pairs.json
init_from = "out/shapes_cot_sft"
data_path = "out/shapes_reasoner_pairs/pairs.json"
val_data_path = None
image_root = "data/shapes/images"
beta = 0.1
loss_type = "sigmoid"
reference = "copy"
max_words = 90
drop_eos = True
global_batch_size = 16
micro_batch_size = 16
epochs = 1.0
lr_vision = 0.0
lr_projector = 0.0
lr_lm = 2.5e-5
warmup_ratio = 0.03
eval_interval = 1000
out_dir = "out/shapes_reasoner_dpo"
wandb_run_name = "shapes-reasoner-dpo"
