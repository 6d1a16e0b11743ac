"""model.py: llava-hf parity, checkpoints, generation; lucid/optim.py's optimizer groups. (The fused loss: test_kernel.py.)"""
import json
import os
import re
import shutil

import pytest
import torch

from lucid import optim
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


def test_hub_id_loads_from_the_hf_cache(tmp_path):
    """init_from='org/name' (not a directory here) is a hub id: read from the Hugging Face cache, as a
    downloaded llava-hf/llava-1.5-7b-hf would be (offline here, so only the cache can answer)."""
    import subprocess
    import sys
    hf, d = _tiny_llava(tmp_path)
    snap = tmp_path / "hub" / "models--llava-hf--tiny-llava" / "snapshots" / ("0" * 40)
    shutil.copytree(d, snap)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    code = ("import model as M, sys; v = M.VLM.from_pretrained('llava-hf/tiny-llava'); print(v.image_token_id)\n"
            "try: M.VLM.from_pretrained('llava-hf/not-cached')\nexcept FileNotFoundError as e: print(e)")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=dict(env, PYTHONPATH=M.__file__.rsplit("/", 1)[0]),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout.splitlines()
    assert out[0] == str(IMG) and out[1].startswith("llava-hf/not-cached: not a directory, and not fetched as a hub model id")


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
    optim.set_trainable(vlm, lrs)
    opt = optim.configure_optimizer(vlm, lrs, weight_decay=0.1)
    assert not any(p.requires_grad for p in vlm.vision.parameters())
    assert all(p.requires_grad for p in vlm.projector.parameters())
    lrs = {(g["part"], g["weight_decay"]) : g["lr"] for g in opt.param_groups}
    assert lrs == {("projector", 0.1): 1e-3, ("projector", 0.0): 1e-3, ("lm", 0.1): 2e-5, ("lm", 0.0): 2e-5}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for n, p in vlm.named_parameters():
        if p.requires_grad:
            assert (id(p) in no_decay) == (p.dim() < 2), n


# ----------------------------------------------------------------------------- generation

def _left_padded(rows, pad=0):
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _prompt_rows(img, n_img=16):
    return [[1] + [img] * n_img + [5, 6, 7, 8], [1] + [img] * n_img + [9, 10], [1, 11] + [img] * n_img + [12, 13, 14, 15, 16]]


def test_generate_greedy_matches_full_recompute(tiny_tokenizer):
    """Greedy with the KV cache (batched, left-padded) equals argmax of full forwards without a cache,
    row by row, and the returned log-probs are those of the full forward."""
    vlm = _tiny_vlm(tiny_tokenizer).eval()
    with torch.no_grad():  # sharper logits: an untrained model's near-ties would make argmax a float-noise draw
        vlm.lm.get_output_embeddings().weight.mul_(8)
    rows = _prompt_rows(vlm.image_token_id)
    ids, mask = _left_padded(rows)
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    g = vlm.generate(ids, px, mask, max_new_tokens=6, eos_token_id=[])
    assert g.tokens.shape == (3, 6) and g.lengths.tolist() == [6, 6, 6] and g.finish == ["length"] * 3
    for b, r in enumerate(rows):
        seq = torch.tensor([r])
        for step in range(6):
            with torch.no_grad():
                logits = vlm(seq, px[b:b + 1])[0, -1]
            nxt = logits.argmax()
            assert nxt == g.tokens[b, step]
            torch.testing.assert_close(g.logprobs[b, step], torch.log_softmax(logits, -1)[nxt], rtol=1e-4, atol=1e-4)
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
        assert g.text[b] == tiny_tokenizer.decode(g.tokens[b].tolist(), skip_special_tokens=True)


