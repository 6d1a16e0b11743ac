"""model.py: llava-hf parity, checkpoints, optimizer groups, generation. (The fused loss: test_kernel.py.)"""
import json
import os

import pytest
import torch

import model as M
from conftest import tiny_configs

IMG = 127  # image-token id used with the tiny llava-hf models (last id of the 128 vocab)


# ----------------------------------------------------------------------------- llava-hf parity

def _tiny_llava(tmp_path, tie=False):
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    v, t = tiny_configs(tie=tie)
    cfg = LlavaConfig(vision_config=v, text_config=t, image_token_index=IMG, image_seq_length=16)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-zero biases so a missing or mis-mapped one is noticed
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    d = str(tmp_path / "llava")
    hf.save_pretrained(d)
    return hf, d


def _inputs(B=2, T=30, n_img=16):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 120, (B, T), generator=g)
    ids[:, 3:3 + n_img] = IMG
    return ids, torch.randn(B, 3, 32, 32, generator=g)


@pytest.mark.parametrize("tie", [False, True])
def test_llava_hf_parity(tmp_path, tie):
    hf, d = _tiny_llava(tmp_path, tie)
    vlm = M.VLM.from_pretrained(d).eval()
    assert vlm.image_token_id == IMG and vlm.num_image_tokens == 16
    ids, px = _inputs()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # padding handled identically too
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        got = vlm(ids, px, attention_mask=mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the loss: llava-hf's own (full logits, shifted CE) vs our fused one
    labels = ids.clone()
    labels[:, :20] = -100
    with torch.no_grad():
        ref_loss = hf(input_ids=ids, pixel_values=px, labels=labels).loss
        got_loss = vlm(ids, px, labels=labels)
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_llava_hf_gradient_parity(tmp_path):
    """Training signal, not just outputs: gradients of our fused loss reach every part exactly as
    llava-hf's full-logits loss sends them (vision tower, projector, LM, head)."""
    hf, d = _tiny_llava(tmp_path)
    vlm = M.VLM.from_pretrained(d)
    hf.train(); vlm.train()
    ids, px = _inputs()
    labels = ids.clone()
    labels[:, :20] = -100
    hf(input_ids=ids, pixel_values=px, labels=labels).loss.backward()
    vlm(ids, px, labels=labels).backward()
    theirs = {M._from_llava_key(n): p.grad for n, p in hf.named_parameters()}
    checked = 0
    for n, p in vlm.named_parameters():
        if theirs.get(n) is not None:
            torch.testing.assert_close(p.grad, theirs[n], rtol=1e-4, atol=1e-7)
            checked += 1
    assert checked > 40 and all(any(n.startswith(part) for n in theirs) for part in M.PARTS)


def test_token_logprobs_match_llava_hf(tmp_path):
    """Per-token log-probs (what DPO and self-rewarding sum) equal log_softmax of llava-hf's logits at
    the supervised positions, and a per-sequence weighting of them (as DPO applies) backpropagates
    exactly as it does through llava-hf's full logits."""
    hf, d = _tiny_llava(tmp_path)
    vlm = M.VLM.from_pretrained(d)
    ids, px = _inputs()
    labels = ids.clone()
    labels[0, :20] = -100
    labels[1, :25] = -100
    logits = hf(input_ids=ids, pixel_values=px).logits[:, :-1].float()
    keep = labels[:, 1:] != -100
    ref = torch.log_softmax(logits, -1).gather(2, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * keep
    got = vlm.token_logprobs(ids, px, labels=labels)
    assert got.shape == ref.shape and (got[~keep] == 0).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    weights = torch.tensor([0.7, -1.3])  # a different upstream gradient per sequence
    (ref.sum(-1) * weights).sum().backward()
    (got.sum(-1) * weights).sum().backward()
    theirs = {M._from_llava_key(n): p.grad for n, p in hf.named_parameters()}
    for n, p in vlm.named_parameters():
        if theirs.get(n) is not None:
            torch.testing.assert_close(p.grad, theirs[n], rtol=1e-4, atol=1e-6)


def test_export_llava_hf_roundtrip(tmp_path):
    from transformers import LlavaForConditionalGeneration
    _, d = _tiny_llava(tmp_path)
    vlm = M.VLM.from_pretrained(d).eval()
    out = str(tmp_path / "export")
    vlm.save_llava_hf(out)
    hf2 = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids, px = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(hf2(input_ids=ids, pixel_values=px).logits, vlm(ids, px), rtol=1e-5, atol=1e-5)
    assert M.VLM.from_pretrained(out).image_token_id == IMG


def test_llava_key_layouts(tmp_path):
    """transformers >= 4.52 names (model.language_model.*, lm_head.*) load as well as the classic hub
    layout (language_model.model.*, vision_tower.vision_model.*) that save_llava_hf writes."""
    from safetensors.torch import load_file, save_file
    hf, d = _tiny_llava(tmp_path)
    sd = {k: v for k, v in hf.state_dict().items()}  # in-memory names are the new layout
    assert any(k.startswith("model.language_model.") for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"))
    vlm = M.VLM.from_pretrained(d).eval()
    ids, px = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(vlm(ids, px), hf(input_ids=ids, pixel_values=px).logits, rtol=1e-5, atol=1e-5)
    out = str(tmp_path / "classic")
    vlm.save_llava_hf(out)
    keys = set(load_file(os.path.join(out, "model.safetensors")))
    assert "language_model.lm_head.weight" in keys and "vision_tower.vision_model.embeddings.class_embedding" in keys
    with torch.no_grad():
        torch.testing.assert_close(M.VLM.from_pretrained(out)(ids, px), vlm(ids, px))


# ----------------------------------------------------------------------------- our checkpoints

def _tiny_vlm(tokenizer, **kw):
    v, t = tiny_configs(vocab_size=len(tokenizer), **kw)
    torch.manual_seed(0)
    return M.VLM.from_parts(lm=t, vision=v, tokenizer=tokenizer)


def test_save_load_identical(tmp_path, tiny_tokenizer):
    vlm = _tiny_vlm(tiny_tokenizer).eval()
    img = tiny_tokenizer.convert_tokens_to_ids("<image>")
    assert vlm.image_token_id == img and vlm.num_image_tokens == 16
    d = str(tmp_path / "ckpt")
    vlm.save_pretrained(d)
    vlm.save_pretrained(d)  # overwriting an existing checkpoint works and leaves no temp dirs behind
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert json.load(open(os.path.join(d, "config.json")))["model_type"] == M.CHECKPOINT_TYPE
    vlm2 = M.VLM.from_pretrained(d).eval()
    ids = torch.randint(0, 100, (2, 24))
    ids[:, 2:18] = img
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vlm(ids, px), vlm2(ids, px))
    assert vlm2.tokenizer.encode("Is there a red circle?") == tiny_tokenizer.encode("Is there a red circle?")
    assert vlm2.image_processor.crop_size["height"] == 32


def test_refuses_pickled_weights(tmp_path, tiny_tokenizer):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": M.CHECKPOINT_TYPE}))
    (d / "pytorch_model.bin").write_bytes(b"not safe")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        M.VLM.from_pretrained(str(d))


def test_image_token_count_mismatch_is_an_error(tiny_tokenizer):
    vlm = _tiny_vlm(tiny_tokenizer)
    ids = torch.randint(0, 100, (1, 20))
    ids[0, 2:10] = vlm.image_token_id  # 8 tokens for an image that has 16 features
    with pytest.raises(ValueError, match="image tokens"):
        vlm(ids, torch.randn(1, 3, 32, 32))


def test_optimizer_parts_and_freezing(tiny_tokenizer):
    vlm = _tiny_vlm(tiny_tokenizer)
    lrs = {"vision": 0, "projector": 1e-3, "lm": 2e-5}
    M.set_trainable(vlm, lrs)
    opt = M.configure_optimizer(vlm, lrs, weight_decay=0.1)
    assert not any(p.requires_grad for p in vlm.vision.parameters())
    assert all(p.requires_grad for p in vlm.projector.parameters())
    lrs = {(g["part"], g["weight_decay"]) : g["lr"] for g in opt.param_groups}
    assert lrs == {("projector", 0.1): 1e-3, ("projector", 0.0): 1e-3, ("lm", 0.1): 2e-5, ("lm", 0.0): 2e-5}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for n, p in vlm.named_parameters():
        if p.requires_grad:
            assert (id(p) in no_decay) == (p.dim() < 2), n


def test_generate_greedy_matches_full_recompute(tiny_tokenizer):
    """Greedy with the KV cache (batched, left-padded) equals argmax of full forwards, row by row."""
    vlm = _tiny_vlm(tiny_tokenizer).eval()
    img = vlm.image_token_id
    rows = [[1] + [img] * 16 + [5, 6, 7, 8], [1] + [img] * 16 + [9, 10]]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    px = torch.randn(2, 3, 32, 32)
    toks, lps = vlm.generate(ids, px, mask, max_new_tokens=6)
    for b, r in enumerate(rows):
        seq = torch.tensor([r])
        for step in range(6):
            with torch.no_grad():
                logits = vlm(seq, px[b:b + 1])[0, -1]
            nxt = logits.argmax()
            assert nxt == toks[b, step]
            torch.testing.assert_close(lps[b, step], torch.log_softmax(logits, -1)[nxt], rtol=1e-4, atol=1e-4)
            seq = torch.cat([seq, nxt.view(1, 1)], 1)


def test_unused_vision_parameters_are_frozen(tiny_tokenizer):
    """Penultimate-layer features: the last CLIP layer and post_layernorm never get a gradient."""
    vlm = _tiny_vlm(tiny_tokenizer)
    unused = M.unused_vision_parameters(vlm)
    assert unused and all(n.startswith(("vision.encoder.layers.1.", "vision.post_layernorm"))
                          for n in unused)
    assert M.set_trainable(vlm, {"vision": 1e-3, "projector": 1e-3, "lm": 1e-3}) == sorted(unused)
    ids = torch.randint(0, 100, (1, 24))
    ids[0, 2:18] = vlm.image_token_id
    labels = ids.clone()
    labels[0, :18] = -100
    vlm(ids, torch.randn(1, 3, 32, 32), labels=labels).backward()
    for n, p in vlm.named_parameters():  # exactly the trainable parameters receive gradients
        assert (p.grad is not None) == p.requires_grad == (n not in unused), n
