"""The real LLaVA-1.5 recipes (config/llava15_7b_stage{1,2}.py, REVERIE's LoRA one) and LLaVA-Reasoner's (CoT SFT, DPO),
run end to end with tiny stand-ins for Vicuna-7B and CLIP ViT-L/14-336 saved on disk in the same formats: everything a lab's run does
up to the size of the weights (hub-style loading, <image> token added to the tokenizer, freezing,
the plain and vicuna_v1 templates, checkpoint hand-over from stage 1 to stage 2)."""
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tokenizer, run_script, run_sft as run, tiny_configs


def _save_tiny_hub_models(root, tokenizer, dtype=torch.float32):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaForCausalLM
    v, t = tiny_configs(vocab_size=len(tokenizer), image_size=48, patch_size=16)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(t).to(dtype)  # Vicuna's weights are stored in fp16
    lm.save_pretrained(root / "vicuna")
    tokenizer.save_pretrained(root / "vicuna")
    # openai/clip-vit-large-patch14-336 is a full CLIPModel checkpoint (text + vision) with its processor
    clip = CLIPModel(CLIPConfig(vision_config=v.to_dict(), text_config=dict(hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2, vocab_size=100), projection_dim=16))
    clip.to(dtype).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(root / "clip")
    return lm, clip


@pytest.mark.slow
def test_fp16_checkpoints_train_fp32_masters(shapes, tmp_path):
    """Vicuna and CLIP ship in fp16 and transformers loads them so. Trained as loaded, an AdamW update
    of 1e-6 to a weight of ~0.02 (fp16's spacing there: 1.5e-5) rounds away; in fp32 masters it stays."""
    tokenizer = make_tokenizer(with_image=False)
    lm, _ = _save_tiny_hub_models(tmp_path, tokenizer, dtype=torch.float16)
    out = str(tmp_path / "stage2")
    run(["config/llava15_7b_stage2.py", "--init_from=parts", f"--lm_path={tmp_path / 'vicuna'}",
         f"--vision_path={tmp_path / 'clip'}", f"--tokenizer_path={tmp_path / 'vicuna'}", *shapes[:3],
         f"--out_dir={out}", "--lr_lm=1e-6", "--lr_projector=1e-6", "--warmup_ratio=0", "--max_steps=1",
         "--global_batch_size=4", "--micro_batch_size=4", "--num_workers=0", "--eval_interval=100",
         "--device=cpu", "--dtype=float32", "--gradient_checkpointing=False", "--distributed=ddp"])
    w = load_file(os.path.join(out, "model.safetensors"))
    before = lm.state_dict()["model.layers.0.mlp.up_proj.weight"]
    after = w["lm.model.layers.0.mlp.up_proj.weight"]
    assert after.dtype == torch.float32 and w["projector.linear_1.weight"].dtype == torch.float32
    moved = (after != before.float()).float().mean().item()
    assert moved > 0.9, moved  # trained in fp16, under 10 % of the weights (the tiny ones) would move


def test_fp16_training_is_refused_inference_is_not():
    from lucid import common
    from configurator import ConfigError
    with pytest.raises(ConfigError, match="loss scaler"):
        common.setup(0, "cpu", "float16")
    assert common.setup(0, "cpu", "float16", training=False).ptdtype == torch.float16  # generation needs no scaler