def test_generate_batched_equals_one_by_one(tiny_tokenizer):
    """Left padding is invisible: each row of a padded batch generates what it generates alone, also
    when rows stop at different steps (an end id that only some rows produce)."""
    vlm = _tiny_vlm(tiny_tokenizer).eval()
    with torch.no_grad():  # sharper logits: no near-ties for float noise to flip
        vlm.lm.get_output_embeddings().weight.mul_(8)
    rows = _prompt_rows(vlm.image_token_id)
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ids, mask = _left_padded(rows)
    free = vlm.generate(ids, px, mask, max_new_tokens=10, eos_token_id=[])
    end = free.tokens[0, 3].item()  # row 0 ends at step 4 at the latest; the others wherever `end` first shows up
    batched = vlm.generate(ids, px, mask, max_new_tokens=10, eos_token_id=end)
    assert batched.finish[0] == "eos" and batched.lengths[0] <= 4
    for b, r in enumerate(rows):
        alone = vlm.generate(torch.tensor([r]), px[b:b + 1], max_new_tokens=10, eos_token_id=end)
        n = alone.lengths[0]
        assert batched.lengths[b] == n and batched.finish[b] == alone.finish[0]
        assert torch.equal(batched.tokens[b, :n], alone.tokens[0, :n])
        torch.testing.assert_close(batched.logprobs[b, :n], alone.logprobs[0, :n], rtol=1e-4, atol=1e-5)
        assert batched.text[b] == alone.text[0]
        assert (batched.logprobs[b, n:] == 0).all() and (batched.tokens[b, n:] == end).all()  # padding after the end


def test_generate_greedy_equals_llava_hf_generate(tmp_path):
    """Our greedy tokens equal transformers' LlavaForConditionalGeneration.generate on the same weights,
    batched with left padding."""
    from transformers import GenerationConfig
    hf, d = _tiny_llava(tmp_path)
    vlm = M.VLM.from_pretrained(d).eval()
    ids, mask = _left_padded(_prompt_rows(IMG))
    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    gc = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, generation_config=gc)[:, ids.shape[1]:]
    got = vlm.generate(ids, px, mask, max_new_tokens=12)
    assert torch.equal(got.tokens, ref), (got.tokens, ref)


def test_generate_stop_token_ids_and_strings(tiny_tokenizer):
    """A row ends at the first stop token id, or at the first token whose text completes a stop string;
    the ending token is kept, the text is that of the kept tokens, finish says why."""
    vlm = _tiny_vlm(tiny_tokenizer).eval()
    with torch.no_grad():  # a peaked LM head, so greedy text is varied words rather than one repeated id
        vlm.lm.get_output_embeddings().weight.mul_(8)
    rows = _prompt_rows(vlm.image_token_id)
    ids, mask = _left_padded(rows)
    px = torch.randn(3, 3, 32, 32)
    free = vlm.generate(ids, px, mask, max_new_tokens=16, eos_token_id=[])
    toks = free.tokens.tolist()
    # stop token id: the 6th token of row 1
    stop = toks[1][5]
    g = vlm.generate(ids, px, mask, max_new_tokens=16, eos_token_id=[], stop_token_ids=[stop])
    for b in range(3):
        n = toks[b].index(stop) + 1 if stop in toks[b] else 16
        assert g.lengths[b] == n and g.finish[b] == ("stop" if stop in toks[b] else "length")
        assert g.tokens[b, :n].tolist() == toks[b][:n]
    # stop string: the first two letters in a row that follow a row's first 3 characters
    dec = lambda r: tiny_tokenizer.decode(r, skip_special_tokens=True)  # noqa: E731
    s = next(m.group() for t in free.text for m in [re.search(r"[a-zA-Z]{2}", t[3:])] if m)
    g = vlm.generate(ids, px, mask, max_new_tokens=16, eos_token_id=[], stop_strings=["no such text", s])
    assert "stop" in g.finish
    for b in range(3):
        n = next((k for k in range(1, 17) if s in dec(toks[b][:k])), 16)  # the shortest prefix holding s
        assert g.lengths[b] == n and g.tokens[b, :n].tolist() == toks[b][:n]
        assert g.text[b] == dec(toks[b][:n]) and g.finish[b] == ("stop" if s in g.text[b] else "length")
    vlm.tokenizer = None
    with pytest.raises(ValueError, match="tokenizer"):
        vlm.generate(ids, px, mask, max_new_tokens=2, stop_strings=["."])


