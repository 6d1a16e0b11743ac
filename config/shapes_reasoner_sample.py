# LLaVA-Reasoner's answer-checked pair mining on the shapes world (selfreward.py, mode=answer): sample
# CoT answers to the training questions shapes/prepare.py writes (questions.json, gold answers known
# exactly), keep the questions the model gets right between 25% and 85% of the time, and pair right
# with wrong answers. Not yet tuned or run end to end at this size (no CoT-SFT shapes model exists
# yet); the sample count is cut from the paper's 32 to 16 so that 500 questions fit a CPU.
#   python selfreward.py config/shapes_reasoner_sample.py --init_from=out/shapes_cot_sft
mode = "answer"
init_from = "out/shapes_cot_sft"
data_path = "data/shapes/questions.json"
image_root = "data/shapes/images"
max_prompts = 500
samples = 16
batch_size = 8
temperature = 1.0
max_new_tokens = 96        # a shapes rationale is a few short sentences plus '### Answer: ...'
out_dir = "out/shapes_reasoner_pairs"