@pytest.mark.slow
def test_llava15_stage1_then_stage2(shapes, tmp_path):
    tokenizer = make_tokenizer(with_image=False)  # like Vicuna's: from_parts must add <image>
    lm, clip = _save_tiny_hub_models(tmp_path, tokenizer)
    small = ["--max_steps=2", "--global_batch_size=4", "--micro_batch_size=2", "--num_workers=0",
             "--eval_interval=100", "--device=cpu", "--dtype=float32"]
    s1, s2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    run(["config/llava15_7b_stage1.py", f"--lm_path={tmp_path / 'vicuna'}", f"--vision_path={tmp_path / 'clip'}",
         f"--tokenizer_path={tmp_path / 'vicuna'}", *shapes[:3], f"--out_dir={s1}", *small])
    w1 = load_file(os.path.join(s1, "model.safetensors"))
    # stage 1 trains the projector only: vision tower and LM weights are the pretrained ones
    vision = clip.vision_model.state_dict()
    assert all(torch.equal(w1["vision." + k], v) for k, v in vision.items())
    lm_sd = lm.state_dict()
    for k, v in lm_sd.items():
        if "embed_tokens" in k or "lm_head" in k:  # grown by the added <image> token, old rows unchanged
            assert torch.equal(w1["lm." + k][:v.shape[0]], v), k
        else:
            assert torch.equal(w1["lm." + k], v), k
    run(["config/llava15_7b_stage2.py", f"--init_from={s1}", *shapes[:3], f"--out_dir={s2}", *small])
    w2 = load_file(os.path.join(s2, "model.safetensors"))
    assert all(torch.equal(w2[k], w1[k]) for k in w1 if k.startswith("vision."))  # frozen in stage 2 too
    assert not torch.equal(w2["projector.linear_1.weight"], w1["projector.linear_1.weight"])
    assert not torch.equal(w2["lm.model.layers.0.mlp.up_proj.weight"], w1["lm.model.layers.0.mlp.up_proj.weight"])
    # REVERIE's LoRA recipe (config/llava15_7b_reverie_lora.py) from the same stage 1, on the shapes
    # world's REVERIE rows as prepare_reverie.py writes them: the LM's own weights frozen but for the
    # merged adapters, the vision tower frozen, the projector trained
    d = os.path.dirname(shapes[0].split("=", 1)[1])
    run_script("prepare_reverie.py", [f"--data_path={d}/reverie_raw.json", f"--image_root={d}/images",
                                      f"--out_path={tmp_path}/reverie.json", "--max_instructions=20"])
    s3 = str(tmp_path / "reverie_lora")
    run(["config/llava15_7b_reverie_lora.py", f"--init_from={s1}", f"--data_path={tmp_path}/reverie.json",
         f"--image_root={d}/images", f"--out_dir={s3}", *small])
    w3 = load_file(os.path.join(s3, "model.safetensors"))
    assert all(torch.equal(w3[k], w1[k]) for k in w1 if k.startswith("vision.") or "norm" in k or "embed_tokens" in k)
    assert not torch.equal(w3["lm.model.layers.0.self_attn.q_proj.weight"], w1["lm.model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(w3["projector.linear_1.weight"], w1["projector.linear_1.weight"])


@pytest.mark.slow
def test_shapes_stage1_then_stage2(shapes, tmp_path):
    """The shapes world's two stages (config/shapes_stage{1,2}.py) from the shipped world models
    (shapes/models/lm, shapes/models/clip): stage 1 trains the projector only, on captions with the
    plain template; stage 2 trains LM + projector and leaves the vision tower alone."""
    from transformers import CLIPModel, LlamaForCausalLM
    d = os.path.dirname(shapes[0].split("=", 1)[1])  # the small world's directory
    small = ["--max_steps=2", "--global_batch_size=4", "--micro_batch_size=2", "--eval_interval=100", "--eval_batches=1"]
    s1, s2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    run(["config/shapes_stage1.py", f"--data_path={d}/captions.json", f"--val_data_path={d}/captions_val.json",
         f"--image_root={d}/images", f"--out_dir={s1}", *small])
    w1 = load_file(os.path.join(s1, "model.safetensors"))
    lm = LlamaForCausalLM.from_pretrained("shapes/models/lm").state_dict()
    clip = CLIPModel.from_pretrained("shapes/models/clip").vision_model.state_dict()
    assert all(torch.equal(w1["lm." + k], v) for k, v in lm.items() if "lm." + k in w1)
    assert all(torch.equal(w1["vision." + k], v) for k, v in clip.items())
    run(["config/shapes_stage2.py", f"--init_from={s1}", *shapes[:3], f"--out_dir={s2}", *small])
    w2 = load_file(os.path.join(s2, "model.safetensors"))
    assert all(torch.equal(w2[k], w1[k]) for k in w1 if k.startswith("vision."))
    assert not torch.equal(w2["projector.linear_1.weight"], w1["projector.linear_1.weight"])
    assert not torch.equal(w2["lm.model.layers.0.mlp.up_proj.weight"], w1["lm.model.layers.0.mlp.up_proj.weight"])


@pytest.mark.slow
def test_reasoner_recipe_cot_sft_then_dpo(shapes, tmp_path):
    """LLaVA-Reasoner's real recipe files (config/reasoner_cot_sft.py, config/reasoner_dpo.py) from a
    tiny llava-hf checkpoint on the small world's CoT mix and hand-made pairs in the paper's format:
    CoT SFT moves all three parts (the vision tower at its own small lr), DPO moves the LM only."""
    import json
    import model as M
    d = os.path.dirname(shapes[0].split("=", 1)[1])
    tok = make_tokenizer()
    v, t = tiny_configs(vocab_size=len(tok), image_size=48, patch_size=16)
    torch.manual_seed(0)
    hf = str(tmp_path / "llava-hf")
    M.VLM.from_parts(lm=t, vision=v, tokenizer=tok).save_llava_hf(hf)
    small = ["--max_steps=2", "--global_batch_size=4", "--micro_batch_size=2", "--num_workers=0",
             "--device=cpu", "--dtype=float32", f"--image_root={d}/images"]
    sft, dpo = str(tmp_path / "sft"), str(tmp_path / "dpo")
    run(["config/reasoner_cot_sft.py", f"--init_from={hf}", f"--data_path={d}/reasoner_sft.json", f"--out_dir={sft}", *small])
    w0 = M.VLM.from_pretrained(hf).state_dict()
    w1 = load_file(os.path.join(sft, "model.safetensors"))
    for part in ("vision.", "projector.", "lm."):
        assert any(not torch.equal(w1[k], w0[k]) for k in w1 if k.startswith(part)), part
    questions = json.load(open(f"{d}/questions.json"))[:4]
    pairs = [dict(id=f"q{i}", image=q["image"], question=q["question"] + "\nGenerate a reason first and then output a short answer.",
                  chosen=f"Right reason.\n### Answer: {q['answer']}", rejected="Wrong reason.\n### Answer: purple")
             for i, q in enumerate(questions)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run_script("dpo.py", ["config/reasoner_dpo.py", f"--init_from={sft}", f"--data_path={tmp_path}/pairs.jsonl",
                          f"--out_dir={dpo}", *small])
    w2 = load_file(os.path.join(dpo, "model.safetensors"))
    assert all(torch.equal(w2[k], w1[k]) for k in w1 if k.startswith(("vision.", "projector.")))
    assert any(not torch.equal(w2[k], w1[k]) for k in w1 if k.startswith("lm."))
