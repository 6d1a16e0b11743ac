# REVERIE's recipe on LLaVA-1.5-7B: stage 2 (visual instruction tuning) on llava_v1_5_mix665k plus the
# REVERIE rows, full fine-tune, LLaVA-1.5's stage-2 settings (config/llava15_7b_stage2.py; the paper
# trains its LLaVA-1.5 model on "LLaVA-665k + REVERIE"; the LoRA variant of its table:
# config/llava15_7b_reverie_lora.py).
# First turn the released annotations into LLaVA conversations (the images: Visual Genome VG_100K /
# VG_100K_2, COCO train2017, ScienceQA train, as REVERIE's README lists them, under data/llava/; adapt
# image_map to the folders your copy of reverie.json names):
#   python prepare_reverie.py --data_path=data/reverie/reverie.json --image_root=data/llava \
#       --image_map="VG_100K:vg/VG_100K,VG_100K_2:vg/VG_100K_2,train2017:coco/train2017,train:scienceqa/train" \
#       --out_path=data/reverie/reverie_llava.json
#   torchrun --standalone --nproc_per_node=8 sft.py config/llava15_7b_reverie.py
# The answer-only control is the same command on `prepare_reverie.py --rationales=none` output.
exec(open("config/llava15_7b_stage2.py").read())
data_path = "data/llava/llava_v1_5_mix665k.json,data/reverie/reverie_llava.json"
out_dir = "out/llava15-7b-reverie"
wandb_run_name = "llava15-7b-reverie"
