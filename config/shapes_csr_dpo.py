# CSR's DPO step on the shapes world: the recipe's shape (LoRA on the LM, the reference = the same
# network with its adapters off, i.e. the previous iteration; sigmoid loss, beta 0.1, 1 epoch), with
# the learning rate of a model this small (CSR's 1e-7 is for LoRA r 128 on a 7B model).
#   python dpo.py config/shapes_csr_dpo.py --init_from=out/shapes_stage2 --data_path=out/shapes_csr/pairs.json
init_from = "out/shapes_stage2"
data_path = "out/shapes_csr/pairs.json"
val_data_path = None
image_root = "data/shapes/images"
beta = 0.1
loss_type = "sigmoid"
reference = "adapters_off"
lora_r = 16
lora_alpha = 32
global_batch_size = 16
micro_batch_size = 16
epochs = 1.0
lr_vision = 0.0
lr_projector = 0.0
lr_lm = 5e-4
warmup_ratio = 0.1
eval_interval = 1000
out_dir = "out/shapes_csr_dpo"
wandb_run_name = "shapes-csr-dpo"
