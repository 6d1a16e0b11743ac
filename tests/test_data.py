"""data.py: templates and label masking, bad-input errors, images, collate, sampling, mixing."""
import json
import os
import sys
import warnings

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from data import (IGNORE_INDEX, DataError, SFTDataset, batch_indices, build_sample, collate,  # noqa: E402
                  expand2square, load_image, load_records, micro_batches, process_image)

N_IMG = 5  # image tokens per <image>
SYSTEM = data.VICUNA_SYSTEM

# Vicuna-style chat template with {% generation %} markers: renders exactly like vicuna_v1
VICUNA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '" + SYSTEM.replace("'", "\\'") + "' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token + system + ' ' }}"
    "{% for m in loop_messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT:' }}{% generation %}{{ ' ' + m['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# ChatML (Qwen-style), with a default system prompt and no BOS: a template unlike the one above
CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONV = [
    {"from": "human", "value": "<image>\nWhat shape is it?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "Is it big?"},
    {"from": "gpt", "value": "No, it is small."},
]
ANSWERS = ["A red circle.", "No, it is small."]


def make_tokenizer(template):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [SYSTEM, "USER: What shape is it? ASSISTANT: A red circle.", "Is it big? No, it is small.",
            "system user assistant You are a helpful assistant. Describe the image."] * 4
    tok.train_from_iterator(text, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                pad_token="<pad>", additional_special_tokens=specials[4:])
    t.chat_template = template
    return t


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(VICUNA_TEMPLATE)


@pytest.fixture(scope="module")
def tok_chatml():
    return make_tokenizer(CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def improc():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no torchvision, using the PIL backend"
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def img_id(t):
    return t.convert_tokens_to_ids("<image>")


def dec(t, ids):
    return t.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def build(t, template, conv=CONV, **kw):
    return build_sample(conv, t, template, img_id(t), N_IMG, **kw)


def supervised_runs(s):
    runs, cur = [], []
    for i, l in zip(s["input_ids"], s["labels"]):
        if l != IGNORE_INDEX:
            assert l == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def check_images(t, s, n_images, text_before_first):
    """Image tokens: n blocks of N_IMG contiguous ids, unsupervised, right after text_before_first."""
    ids, labels = s["input_ids"], s["labels"]
    assert len(ids) == len(labels)
    pos = [i for i, x in enumerate(ids) if x == img_id(t)]
    assert len(pos) == n_images * N_IMG
    assert all(labels[i] == IGNORE_INDEX for i in pos)
    blocks = [pos[k:k + N_IMG] for k in range(0, len(pos), N_IMG)]
    assert all(b == list(range(b[0], b[0] + N_IMG)) for b in blocks)
    assert dec(t, ids[:pos[0]]) == text_before_first


# ----------------------------------------------------------------------------- templates

def test_vicuna_v1(tok):
    s = build(tok, "vicuna_v1", n_images=1)
    assert [dec(tok, r) for r in supervised_runs(s)] == [" " + a + "</s>" for a in ANSWERS]
    check_images(tok, s, 1, "<s>" + SYSTEM + " USER: ")
    expected = ("<s>" + SYSTEM + " USER: " + "<image>" * N_IMG + "\nWhat shape is it? ASSISTANT: A red circle.</s>"
                "USER: Is it big? ASSISTANT: No, it is small.</s>")
    assert dec(tok, s["input_ids"]) == expected
    assert s["input_ids"][0] == tok.bos_token_id and s["input_ids"][-1] == tok.eos_token_id
    assert isinstance(s["input_ids"], list) and isinstance(s["labels"], list)


def test_vicuna_system_override(tok):
    s = build(tok, "vicuna_v1", system="Be brief.")
    assert dec(tok, s["input_ids"]).startswith("<s>Be brief. USER: ")
    conv = [{"from": "system", "value": "Own system."}] + CONV
    s = build(tok, "vicuna_v1", conv=conv, system="Be brief.")  # the conversation's own turn wins
    assert dec(tok, s["input_ids"]).startswith("<s>Own system. USER: ")
    assert "Own system" not in "".join(dec(tok, r) for r in supervised_runs(s))


def test_plain(tok):
    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red circle."},
            {"from": "human", "value": "And this <image> one?"}, {"from": "gpt", "value": "A blue square."}]
    s = build(tok, "plain", conv=conv, n_images=2)
    assert [dec(tok, r) for r in supervised_runs(s)] == ["A red circle.\n", "A blue square.\n"]
    check_images(tok, s, 2, "<s>")
    # the instruction text is dropped, only the images remain of the human turns
    assert dec(tok, s["input_ids"]) == ("<s>" + "<image>" * N_IMG + "A red circle.\n"
                                        + "<image>" * N_IMG + "A blue square.\n")


def test_chat_vicuna_template_matches_builtin_and_hf_mask(tok):
    s = build(tok, "chat", n_images=1)
    assert s == build(tok, "vicuna_v1", n_images=1)
    assert [dec(tok, r) for r in supervised_runs(s)] == [" " + a + "</s>" for a in ANSWERS]
    check_images(tok, s, 1, "<s>" + SYSTEM + " USER: ")
    # text-only: same ids as transformers' own rendering, and our labels = its {% generation %} mask
    conv = [{"from": "human", "value": "What shape is it?"}] + CONV[1:]
    s = build(tok, "chat", conv=conv)
    messages = [{"role": data.ROLES[c["from"]], "content": c["value"]} for c in conv]
    hf = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert s["input_ids"] == list(hf["input_ids"])
    assert [int(l != IGNORE_INDEX) for l in s["labels"]] == list(hf["assistant_masks"])


def test_chat_chatml_template(tok_chatml):
    t = tok_chatml
    s = build(t, "chat", n_images=1)
    assert [dec(t, r) for r in supervised_runs(s)] == [a + "<|im_end|>\n" for a in ANSWERS]
    check_images(t, s, 1, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert s["input_ids"][0] != t.bos_token_id  # this template has no BOS, so none is added
    unsup = dec(t, [i for i, l in zip(s["input_ids"], s["labels"]) if l == IGNORE_INDEX and i != img_id(t)])
    assert "What shape" in unsup and "Is it big?" in unsup and "helpful assistant" in unsup
    # system override and a trailing user turn (unsupervised tail)
    conv = CONV + [{"from": "human", "value": "Thanks"}]
    s = build(t, "chat", conv=conv, system="Be brief.")
    text = dec(t, s["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and text.endswith("Thanks<|im_end|>\n")
    assert [dec(t, r) for r in supervised_runs(s)] == [a + "<|im_end|>\n" for a in ANSWERS]
    text_only = [{"from": "human", "value": "What shape is it?"}] + CONV[1:]
    rendered = t.apply_chat_template([{"role": data.ROLES[c["from"]], "content": c["value"]} for c in text_only],
                                     tokenize=False)
    assert build(t, "chat", conv=text_only)["input_ids"] == t(rendered, add_special_tokens=False)["input_ids"]


def test_chat_template_errors(tok):
    no_template = make_tokenizer(None)
    with pytest.raises(ValueError, match="chat_template"):
        build(no_template, "chat")
    unstable = make_tokenizer("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                              "{% if add_generation_prompt %}BOT>{% endif %}")
    with pytest.raises(DataError, match="prefix-stable"):
        build(unstable, "chat")
    with pytest.raises(ValueError, match="unknown template"):
        build(tok, "llama9")


def test_max_len_truncates_text_keeps_images(tok):
    full = build(tok, "vicuna_v1")
    cut = build(tok, "vicuna_v1", max_len=len(full["input_ids"]) - 4)
    assert cut["input_ids"] == full["input_ids"][:-4] and cut["labels"] == full["labels"][:-4]
    assert cut["input_ids"].count(img_id(tok)) == N_IMG
    assert build(tok, "vicuna_v1", max_len=len(full["input_ids"])) == full  # exact fit: untouched
    first_img = full["input_ids"].index(img_id(tok))
    with pytest.raises(DataError, match="image would be truncated"):
        build(tok, "vicuna_v1", max_len=first_img + 2)
    with pytest.raises(DataError, match="no supervised tokens after truncation"):
        build(tok, "vicuna_v1", max_len=first_img + N_IMG + 1)


@pytest.mark.parametrize("template", ["plain", "vicuna_v1"])
def test_image_moves_to_the_front_as_llava_does(tok, template):
    """LLaVA's preprocess_multimodal: 'What shape is it?\n<image>' trains exactly as '<image>\nWhat shape is it?'."""
    late = [dict(CONV[0], value="What shape is it?\n<image>")] + CONV[1:]
    assert build(tok, template, conv=late) == build(tok, template)
    assert data.image_first("<image>\nQ") == "<image>\nQ" and data.image_first("A <image> B") == "<image>\nA  B"
    assert data.image_first("<image> and <image>") == "<image> and <image>"  # several: positional, untouched


def test_build_sample_bad_conversations(tok):
    with pytest.raises(DataError, match="image count|placeholder"):
        build(tok, "vicuna_v1", n_images=2)
    with pytest.raises(DataError, match="no assistant turn"):
        build(tok, "vicuna_v1", conv=CONV[:1])
    with pytest.raises(DataError, match="assistant turn"):
        build(tok, "vicuna_v1", conv=[CONV[0], {"from": "gpt", "value": "see <image>"}])
    with pytest.raises(DataError, match="unknown 'from'"):
        build(tok, "vicuna_v1", conv=[{"from": "bot", "value": "x"}])

# ----------------------------------------------------------------------------- records and bad input


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def rec(i, image="img.png", conv=None):
    r = {"id": f"r{i}", "conversations": conv or CONV}
    if image is not None:
        r["image"] = image
    return r


def load_bad(tmp_path, bad, match):
    path = write_json(tmp_path / "bad.json", [rec(0), bad])
    with pytest.raises(DataError) as e:
        load_records(path)
    msg = str(e.value)
    assert path in msg and "record 1" in msg, msg
    assert match in msg, msg


def test_load_records_errors(tmp_path):
    load_bad(tmp_path, {"id": "x"}, "conversations")
    load_bad(tmp_path, ["not", "a", "dict"], "not an object")
    load_bad(tmp_path, rec(1, conv=[CONV[0], CONV[2]]), "no assistant turn")
    load_bad(tmp_path, rec(1, conv=[{"from": "human"}, CONV[1]]), "'from' and 'value'")
    load_bad(tmp_path, rec(1, conv=[{"from": "robot", "value": "x"}, CONV[1]]), "unknown 'from'")
    load_bad(tmp_path, rec(1, image=["a.png", "b.png"]), "1 <image> placeholder(s) in the human turns but 2 image(s)")
    load_bad(tmp_path, rec(1, image=None), "but 0 image(s)")
    load_bad(tmp_path, rec(1, image=7), "'image' must be")
    # text-only records and a list of images are fine
    ok = write_json(tmp_path / "ok.json", [rec(0, image=None, conv=[{"from": "human", "value": "hi"}, CONV[1]]),
                                           rec(1, image=["a.png"])])
    assert [r["_src"] for r in load_records(ok)] == [(ok, 0), (ok, 1)]


def test_invalid_json(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(rec(0)) + "\n\n" + '{"id": "r1", "conversations": [\n')
    with pytest.raises(DataError) as e:
        load_records(str(p))
    assert str(p) in str(e.value) and "line 3" in str(e.value) and "record 1" in str(e.value)
    assert "invalid JSON" in str(e.value)
    p = tmp_path / "bad.json"
    p.write_text('[\n{"id": 1,,}\n]')
    with pytest.raises(DataError, match=r"bad.json: line 2 .*invalid JSON"):
        load_records(str(p))


@pytest.fixture
def bad_set(tmp_path, tok, improc):
    """records: 0 good, 1 missing image, 2 corrupt image, 3 image truncated by max_len, 4 good text-only."""
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG garbage, not an image" * 10)
    long_q = [{"from": "human", "value": "Describe the image. " * 12}, CONV[1],  # the image comes in a later turn
              {"from": "human", "value": "<image>\nAnd this one?"}]
    records = [rec(0, "good.png"), rec(1, "missing.png"), rec(2, "corrupt.png"),
               rec(3, "good.png", conv=long_q + [CONV[1]]),
               rec(4, None, conv=[{"from": "human", "value": "hi"}, CONV[1]])]
    path = write_json(tmp_path / "set.json", records)
    records = load_records(path)

    def make(skip_bad):
        return SFTDataset(records, tok, improc, "vicuna_v1", img_id(tok), N_IMG, image_root=None,
                          max_len=80, skip_bad=skip_bad)
    return path, make


def test_dataset_errors_name_file_record_problem(bad_set):
    path, make = bad_set
    ds = make(skip_bad=False)
    for i, problem in [(1, "image not found"), (2, "cannot read image"), (3, "image would be truncated")]:
        with pytest.raises(DataError) as e:
            ds[i]
        msg = str(e.value)
        assert path in msg and f"record {i} (id 'r{i}')" in msg and problem in msg, msg
    with pytest.raises(DataError, match="record 3"):  # validate() is text-only: the long one is first
        ds.validate()
    with pytest.raises(DataError, match="record 1"):
        ds.validate(check_images=True)
    s = ds[0]
    assert s["pixel_values"].shape == (1, 3, 32, 32) and s["n_images"] == 1
    assert s["input_ids"].dtype == torch.long and s["labels"].shape == s["input_ids"].shape
    assert ds[4]["pixel_values"] is None and ds[4]["n_images"] == 0


def test_dataset_skip_bad(bad_set):
    _, make = bad_set
    ds = make(skip_bad=True)
    with pytest.warns(UserWarning, match="skipping bad sample"):
        assert ds.validate() == [0, 1, 2, 4]
    assert ds.skipped == {"image would be truncated": 1}
    ds = make(skip_bad=True)
    with pytest.warns(UserWarning):
        assert ds.validate(check_images=True) == [0, 4]
    assert ds.skipped == {"missing image": 1, "corrupt image": 1, "image would be truncated": 1}
    ds = make(skip_bad=True)
    with pytest.warns(UserWarning):
        items = [ds[i] for i in range(5)]
    assert [x.get("skipped") for x in items] == [None, "missing image", "corrupt image", "image would be truncated", None]
    assert ds.skipped == {"missing image": 1, "corrupt image": 1, "image would be truncated": 1}
    batch = collate(items, pad_id=0)
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape == (1, 3, 32, 32)
    # the batch carries the skips, so a loop over DataLoader workers' batches can count them
    assert batch["skipped"] == {"missing image": 1, "corrupt image": 1, "image would be truncated": 1}


def test_load_image_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*nope.png"):
        load_image(str(tmp_path / "nope.png"))
    p = tmp_path / "trunc.png"
    buf = tmp_path / "full.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf)
    p.write_bytes(buf.read_bytes()[:60])  # a valid header, truncated data
    with pytest.raises(DataError, match="cannot read image"):
        load_image(str(p))
    Image.new("L", (3, 3), 7).save(tmp_path / "gray.png")
    assert load_image(str(tmp_path / "gray.png")).mode == "RGB"

# ----------------------------------------------------------------------------- images, collate


def test_expand2square():
    bg = (10, 20, 30)
    wide = expand2square(Image.new("RGB", (4, 2), (255, 0, 0)), bg)
    assert wide.size == (4, 4)
    assert [wide.getpixel((x, y)) for y in range(4) for x in (0, 3)] == \
        [bg] * 2 + [(255, 0, 0)] * 4 + [bg] * 2
    tall = expand2square(Image.new("RGB", (1, 3), (0, 255, 0)), bg)
    assert tall.size == (3, 3) and [tall.getpixel((x, 1)) for x in range(3)] == [bg, (0, 255, 0), bg]
    sq = Image.new("RGB", (3, 3))
    assert expand2square(sq, bg) is sq


def test_process_image_pads_with_mean(improc):
    img = Image.new("RGB", (64, 16), (255, 255, 255))
    x = process_image(img, improc)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x[:, 0].abs().max() < 0.05  # top rows are the mean colour: ~0 after normalisation
    assert x[:, 16].min() > 1.5  # the white band in the middle
    y = process_image(img, improc, pad_to_square=False)  # centre crop: all white
    assert y.min() > 1.5


def test_collate():
    a = dict(input_ids=torch.tensor([5, 6, 7]), labels=torch.tensor([-100, 6, 7]),
             pixel_values=torch.full((1, 3, 2, 2), 1.0), n_images=1)
    b = dict(input_ids=torch.tensor([8]), labels=torch.tensor([8]), pixel_values=None, n_images=0)
    c = dict(input_ids=torch.tensor([9, 9]), labels=torch.tensor([-100, 9]),
             pixel_values=torch.stack([torch.full((3, 2, 2), 2.0), torch.full((3, 2, 2), 3.0)]), n_images=2)
    out = collate([a, None, b, c], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 9, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert out["input_ids"].dtype == out["labels"].dtype == out["attention_mask"].dtype == torch.long
    assert out["pixel_values"].shape == (3, 3, 2, 2)
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]  # sample order, then image order
    assert collate([b], pad_id=0)["pixel_values"] is None
    assert collate([None], pad_id=0) is None and collate([{"skipped": "corrupt image"}], pad_id=0) is None
    assert out["skipped"] == {}
    assert collate([a, b], pad_id=None)["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]

# ----------------------------------------------------------------------------- sampling


def test_batch_indices_world_sizes_and_epochs():
    n, gb, seed = 10, 4, 3
    one = [batch_indices(n, gb, s, seed) for s in range(5)]
    for s in range(5):
        r0, r1 = (batch_indices(n, gb, s, seed, rank=r, world_size=2) for r in (0, 1))
        assert len(r0) == len(r1) == 2
        assert [x for pair in zip(r0, r1) for x in pair] == one[s]  # union of ranks = the 1-process batch
    stream = sum(one, [])  # 20 items: epoch 0 then epoch 1, crossing the boundary inside step 2
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]
    assert stream[:10] == torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    data.epoch_permutation.cache_clear()  # a resumed run starts with an empty cache
    assert batch_indices(n, gb, 3, seed) == one[3]
    assert batch_indices(n, gb, 3, seed + 1) != one[3]
    with pytest.raises(ValueError, match="multiple"):
        batch_indices(n, 5, 0, seed, world_size=2)


def test_length_grouping_keeps_the_batches_and_cuts_padding():
    """group_by_length: the same samples per window (each once per epoch when windows tile it), the
    same global batch on 1 or 2 ranks, micro-batches of one modality, far less padding than random."""
    g = torch.Generator().manual_seed(0)
    n, gb, mb, group, seed = 64, 8, 4, 4, 1
    lengths = [int(x) * (1 if i % 4 else -1) for i, x in enumerate(torch.randint(10, 500, (n,), generator=g))]
    plain = [batch_indices(n, gb, s, seed) for s in range(16)]  # 16 steps = 2 epochs = 4 windows
    grouped = [batch_indices(n, gb, s, seed, group=group, lengths=lengths) for s in range(16)]
    for w in range(4):
        win = slice(w * group, (w + 1) * group)
        assert sorted(sum(grouped[win], [])) == sorted(sum(plain[win], []))  # a window: the same samples, regrouped
    assert grouped != plain and sorted(sum(grouped[:8], [])) == list(range(n))  # epoch 0: each sample once
    for s in range(16):
        r0, r1 = (batch_indices(n, gb, s, seed, r, 2, group, lengths) for r in (0, 1))
        assert r0 + r1 == grouped[s]  # ranks take contiguous runs of the one-process batch
    data._grouped_window.cache_clear()  # a resumed run recomputes its window
    assert batch_indices(n, gb, 5, seed, group=group, lengths=lengths) == grouped[5]

    def padding(steps):
        mbs = [m for b in steps for m in micro_batches(b, mb)]
        mixed = sum(len({lengths[i] > 0 for i in m}) > 1 for m in mbs)
        pad = sum(max(abs(lengths[i]) for i in m) * len(m) - sum(abs(lengths[i]) for i in m) for m in mbs)
        return mixed, pad / sum(max(abs(lengths[i]) for i in m) * len(m) for m in mbs)

    (mixed_plain, pad_plain), (mixed_grouped, pad_grouped) = padding(plain), padding(grouped)
    assert mixed_grouped <= 4 < mixed_plain  # at most the one micro-batch per window where the modalities meet
    assert pad_grouped < 0.5 * pad_plain, (pad_grouped, pad_plain)


def test_validation_in_worker_processes_gives_the_same_verdicts(tiny_tokenizer):
    recs = [{"id": str(i), "conversations": [{"from": "human", "value": "Is there a red circle?"},
                                             {"from": "gpt", "value": "Yes. " * (i % 50 + 1) if i % 700 else ""}]}
            for i in range(2500)]  # every 700th answer is empty: an error the verdicts must carry
    ds = SFTDataset(recs, tiny_tokenizer, None, "vicuna_v1", 4, 16, None, max_len=256)
    serial = ds.check()
    assert serial == ds.check(workers=2) and sum(isinstance(v, tuple) for v in serial.values()) == 4


def test_micro_batches():
    assert micro_batches([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert micro_batches([], 2) == []

# ----------------------------------------------------------------------------- mixing files with ratios


def test_load_records_ratios(tmp_path):
    a = write_json(tmp_path / "a.json", [rec(i, None, [{"from": "human", "value": "q"}, CONV[1]]) for i in range(10)])
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps(rec(i, None, [{"from": "human", "value": "q"}, CONV[1]])) + "\n"
                         for i in range(4)))
    b = str(b)
    recs = load_records(f"{a}:0.5,{b}:2.5")
    from_a = [r["_src"][1] for r in recs if r["_src"][0] == a]
    from_b = [r["_src"][1] for r in recs if r["_src"][0] == b]
    assert len(from_a) == round(0.5 * 10) and len(set(from_a)) == 5
    assert len(from_b) == round(2.5 * 4) and all(from_b.count(i) >= 2 for i in range(4))
    assert recs == load_records(f"{a}:0.5,{b}:2.5")  # deterministic
    assert recs == load_records([(a, 0.5), (b, 2.5)]) == load_records([f"{a}:0.5", f"{b}:2.5"])
    assert len(load_records([a, b])) == 14 and len(load_records(a)) == 10
    assert len(load_records(f"{a}:0")) == 0
    # a ':' in the path is not a ratio unless a float follows the last one
    d = tmp_path / "run:v2"
    d.mkdir()
    c = write_json(d / "c.json", [rec(0, None, [{"from": "human", "value": "q"}, CONV[1]])] * 4)
    assert len(load_records(c)) == 4
    assert len(load_records(f"{c}:0.5")) == 2
    with pytest.raises(DataError, match=r"c.json:x: the sample ratio after ':' must be a number, got 'x'"):
        data.parse_spec(f"{c}:x")  # c.json exists: 'x' is a bad ratio, not part of a missing file's name
    assert data.parse_spec(f"{d}/nope.json:x") == [(f"{d}/nope.json:x", 1.0)]  # reported later as not found
    # image paths resolve against the file's directory unless image_root is given
    r = load_records(write_json(d / "i.json", [rec(0, "img/x.png")]))[0]
    assert data.image_paths(r) == [os.path.join(str(d), "img/x.png")]
    r = load_records(str(d / "i.json"), image_root="/imgs")[0]
    assert data.image_paths(r) == ["/imgs/img/x.png"] and data.image_paths(r, "/other") == ["/other/img/x.png"]
