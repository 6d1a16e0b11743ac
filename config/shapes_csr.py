# Calibrated self-rewarding's sampling on the shapes world (selfreward.py, mode=csr): the released
# code's search (K = 5 diverse proposals, penalty 3.0, best 1 + worst 2 kept by the LM score, ranks
# combined with lambda 0.9) over the first 1,000 training scenes' describe prompts, the world's CLIP
# as the image-text scorer. A shapes sentence is ~10 tokens, a description at most 5 sentences, so the
# length cap is scaled down with it (1,024 characters is ~2x a long COCO description).
#   python selfreward.py config/shapes_csr.py --init_from=out/shapes_stage2
init_from = "out/shapes_stage2"
data_path = "data/shapes/prompts.json"
image_root = "data/shapes/images"
clip_path = "shapes/models/clip"
max_prompts = 1000
batch_size = 50
max_new_tokens = 24
max_chars = 256           # ~2x the longest true description (5 objects x ~35 characters): the worst-kept paths that never end stop here
out_dir = "out/shapes_csr"
