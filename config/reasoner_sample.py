# LLaVA-Reasoner's pair mining (Zhang et al. 2024) from the CoT-SFT model: 32 CoT answers per training
# question at temperature 1.0, the short answer after the last '### Answer:' checked against the gold one
# (letter / numbers within 5 % / VQA-normalised exact match), questions with accuracy in [0.25, 0.85]
# kept, up to 3 random (correct, incorrect) pairs each (the paper: 64.8k pairs). 8 GPUs, batches sharded:
#   torchrun --standalone --nproc_per_node=8 selfreward.py config/reasoner_sample.py
# then DPO on the pairs:
#   torchrun --standalone --nproc_per_node=8 dpo.py config/reasoner_dpo.py --data_path=out/reasoner-pairs/pairs.json
# Data: the questions with gold short answers, {id, image, question (+ options), answer} per line, or
# LLaVA conversation records whose gpt turn holds the answer (e.g. the SFT data's direct copies).
mode = "answer"
init_from = "out/reasoner-cot-sft"
data_path = "data/reasoner/questions.jsonl"
image_root = "data/reasoner/images"
samples = 32
temperature = 1.0
batch_size = 4                 # questions per generate call per GPU: x 32 samples = 128 rows, KV cache shared per question
max_new_tokens = 512           # GPT-4o-style rationales run to a few hundred tokens
out_dir = "out/reasoner-pairs"
