# Calibrated self-rewarding's sampling for LLaVA-1.5-7B (Zhou et al. 2024, CSR), as released: CSR's
# 12,856 COCO-2014 train prompts (inference_csr/data/CSR-Prompt-Dataset-12k.json: id, image, input),
# K = 5 diverse proposals (group beam search, penalty 3.0), sentences end at '.', at most 70 new tokens,
# a response is final at end-of-sequence or 1,024 characters; best 1 + worst 2 kept by the LM score;
# R = 0.9 CLIP rank + 0.1 LM rank, CLIP ViT-L/14-336. 8 GPUs, prompts sharded over ranks:
#   torchrun --standalone --nproc_per_node=8 selfreward.py config/csr_sample.py
# then DPO on the pairs and the next iteration from the merged model:
#   torchrun --standalone --nproc_per_node=8 dpo.py config/csr_dpo.py --data_path=out/csr-sample1/pairs.json
#   torchrun --standalone --nproc_per_node=8 selfreward.py config/csr_sample.py --init_from=out/csr-iter1 --out_dir=out/csr-sample2
init_from = "llava-hf/llava-1.5-7b-hf"
data_path = "data/csr/CSR-Prompt-Dataset-12k.json"
image_root = "data/coco/train2014"
image_prefix = "COCO_train2014_"   # the prompt file names 000000442786.jpg, COCO names the file COCO_train2014_000000442786.jpg
clip_path = "openai/clip-vit-large-patch14-336"
batch_size = 16                    # prompts per search batch per GPU: up to 3 x 16 live nodes x 5 proposals per generate call
path_length = "nodes"              # the released code divides by the path's node count, root included
out_dir = "out/csr-sample1"