def test_stop_string_in_tail_equals_decoding_everything(tiny_tokenizer):
    """Decoding only the tail finds a stop string at the same token as decoding the whole text would,
    with multi-byte characters split over byte tokens (byte-level BPE) on both sides of the string."""
    text = "Le café coûte 3€. Ça va? 猫 est là… fin. ok"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # some characters really are several tokens
    for stops in (["."], ["€."], ["là…"], ["? 猫"], ["va", "zz"], ["ûte 3"], ["Ça va? 猫 est"]):
        first = next(k for k in range(1, len(ids) + 1) if any(s in tiny_tokenizer.decode(ids[:k]) for s in stops))
        found = [k for k in range(1, len(ids) + 1) if M.stop_string_in_tail(tiny_tokenizer, ids[:k], stops)]
        assert found[0] == first, stops


def test_generate_sampling_distribution(tiny_tokenizer):
    """Temperature and top-p sample from the right distribution: one new token for 4000 copies of a
    prompt; frequencies match softmax(logits / T), and top-p never leaves the nucleus."""
    vlm = _tiny_vlm(tiny_tokenizer).eval()
    with torch.no_grad():
        vlm.lm.get_output_embeddings().weight.mul_(6)
    r = _prompt_rows(vlm.image_token_id)[0]
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits = vlm(torch.tensor([r]), px)[0, -1]
    N = 4000
    ids, pxs = torch.tensor([r]).expand(N, -1), px.expand(N, -1, -1, -1)
    for T in (0.7, 1.5):
        g = vlm.generate(ids, pxs, max_new_tokens=1, temperature=T, eos_token_id=[],
                         generator=torch.Generator().manual_seed(0))
        freq = torch.bincount(g.tokens[:, 0], minlength=logits.numel()).float() / N
        assert (freq - torch.softmax(logits / T, -1)).abs().max() < 0.03
        # log-probs are the model's own (temperature 1), whatever was sampled
        torch.testing.assert_close(g.logprobs[:, 0], torch.log_softmax(logits, -1)[g.tokens[:, 0]], rtol=1e-4, atol=1e-4)
    p = torch.softmax(logits, -1)
    sp, si = p.sort(descending=True)
    nucleus = set(si[:int((sp.cumsum(0) < 0.6).sum()) + 1].tolist())  # the fewest top tokens with mass >= 0.6
    g = vlm.generate(ids, pxs, max_new_tokens=1, temperature=1.0, top_p=0.6, eos_token_id=[],
                     generator=torch.Generator().manual_seed(0))
    assert set(g.tokens[:, 0].tolist()) == nucleus
    g2 = vlm.generate(ids[:8], pxs[:8], max_new_tokens=5, temperature=1.0, eos_token_id=[],
                      generator=torch.Generator().manual_seed(1))
    g3 = vlm.generate(ids[:8], pxs[:8], max_new_tokens=5, temperature=1.0, eos_token_id=[],
                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(g2.tokens, g3.tokens)  # a seeded generator reproduces a sample


def test_unused_vision_parameters_are_frozen(tiny_tokenizer):
    """Penultimate-layer features: the last CLIP layer and post_layernorm never get a gradient."""
    vlm = _tiny_vlm(tiny_tokenizer)
    unused = optim.unused_vision_parameters(vlm)
    assert unused and all(n.startswith(("vision.encoder.layers.1.", "vision.post_layernorm"))
                          for n in unused)
    assert optim.set_trainable(vlm, {"vision": 1e-3, "projector": 1e-3, "lm": 1e-3}) == sorted(unused)
    ids = torch.randint(0, 100, (1, 24))
    ids[0, 2:18] = vlm.image_token_id
    labels = ids.clone()
    labels[0, :18] = -100
    vlm(ids, torch.randn(1, 3, 32, 32), labels=labels).backward()
    for n, p in vlm.named_parameters():  # exactly the trainable parameters receive gradients
        assert (p.grad is not None) == p.requires_grad == (n not in unused), n
