"""
Data for LLaVA-style training, top to bottom:

1. records: LLaVA conversation files (.json list / .jsonl), several files mixed with ratios,
   checked up front so a bad record is an error naming its file and index, not a crash mid-run.
2. templates: a conversation -> input_ids and labels, built TOGETHER segment by segment
   (plain, vicuna_v1, or the tokenizer's own chat template). Every <image> becomes
   num_image_tokens copies of the image-token id; the model writes image features there.
3. images: load, pad to square with the processor's mean colour (LLaVA-1.5), process.
4. SFTDataset + collate: tensors for the model; bad samples raise or are counted and skipped.
5. batch_indices: deterministic distributed sampling with a fixed global batch.
6. benchmarks: question files (POPE, multiple choice / ScienceQA, VQA, CoT, CHAIR) -> prompts, and
   the published scoring rules as pure functions of the answer text.
7. preference pairs for dpo.py: the CSR, LLaVA-Reasoner and TRL formats -> chosen and rejected
   samples sharing one prompt and one image.
8. prompt files for selfreward.py: CSR's {id, image, input} or LLaVA conversations (first human turn).

A record looks like
    {"id": "0001", "image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}
"image" may also be a list of paths (one per <image>) or absent/null for text-only samples.
"""
import json
import math
import os
import random
import re
import tempfile
import warnings
from collections import Counter
from functools import lru_cache

import torch
from PIL import Image

import errors

IGNORE_INDEX = -100  # label value the loss skips (same as F.cross_entropy's default ignore_index)
IMAGE_PLACEHOLDER = "<image>"
TEMPLATES = ("plain", "vicuna_v1", "chat")
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# LLaVA's "from" values, plus the chat-template names people also write
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(errors.UserError):
    """A problem with a data file, one record or one sample; the message names the file, the record and
    the problem. `kind` is a short label used to count skips. A script stops on it with that one line
    (errors.py), or, where the user asked to skip (skip_bad), counts it and reports the counts."""

    def __init__(self, message, kind="bad record"):
        super().__init__(message)
        self.kind = kind


def where(record, src=None):
    """'file: record i (id X)' for error messages; index is 0-based within its file."""
    if src is None and isinstance(record, dict):
        src = record.get("_src")
    s = f"{src[0]}: record {src[1]}" if src else "record"
    if isinstance(record, dict) and "id" in record:
        s += f" (id {record['id']!r})"
    return s

# -----------------------------------------------------------------------------
# 1. records


def parse_spec(spec):
    """
    path | 'a.json:1.0,b.jsonl:0.5' | [path, 'path:ratio', (path, ratio), ...] -> [(path, ratio)].
    A ratio is whatever follows the LAST ':' of an item, only if it parses as a float, so
    paths containing ':' still work.
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec)
        # an existing path is never split (it may contain ',')
        items = [spec] if os.path.exists(spec) else [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    out = []
    for item in items:
        if isinstance(item, (tuple, list)):
            path, ratio = os.fspath(item[0]), float(item[1])
        else:
            path, ratio = split_ratio(os.fspath(item))
        if not (math.isfinite(ratio) and ratio >= 0):
            raise DataError(f"{path}: sample ratio must be a finite number >= 0, got {ratio}", "bad spec")
        out.append((path, ratio))
    if not out:
        raise DataError(f"no data files in {spec!r}", "bad spec")
    return out


def split_ratio(item):
    """'path' | 'path:ratio' -> (path, ratio). A tail that is not a number after an existing file
    ('train.json:abc', 'train.json:') is an error, not part of a path that does not exist."""
    if os.path.exists(item):
        return item, 1.0
    path, sep, tail = item.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            if os.path.exists(path):
                raise DataError(f"{item}: the sample ratio after ':' must be a number, got {tail!r}", "bad spec") from None
    return item, 1.0


def read_json_file(path):
    """The raw objects of a .json (a list) or .jsonl (one object per line) file. A .json file holding one
    object per line is read as JSON lines too: POPE ships its coco_pope_*.json files that way."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found", "missing file")
    if not path.endswith((".json", ".jsonl")):
        raise DataError(f"{path}: unknown data file type (expected .json or .jsonl)", "invalid json")
    text = read_text(path)
    records = None
    if path.endswith(".json") and text.strip():
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # 'Extra data': more than one value, i.e. JSON lines, read below
                raise DataError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}",
                                "invalid json") from None
        else:
            if not isinstance(records, list):
                raise DataError(f"{path}: expected a JSON list of records, got a {type(records).__name__} "
                                f"(use .jsonl for one object per line)", "invalid json")
    if records is None:  # .jsonl, or a .json file of JSON lines
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} (record {len(records)}): invalid JSON: "
                                f"{e.msg} at column {e.colno}", "invalid json") from None
    # an empty file is a mistake (a failed export, the wrong split), not a data set to train on or score
    if not records:
        raise DataError(f"{path}: no records (the file is empty)", "empty file")
    return records


def read_text(path):
    """A text file's contents; a file that is not UTF-8 is a DataError naming its line and byte.
    utf-8-sig: a BOM from Windows editors is tolerated."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text "
                        f"(byte {raw[e.start]:#04x} at offset {e.start}); save the file as UTF-8", "not utf-8") from None


def record_images(record):
    """The record's image paths as a list; [] for a text-only sample."""
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str) and image:
        return [image]
    if isinstance(image, list) and all(isinstance(p, str) and p for p in image):
        return list(image)
    raise DataError(f"'image' must be a path or a list of paths, got {image!r:.80}", "malformed record")


def check_conversations(conversations):
    """Raise DataError (without file/index: the caller adds them) if the turns are unusable."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError("missing or empty 'conversations'", "malformed record")
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"turn {t} needs 'from' and 'value'", "malformed record")
        if turn["from"] not in ROLES:
            raise DataError(f"turn {t}: unknown 'from' {turn['from']!r} (expected one of {sorted(ROLES)})",
                            "malformed record")
        if not isinstance(turn["value"], str):
            raise DataError(f"turn {t}: 'value' must be a string, got {type(turn['value']).__name__}",
                            "malformed record")
        role = ROLES[turn["from"]]
        if role == "system" and t != 0:
            raise DataError(f"turn {t}: a system turn is only allowed as the first turn", "malformed record")
        if role == "assistant" and IMAGE_PLACEHOLDER in turn["value"]:
            # it would be spliced into the answer and shift every later image by one
            raise DataError(f"turn {t}: {IMAGE_PLACEHOLDER} in an assistant turn", "image count mismatch")
    if not any(ROLES[turn["from"]] == "assistant" for turn in conversations):
        raise DataError("no assistant turn (from: gpt), nothing to learn", "no assistant turn")


def check_record(record):
    if not isinstance(record, dict):
        raise DataError(f"record is a {type(record).__name__}, not an object", "malformed record")
    check_conversations(record.get("conversations"))
    n_images = len(record_images(record))
    n_placeholders = sum(turn["value"].count(IMAGE_PLACEHOLDER) for turn in record["conversations"])
    if n_placeholders != n_images:
        raise DataError(f"{n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) in the human turns but "
                        f"{n_images} image(s)", "image count mismatch")


def subsample(items, ratio, seed=0):
    """round(ratio*len) items: whole copies for ratio >= 1, then a fixed-seed sample of the rest."""
    n = round(ratio * len(items))
    if not items or n == 0:
        return []
    copies, rest = divmod(n, len(items))
    picked = sorted(random.Random(seed).sample(range(len(items)), rest))  # sorted: keep file order
    return items * copies + [items[j] for j in picked]


def load_records(spec, image_root=None):
    """
    All records of the files in `spec` (see parse_spec), each a shallow copy with
    _src = (file, index) and _image_root = image_root or the file's own directory
    (relative image paths are resolved against it). Raises DataError on the first bad record.
    """
    records = []
    for path, ratio in parse_spec(spec):
        raw = read_json_file(path)
        root = image_root if image_root is not None else os.path.dirname(path)
        file_records = []
        for i, rec in enumerate(raw):
            try:
                check_record(rec)
            except DataError as e:
                raise DataError(f"{where(rec, (path, i))}: {e}", e.kind) from None
            file_records.append(dict(rec, _src=(path, i), _image_root=root))
        records += subsample(file_records, ratio)
    return records


def image_paths(record, image_root=None):
    """Full paths of a record's images: image_root, else the record's _image_root, else as written."""
    root = image_root if image_root is not None else record.get("_image_root", "")
    return [resolve_image(root, p) for p in record_images(record)]


def resolve_image(root, path):
    """An image path from a data file -> the file to open. Absolute paths are used as written (data
    sets that keep images on another disk do that on purpose). A relative path is relative to the
    image root and must stay inside it: '../../x.png' is a DataError, not a silent read of whatever
    file lies there. Symlinks inside the root are followed (not resolved before the check)."""
    if os.path.isabs(path):
        return path
    full = os.path.join(root, path)
    if os.path.normpath(path).split(os.sep)[0] == os.pardir:
        raise DataError(f"image path {path!r} leaves the image root {root or '.'!r} (use a path inside it, "
                        f"or an absolute path)", "image outside root")
    return full

def write_atomic(path, text):
    """Write text to a temp file beside path, then os.replace: readers never see half a file, and a
    crash leaves the previous file intact (results and metrics files of every stage script)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -----------------------------------------------------------------------------
# 2. templates: conversation -> segments (text or a token id, supervised or not) -> ids, labels


def to_messages(conversations, system=None):
    """LLaVA turns -> chat messages; `system` is used when the conversation has no system turn."""
    messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in conversations]
    if system is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def segments_plain(messages):
    # LLaVA stage 1: the human turn shrinks to its image(s), the caption + "\n" is the target
    segs = []
    for m in messages:
        if m["role"] == "user":
            segs.append((IMAGE_PLACEHOLDER * m["content"].count(IMAGE_PLACEHOLDER), False))
        elif m["role"] == "assistant":
            segs.append((m["content"] + "\n", True))
    return segs


def segments_vicuna(messages, eos_id):
    # LLaVA's conv_vicuna_v1 (sep " ", sep2 "</s>"):
    # "SYSTEM USER: Q ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>"
    system = VICUNA_SYSTEM
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    segs = [(system + " ", False)]
    for m in messages:
        if m["role"] == "user":
            segs.append(("USER: " + m["content"] + " ", False))
        else:
            # the answer's leading space belongs to the answer: the prompt at inference ends
            # with "ASSISTANT:", so the model must learn to produce " A</s>"
            segs += [("ASSISTANT:", False), (" " + m["content"], True), (eos_id, True)]
    return segs


def segments_chat(messages, tokenizer):
    """
    Segments from the tokenizer's chat template by rendering prefixes: what assistant turn i
    adds after the generation prompt is supervised, everything in between is not. Works for
    any template whose renderings of longer conversations extend the shorter ones.
    """
    def render(msgs, add_generation_prompt=False):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja errors, e.g. "roles must alternate"
            raise DataError(f"chat template failed: {type(e).__name__}: {e}", "chat template") from None

    def not_prefix(a, b):
        return DataError(f"chat template is not prefix-stable: the rendering of {a} does not start with "
                         f"the rendering of {b}, so the assistant tokens can't be located; use a "
                         f"template that renders conversations incrementally", "chat template")

    segs, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        through = render(messages[:i + 1])
        if not before.startswith(done):
            raise not_prefix(f"the first {i} turns + generation prompt", "the previous turns")
        if not through.startswith(before):
            raise not_prefix(f"the first {i + 1} turns", f"the first {i} turns + generation prompt")
        segs += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    full = render(messages)  # trailing non-assistant turns, if any
    if not full.startswith(done):
        raise not_prefix("the whole conversation", "its part up to the last assistant turn")
    segs.append((full[len(done):], False))
    return segs


def encode_segments(segments, tokenizer, image_token_id, num_image_tokens):
    """
    segments: [(text or token id, supervised)] -> input_ids, labels, number of images.
    Each text run is tokenised on its own (no special tokens added), so labels line up with
    input_ids by construction. <image> splits a text run and becomes the image-token block.
    """
    # adjacent segments with the same flag are one text: tokenise it as a whole
    merged = []
    for seg, sup in segments:
        if merged and isinstance(seg, str) and isinstance(merged[-1][0], str) and merged[-1][1] == sup:
            merged[-1] = (merged[-1][0] + seg, sup)
        elif seg != "":
            merged.append((seg, sup))
    pieces = []  # (str text | int token id | None for an image, supervised)
    for seg, sup in merged:
        if isinstance(seg, int):
            pieces.append((seg, sup))
            continue
        for j, text in enumerate(seg.split(IMAGE_PLACEHOLDER)):
            if j > 0:
                pieces.append((None, False))
            if text:
                pieces.append((text, sup))
    texts = [p for p, _ in pieces if isinstance(p, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])  # one batched call
    input_ids, labels, n_images = [], [], 0
    for p, sup in pieces:
        if p is None:
            ids = [image_token_id] * num_image_tokens
            n_images += 1
        elif isinstance(p, int):
            ids = [p]
        else:
            ids = list(next(encoded))
        input_ids += ids
        labels += ids if sup else [IGNORE_INDEX] * len(ids)
    return input_ids, labels, n_images


def build_sample(conversations, tokenizer, template, image_token_id, num_image_tokens, n_images=None,
                 max_len=None, system=None):
    """
    A LLaVA conversation -> dict(input_ids, labels) as python lists; only assistant turns (with
    their end-of-turn) are supervised. n_images: if given, the number of <image> placeholders
    must match it. max_len: truncate the text, never the image tokens (DataError instead).
    Raises DataError for problems with this conversation, ValueError for a wrong setup.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}, expected one of {TEMPLATES}")
    check_conversations(conversations)
    for t, turn in enumerate(conversations):
        if ROLES[turn["from"]] == "assistant" and not turn["value"].strip():
            # it would train the end-of-turn token alone: an answer to nothing (skip_bad counts it)
            raise DataError(f"turn {t}: empty assistant answer", "empty answer")
    messages = to_messages(conversations, system)
    bos = [(tokenizer.bos_token_id, False)] if tokenizer.bos_token_id is not None else []
    if template == "plain":
        segments = bos + segments_plain(messages)
    elif template == "vicuna_v1":
        if tokenizer.eos_token_id is None:
            raise ValueError("template 'vicuna_v1' needs a tokenizer with an eos token")
        segments = bos + segments_vicuna(messages, tokenizer.eos_token_id)
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer with a chat_template; "
                             "use 'vicuna_v1' or set tokenizer.chat_template")
        segments = segments_chat(messages, tokenizer)  # BOS: whatever the template renders
    input_ids, labels, found = encode_segments(segments, tokenizer, image_token_id, num_image_tokens)

    if n_images is not None and found != n_images:
        raise DataError(f"{found} {IMAGE_PLACEHOLDER} placeholder(s) in the rendered prompt but "
                        f"{n_images} image(s)", "image count mismatch")
    if max_len is not None and len(input_ids) > max_len:
        if found and max(i for i, t in enumerate(input_ids) if t == image_token_id) >= max_len:
            raise DataError(f"sample has {len(input_ids)} tokens; truncating it to max_len={max_len} "
                            f"means the image would be truncated", "image would be truncated")
        input_ids, labels = input_ids[:max_len], labels[:max_len]
        if all(l == IGNORE_INDEX for l in labels):
            raise DataError(f"no supervised tokens after truncation to max_len={max_len}",
                            "no supervised tokens")
    if all(l == IGNORE_INDEX for l in labels):
        raise DataError("no supervised tokens", "no supervised tokens")
    return dict(input_ids=input_ids, labels=labels)

def build_prompt(question, tokenizer, template, image_token_id, num_image_tokens, n_images=1, system=None):
    """Prompt ids for generation, made exactly as training makes them: the sample for
    [question, placeholder answer], cut where the answer's supervised tokens start. So a model
    never sees a prompt tokenised differently from the ones it was trained on."""
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": "x"}]
    s = build_sample(conv, tokenizer, template, image_token_id, num_image_tokens, n_images=n_images, system=system)
    first = next(i for i, l in enumerate(s["labels"]) if l != IGNORE_INDEX)
    return s["input_ids"][:first]


def collate_prompts(prompts, pad_id):
    """LEFT-pad prompt id lists for batched generation: every row's last token is at the same position."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, T - len(p):] = torch.as_tensor(p)
        mask[row, T - len(p):] = 1
    return ids, mask

# -----------------------------------------------------------------------------
# 3. images


def load_image(path):
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}", "missing image")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the full decode inside the try
    except Exception as e:  # PIL raises several types: UnidentifiedImageError, OSError (truncated), ...
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}", "corrupt image") from None


def expand2square(img, background_color):
    """LLaVA's pad-to-square: the image centred on a square of background_color."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background_color)
    result.paste(img, ((side - width) // 2, (side - height) // 2))
    return result


def process_image(img, image_processor, pad_to_square=True):
    """PIL image -> (3, H, W) float tensor. Padding with the mean colour (LLaVA-1.5) keeps the
    whole image instead of letting the processor's centre crop cut its sides off."""
    if pad_to_square:
        img = expand2square(img, tuple(int(m * 255) for m in image_processor.image_mean))
    return image_processor(images=img, return_tensors="pt")["pixel_values"][0]

# -----------------------------------------------------------------------------
# 4. dataset and collate


class SFTDataset(torch.utils.data.Dataset):
    """
    Records -> dict(input_ids (T,), labels (T,), pixel_values (n_images, 3, H, W) or None, n_images).
    A bad sample raises DataError naming its file and record; with skip_bad=True it is instead
    counted in self.skipped (by problem kind), warned about once per kind, and returned as
    {"skipped": kind}, which collate drops and counts in the batch's "skipped" Counter: the training
    loop sums those, so skips found mid-run (an image that fails only when decoded) reach the final
    report even from DataLoader workers, whose copies of self.skipped the main process never sees.
    Call validate(check_images=True) first: text problems and missing or non-image files are then
    decided and reported once, before training, the same way with or without skip_bad.
    """

    def __init__(self, records, tokenizer, image_processor, template, image_token_id, num_image_tokens,
                 image_root, max_len=None, pad_to_square=True, skip_bad=False, system=None):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}, expected one of {TEMPLATES}")
        self.records = records
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.image_root = image_root
        self.max_len = max_len
        self.pad_to_square = pad_to_square
        self.skip_bad = skip_bad
        self.system = system
        self.skipped = Counter()
        self._warned = set()

    def __len__(self):
        return len(self.records)

    def text_sample(self, record):
        return build_sample(record["conversations"], self.tokenizer, self.template, self.image_token_id,
                            self.num_image_tokens, n_images=len(record_images(record)),
                            max_len=self.max_len, system=self.system)

    def bad(self, record, error):
        """Raise the error with its file and record, or (skip_bad) count it and return None."""
        error = DataError(f"{where(record)}: {error}", error.kind)
        if not self.skip_bad:
            raise error
        self.skipped[error.kind] += 1
        if error.kind not in self._warned:
            self._warned.add(error.kind)
            warnings.warn(f"skipping bad sample: {error} (further '{error.kind}' samples are only counted)",
                          stacklevel=3)
        return {"skipped": error.kind}

    def __getitem__(self, i):
        record = self.records[i]
        try:
            sample = self.text_sample(record)  # text first: it is cheap and catches most problems
            images = [process_image(load_image(p), self.image_processor, self.pad_to_square)
                      for p in image_paths(record, self.image_root)]
        except DataError as e:
            return self.bad(record, e)
        return dict(input_ids=torch.tensor(sample["input_ids"], dtype=torch.long),
                    labels=torch.tensor(sample["labels"], dtype=torch.long),
                    pixel_values=torch.stack(images) if images else None,
                    n_images=len(images))

    def validate(self, check_images=False):
        """
        Build every sample's text (no image decoding) and return the indices that are fine.
        check_images=True also opens each image file's header: catches missing and non-image
        files, not truncated ones (those fail when decoded: an error, or with skip_bad a skip the
        batch counts). skip_bad=False: raises the first error.
        """
        good = []
        for i, record in enumerate(self.records):
            try:
                self.text_sample(record)
                if check_images:
                    for path in image_paths(record, self.image_root):
                        check_image_file(path)
            except DataError as e:
                self.bad(record, e)
                continue
            good.append(i)
        return good


def check_image_file(path):
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}", "missing image")
    try:
        with Image.open(path):  # lazy: reads the header only
            pass
    except Exception as e:
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}", "corrupt image") from None


def dropped(batch):
    """(the samples that are there, Counter of the kinds of those skipped: {"skipped": kind} or None)."""
    skipped = Counter(b["skipped"] for b in batch if b is not None and "skipped" in b)
    return [b for b in batch if b is not None and "skipped" not in b], skipped


def collate(batch, pad_id):
    """
    Right-pad a list of samples into (B, T) tensors; skipped samples (None or {"skipped": kind}) are
    dropped and counted in "skipped" (a Counter of kinds). Images of all samples are concatenated in
    order: the model fills image-token positions in row-major order, which visits the samples, and
    the images within each, in the same order. Returns None if every sample was skipped.
    """
    batch, skipped = dropped(batch)
    if not batch:
        return None
    if pad_id is None:  # e.g. Llama tokenizers: any id will do, padding is masked and never supervised
        pad_id = 0
    T = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
    for row, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[row, :n] = torch.as_tensor(b["input_ids"])
        labels[row, :n] = torch.as_tensor(b["labels"])
        attention_mask[row, :n] = 1
    images = [b["pixel_values"] for b in batch if b.get("pixel_values") is not None]
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                pixel_values=torch.cat(images) if images else None, skipped=skipped)

# -----------------------------------------------------------------------------
# 5. sampling


@lru_cache(maxsize=4)
def epoch_permutation(n, seed, epoch):
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist())


def batch_indices(n, global_batch, step, seed, rank=0, world_size=1):
    """
    This rank's share of optimizer step `step`'s global batch. The data is an endless stream of
    permutations of range(n) (epoch e seeded by seed + e); step s takes stream items
    [s*global_batch, (s+1)*global_batch) and rank r gets every world_size-th of them from r.
    So the global batch is the same for any world size, and resuming at a step continues exactly.
    """
    if n <= 0:
        raise ValueError("batch_indices: empty dataset")
    if global_batch <= 0 or global_batch % world_size != 0:
        raise ValueError(f"global batch {global_batch} must be a positive multiple of world size {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    start = step * global_batch
    batch = [epoch_permutation(n, seed, pos // n)[pos % n] for pos in range(start, start + global_batch)]
    return batch[rank::world_size]


def micro_batches(indices, micro_batch_size):
    """Split a rank's indices into gradient-accumulation micro batches."""
    return [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]

# -----------------------------------------------------------------------------
# 6. benchmarks: question files -> prompts; answers -> scores, by each benchmark's published rule

BENCHMARKS = ("pope", "mc", "vqa", "cot", "chair")
# the prompt suffixes of LLaVA-1.5's eval scripts (short answer, multiple choice) and LLaVA-Reasoner (CoT)
SHORT_SUFFIX = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
COT_SUFFIX = "Generate a reason first and then output a short answer."
DIRECT_SUFFIX = "Answer the question with a short answer."  # LLaVA-Reasoner's direct mode
MODE_SUFFIXES = (SHORT_SUFFIX, MC_SUFFIX, COT_SUFFIX, DIRECT_SUFFIX)
COT_MARKER = "### Answer:"
CHAIR_PROMPT = "Describe the image in detail."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
POPE_SPLITS = ("random", "popular", "adversarial")


def with_suffix(text, suffix):
    """text + '\\n' + suffix, unless the text already carries it (LLaVA's own question files do)."""
    return text if suffix in text else text.rstrip() + "\n" + suffix


def strip_modes(text):
    """The question without the suffixes that select an answer mode (MODE_SUFFIXES), stripped."""
    for suffix in MODE_SUFFIXES:
        text = text.replace(suffix, "")
    return text.strip()


def option_lines(question, options):
    """LLaVA-1.5's multiple-choice layout (model_vqa_mmbench): the question, then 'A. option' lines."""
    return "\n".join([question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)])


def parse_options(text):
    """The options written in a ScienceQA prompt, either LLaVA's conversion 'Options: (A) x (B) y' or
    LLaVA-1.5's 'A. x' lines; [] if there are none. Letters must run A, B, C... in order."""
    line = next((l for l in text.splitlines() if l.startswith("Options:")), None)
    if line is not None:
        found = re.findall(r"\(([A-Z])\)\s*(.*?)\s*(?=\([A-Z]\)|$)", line[len("Options:"):])
    else:
        found = re.findall(r"^([A-Z])\. (.*?)\s*$", text, re.M)
    letters = "".join(l for l, _ in found)
    return [o for _, o in found] if found and LETTERS.startswith(letters) else []


def gold_letter(answer, options):
    """A gold answer as an option letter: 'B', 1 (an index, as in ScienceQA's problems.json) or the
    option's text. Raises DataError when it is none of them."""
    n = len(options)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < n:
        return LETTERS[answer]
    if isinstance(answer, str):
        if len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[:n]:
            return answer.strip().upper()
        if answer in options:
            return LETTERS[options.index(answer)]
    raise DataError(f"answer {answer!r} is not an option letter A-{LETTERS[n - 1]}, an index or an option's text",
                    "malformed record")


def benchmark_question(rec, task):
    """
    One record of a benchmark file -> dict(question_id, image (path or None), prompt (the text the
    model is asked, without <image>), category (None if absent), + the gold fields of the task):
      pope   text, label yes|no                              -> label
      mc     question + options (list) + answer (letter, index or option text) -> options, answer
             or text (a prompt that already lists the options) + options + answer
             or ScienceQA as LLaVA ships it: {id, image?, conversations: [human, gpt 'The answer is X.']}
      vqa    question or text, answers (list; VQAv2's [{answer: ...}] too) or answer -> answers
      cot    like mc when it has options, else like vqa
      chair  text (default CHAIR_PROMPT), objects (the true objects)  -> objects
    Prompts follow LLaVA's eval scripts: POPE and VQA get SHORT_SUFFIX, mc MC_SUFFIX, cot COT_SUFFIX,
    each only if the text does not already carry it. Raises DataError (the caller adds file and index).
    """
    if not isinstance(rec, dict):
        raise DataError(f"record is a {type(rec).__name__}, not an object", "malformed record")
    if task not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {task!r}, expected one of {BENCHMARKS}")
    qid = next((rec[k] for k in ("question_id", "id", "image_id") if rec.get(k) is not None), None)
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise DataError("needs a 'question_id' (or 'id'; 'image_id' for CHAIR), a string or an integer", "malformed record")
    image = rec.get("image")
    if image is not None and not (isinstance(image, str) and image):
        raise DataError(f"'image' must be one path, got {image!r:.80}", "malformed record")
    category = rec.get("category", rec.get("type"))  # 'type': the old shapes test.jsonl's name for it
    q = dict(question_id=qid, image=image, category=None if category is None else str(category))

    def text_field(*keys):
        t = next((rec[k] for k in keys if rec.get(k) is not None), None)
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"needs a non-empty string {' or '.join(repr(k) for k in keys)}", "malformed record")
        return t.replace(IMAGE_PLACEHOLDER, "").strip()  # the image goes first, as LLaVA's eval scripts put it

    def choices():
        opts = rec.get("options")
        if not (isinstance(opts, list) and 2 <= len(opts) <= len(LETTERS) and all(isinstance(o, str) for o in opts)):
            raise DataError(f"'options' must be a list of 2 to {len(LETTERS)} strings, got {opts!r:.80}", "malformed record")
        if "answer" not in rec:
            raise DataError("needs 'answer' (the right option's letter)", "malformed record")
        return opts, gold_letter(rec["answer"], opts)

    def chain():  # a cot question's gold reasoning chain, when the file has one (the shapes world's do)
        return dict(rationale=rec["rationale"]) if task == "cot" and isinstance(rec.get("rationale"), str) else {}

    def asked(suffix):  # 'question' is the bare question (options get listed); 'text' is the whole prompt
        if "options" in rec and rec.get("question") is not None:
            return with_suffix(option_lines(text_field("question"), rec["options"]), suffix)
        return with_suffix(text_field("question", "text"), suffix)

    if task == "pope":
        label = rec.get("label")
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            raise DataError(f"'label' must be 'yes' or 'no', got {label!r:.40}", "malformed record")
        return dict(q, prompt=with_suffix(text_field("text", "question"), SHORT_SUFFIX), label=label.strip().lower())
    if task == "mc" and "conversations" in rec:  # ScienceQA, LLaVA's llava_test_CQM-A.json
        check_conversations(rec["conversations"])
        human = next((t["value"] for t in rec["conversations"] if ROLES[t["from"]] == "user"), None)
        if human is None:
            raise DataError("no human turn (the question)", "malformed record")
        prompt = human.replace(IMAGE_PLACEHOLDER, "").strip()
        opts = parse_options(prompt)
        if not opts:
            raise DataError("no options found in the question ('Options: (A) ... (B) ...' or 'A. ...' lines)",
                            "malformed record")
        if "answer" in rec:
            answer = gold_letter(rec["answer"], opts)
        else:  # LLaVA's eval reads the gold from problems.json; its conversion also writes it as the gpt turn
            gpt = next(t["value"] for t in rec["conversations"] if ROLES[t["from"]] == "assistant")
            answer = extract_letter(gpt, len(opts))
            if answer is None:
                raise DataError(f"no gold letter in the gpt turn {gpt!r:.60} and no 'answer'", "malformed record")
        # ScienceQA-IMG is the image subset: splitting by it gives that number directly
        q["category"] = q["category"] or ("img" if image else "no_img")
        return dict(q, prompt=with_suffix(prompt, MC_SUFFIX), options=opts, answer=answer)
    if task == "mc":
        opts, answer = choices()
        return dict(q, prompt=asked(MC_SUFFIX), options=opts, answer=answer)
    if task == "vqa" or (task == "cot" and "options" not in rec):
        answers = rec.get("answers", rec.get("answer"))
        if isinstance(answers, (str, int, float)) and not isinstance(answers, bool):
            answers = [answers]
        if isinstance(answers, list):  # VQAv2's annotations: [{"answer": ..., "answer_confidence": ...}]
            answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
        if not (isinstance(answers, list) and answers and
                all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers)):
            raise DataError("needs 'answers' (a list of strings) or 'answer' (a string)", "malformed record")
        suffix = SHORT_SUFFIX if task == "vqa" else COT_SUFFIX
        return dict(q, prompt=asked(suffix), answers=[str(a) for a in answers], **chain())
    if task == "cot":
        opts, answer = choices()
        return dict(q, prompt=asked(COT_SUFFIX), options=opts, answer=answer, **chain())
    # chair
    objects = rec.get("objects")
    if not (isinstance(objects, list) and all(isinstance(o, str) for o in objects)):
        raise DataError(f"'objects' must be a list of object names, got {objects!r:.80}", "malformed record")
    prompt = text_field("text") if rec.get("text") is not None else CHAIR_PROMPT
    return dict(q, prompt=prompt, objects=objects)


def pope_labels(records, path, annotation_dir):
    """LLaVA's POPE layout: llava_pope_test.jsonl has question_id, image, text and category but no label;
    eval_pope.py takes the labels from POPE's coco_pope_<category>.json in its --annotation-dir, the
    i-th line of a category's file for the i-th question of that category. The same here, and each pair
    must show the same image and question (the short-answer suffix aside), so files in another order are
    an error naming both, not a silently shifted score. Returns the records, 'label' added where missing."""
    def same(r):  # what must agree between a question and its label line
        return r.get("image"), with_suffix(str(r.get("text", "")).strip(), SHORT_SUFFIX)

    records, todo = list(records), {}
    for i, r in enumerate(records):
        if isinstance(r, dict) and r.get("label") is None:
            todo.setdefault(r.get("category"), []).append(i)
    for category, idx in todo.items():
        if category is None:
            raise DataError(f"{path}: record {idx[0]}: no 'label', and no 'category' to find it under", "malformed record")
        label_file = os.path.join(annotation_dir, f"coco_pope_{category}.json")
        if not os.path.isfile(label_file):
            raise DataError(f"{path}: record {idx[0]} has no 'label' and {label_file} (POPE's labels for the "
                            f"{category!r} questions) does not exist; point pope_annotation_dir at the folder of "
                            f"coco_pope_<category>.json files", "missing file")
        labels = read_json_file(label_file)
        if len(labels) != len(idx):
            raise DataError(f"{label_file}: {len(labels)} lines for the {len(idx)} {category!r} questions "
                            f"of {path}", "malformed record")
        for line, (i, lab) in enumerate(zip(idx, labels), 1):
            q, lab = records[i], lab if isinstance(lab, dict) else {}
            if same(lab) != same(q):
                raise DataError(f"{label_file}: line {line} ({lab.get('image')!r}, {lab.get('text')!r:.60}) is not "
                                f"{path}: record {i} ({q.get('image')!r}, {q.get('text')!r:.60}): the label file "
                                f"must list the {category!r} questions in the question file's order", "malformed record")
            records[i] = dict(q, label=lab.get("label"))
    return records


def read_benchmark(path, task, pope_annotation_dir=None):
    """All questions of a benchmark file (.jsonl, or a .json list such as ScienceQA's), checked up
    front: a bad record or a repeated question_id is a DataError naming the file and record. POPE
    questions without labels take them from pope_annotation_dir (see pope_labels; None = the 'coco'
    folder beside the question file, where LLaVA's eval layout keeps them)."""
    records = read_json_file(path)
    if task == "pope" and any(isinstance(r, dict) and r.get("label") is None for r in records):
        records = pope_labels(records, path, pope_annotation_dir or os.path.join(os.path.dirname(path), "coco"))
    questions, seen = [], {}
    for i, rec in enumerate(records):
        try:
            q = benchmark_question(rec, task)
        except DataError as e:
            qid = next((rec.get(k) for k in ("question_id", "id", "image_id") if isinstance(rec, dict) and k in rec), None)
            raise DataError(f"{path}: record {i}" + (f" (question_id {qid!r})" if qid is not None else "") + f": {e}",
                            e.kind) from None
        key = str(q["question_id"])
        if key in seen:
            raise DataError(f"{path}: record {i}: question_id {q['question_id']!r} repeats record {seen[key]}",
                            "malformed record")
        seen[key] = i
        questions.append(q)
    if not questions:
        raise DataError(f"{path}: no questions", "malformed record")
    return questions


def read_answers(path):
    """A LLaVA answer file (one JSON a line: question_id, text, ...) -> {str(question_id): text}."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: answer file not found", "missing file")
    answers = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            a = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno}: invalid JSON: {e.msg} at column {e.colno}", "invalid json") from None
        if not (isinstance(a, dict) and "question_id" in a and isinstance(a.get("text"), str)):
            raise DataError(f"{path}: line {lineno}: an answer needs 'question_id' and 'text' (a string)",
                            "malformed record")
        key = str(a["question_id"])  # 1 and "1" are the same question: files disagree on the type
        if key in answers:
            raise DataError(f"{path}: line {lineno}: a second answer to question_id {a['question_id']!r}",
                            "malformed record")
        answers[key] = a["text"]
    if not answers:
        raise DataError(f"{path}: no answers (the file is empty)", "empty file")
    return answers


def attach_answers(questions, answers, path, questions_path="the question file"):
    """questions + {str(question_id): text} -> rows with 'text'. DataError naming the answer file and the
    first question it does not answer. Answers whose question_id no question has are not scored: a
    warning says how many; when none match, the two files do not belong together (DataError)."""
    known = {str(q["question_id"]) for q in questions}
    extra = [k for k in answers if k not in known]
    if len(extra) == len(answers):
        raise DataError(f"{path}: none of its {len(answers)} answers is to a question of {questions_path} (first "
                        f"question_id {extra[0]!r}): answers to another question file?", "unmatched answers")
    if extra:
        warnings.warn(f"{path}: {len(extra)} of {len(answers)} answers have a question_id that no question of "
                      f"{questions_path} has (first: {extra[0]!r}); they are not scored", stacklevel=2)
    rows = []
    for q in questions:
        key = str(q["question_id"])
        if key not in answers:
            raise DataError(f"{path}: no answer for question_id {q['question_id']!r}", "missing answer")
        rows.append(dict(q, text=answers[key]))
    return rows


# --- POPE

def pope_answer(text):
    """LLaVA's POPE rule, exactly as llava/eval/eval_pope.py has it: keep the text before the first '.',
    drop commas, split on single spaces; "no" if a word is exactly 'No', 'no' or 'not', else "yes".
    So it is case-sensitive ('NO' counts as yes), "I don't see a dog" counts as yes (no such word),
    and an empty answer counts as yes."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(preds, labels):
    """preds, labels: 'yes'/'no' lists -> dict(accuracy, precision, recall, f1, yes_ratio, n), fractions,
    'yes' the positive class (eval_pope.py). Where eval_pope.py would divide by zero (no 'yes' answers
    or no 'yes' labels) the figure is 0.0."""
    if len(preds) != len(labels) or not preds:
        raise ValueError(f"pope_metrics: {len(preds)} answers for {len(labels)} labels")
    bad = sorted({v for v in (*preds, *labels) if v not in ("yes", "no")})
    if bad:
        raise ValueError(f"pope_metrics: values must be 'yes' or 'no', got {bad[:3]}")
    tp = sum(p == "yes" and l == "yes" for p, l in zip(preds, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(preds, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(preds, labels))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / sum(l == "yes" for l in labels) if "yes" in labels else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=(tp + tn) / n, precision=precision, recall=recall, f1=f1, yes_ratio=(tp + fp) / n, n=n)


def by_category(rows):
    """{category: rows}: POPE's splits first, then the others sorted; no category -> 'all'."""
    groups = {}
    for r in rows:
        groups.setdefault(r.get("category") or "all", []).append(r)
    order = [c for c in POPE_SPLITS if c in groups] + sorted(c for c in groups if c not in POPE_SPLITS)
    return {c: groups[c] for c in order}


def score_pope(rows):
    """rows: dicts with 'text' (the answer), 'label' and optionally 'category'. -> {split: metrics},
    plus 'average' = the mean of the splits' figures (n: their total) when there is more than one
    split, the number POPE tables (LLaVA-1.5's included) report."""
    splits = {c: pope_metrics([pope_answer(r["text"]) for r in g], [r["label"] for r in g])
              for c, g in by_category(rows).items()}
    if len(splits) > 1:
        average = {k: sum(m[k] for m in splits.values()) / len(splits)
                   for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
        splits["average"] = dict(average, n=sum(m["n"] for m in splits.values()))
    return splits


# --- multiple choice

def extract_letter(text, n_options, options=None):
    """
    The option letter an answer picks, or None. Our rule (after LLaVA's eval_science_qa.py, which
    takes a bare letter, 'X. ...' at the start or 'The answer is X', and VLMEvalKit's can_infer, which
    takes a single option letter standing alone), tried in this order:
      1. the whole answer is one letter, any case, maybe bracketed or punctuated: 'B', 'b', '(B)', 'B.'
      2. an answer phrase: 'The answer is D.', 'Answer: B', 'the correct option is (C)', 'choice C';
         the letter must be a capital, or a small letter that ends the answer ('the answer is b.')
      3. a leading capital with a delimiter: 'B. foo', 'B) foo', '(B) foo', 'B: foo'
      4. exactly one distinct capital in brackets anywhere: 'I pick (C) because ...'
      5. exactly one distinct capital standing alone as a word, where 'A' and 'I' followed by a
         lowercase word (other than or/and/is/was) are read as the article and the pronoun:
         'A red circle.' picks nothing, 'I think B' picks B, 'A or B' is ambiguous: None
      6. options given: the answer is exactly one option's text after VQA normalisation
    Only letters of the first n_options count. So the article 'a' never becomes option A, except as a
    whole one-letter answer, where it can only be the letter.
    """
    valid = LETTERS[:n_options]
    t = text.replace("*", "").strip()  # markdown emphasis: '**B**'
    if not t or not valid:
        return None
    m = re.fullmatch(r"[(\[]?([A-Za-z])[)\]]?[.:)]?", t)
    if m:
        return m.group(1).upper() if m.group(1).upper() in valid else None
    m = re.search(rf"\b(?i:answer|option|choice)(?:\s+(?i:is|would\s+be|should\s+be))?\s*:?\s*[(\[]?"
                  rf"(?:([{valid}])(?![A-Za-z])|([{valid.lower()}])[)\]]?[.!]?\s*$)", t)
    if m:
        return (m.group(1) or m.group(2)).upper()
    m = re.match(rf"[(\[]?([{valid}])[)\].:](?:\s|$)", t)
    if m:
        return m.group(1)
    found = set(re.findall(rf"[(\[]([{valid}])[)\]]", t))
    if len(found) == 1:
        return found.pop()
    found = {m.group(1) for m in re.finditer(rf"(?<![A-Za-z'])([{valid}])(?![A-Za-z'])", t)
             if not (m.group(1) in "AI" and re.match(r"\s+(?!(?:or|and|is|was)\b)[a-z]", t[m.end():]))}
    if len(found) == 1:
        return found.pop()
    if options:
        hits = [i for i, o in enumerate(options[:n_options]) if normalize_vqa(o) == normalize_vqa(t)]
        if len(hits) == 1:
            return LETTERS[hits[0]]
    return None


# --- VQA: EvalAI's answer processor (mmf; LLaVA copies it into llava/eval/m4c_evaluator.py and uses it
# for VQAv2 submissions and TextVQA), i.e. the VQA challenge's normalisation

_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've""".split())
_NUMBERS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5", six="6", seven="7",
                eight="8", nine="9", ten="10")
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: '(?!<=' is no lookbehind, so any '.' not before a digit goes
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def normalize_vqa(text):
    """VQA answer normalisation: lower case; ',' '?' dropped; punctuation removed (next to a space)
    or turned into a space; '.' removed unless before a digit; number words 'none'..'ten' -> digits;
    articles a/an/the dropped; 'dont' -> "don't" style contractions. 'Two.' -> '2',
    'The red circle.' -> 'red circle'."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(pred, answers):
    """
    The VQA score of one answer. With 10 human answers (VQAv2, TextVQA, VizWiz), the official rule:
    the mean over the 10 leave-one-out sets of 9 of min(1, #matches / 3). It is the min(#matches / 3, 1)
    of the papers averaged, and differs from it only for 1-3 matches: 0.3, 0.6, 0.9 instead of 1/3,
    2/3, 1. With any other number of gold answers (one string, a few aliases) there is no human
    agreement to weigh: 1.0 if the answer matches one of them, else 0.0 (ST-VQA's accuracy in
    LLaVA's m4c_evaluator.py). Both sides are normalised (normalize_vqa); the official script
    normalises the gold answers only when they disagree, which changes nothing for VQAv2's
    already-normalised answers.
    """
    if isinstance(answers, str):
        answers = [answers]
    p, gold = normalize_vqa(pred), [normalize_vqa(a) for a in answers]
    if len(gold) == 10:
        return sum(min(1.0, sum(g == p for j, g in enumerate(gold) if j != i) / 3) for i in range(10)) / 10
    return float(p in gold)


# --- CoT (LLaVA-Reasoner): the short answer follows the last '### Answer:'

def cot_answer(text):
    """The text after the LAST '### Answer:', stripped; None when the marker is missing."""
    i = text.rfind(COT_MARKER)
    return None if i < 0 else text[i + len(COT_MARKER):].strip()


# --- checking a sampled answer against the gold one (selfreward.py mode=answer, LLaVA-Reasoner's mining)

_NUMBER = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+))\s*(%|[a-z]+)?")


def read_number(text):
    """A short answer that is a number, with at most one unit word after it, as (value, unit or ''):
    '12', '1,024', '-3.5', '40%', '12 cm', 'two' (a number word VQA normalisation reads); else None."""
    t = str(text).strip().lower().replace(",", "").rstrip(".")
    m = _NUMBER.fullmatch(t) or _NUMBER.fullmatch(normalize_vqa(text))
    return None if m is None else (float(m.group(1)), m.group(2) or "")


def answer_correct(pred, q, tolerance=0.05):
    """Whether the short answer pred is right for q (a question as benchmark_question gives it):
      options   the option letter extract_letter reads equals the gold letter
      numbers   relaxed accuracy (ChartQA's, which LLaVA-Reasoner's mining uses for numbers): within
                `tolerance` of a gold number, relative (a gold 0 only matches 0); units must agree when
                both answers give one ('12 cm' matches '12', not '12 m')
      otherwise normalize_vqa(pred) equals a normalised gold answer (exact match, not VQA's 3-of-10)."""
    if "options" in q:
        return extract_letter(pred, len(q["options"]), q["options"]) == q["answer"]
    p, norm = read_number(pred), normalize_vqa(pred)
    for gold in q["answers"]:
        g = read_number(gold)
        if p is not None and g is not None:
            if (not p[1] or not g[1] or p[1] == g[1]) and abs(p[0] - g[0]) <= tolerance * abs(g[0]):
                return True
        elif norm == normalize_vqa(gold):
            return True
    return False


# --- CHAIR (Rohrbach et al. 2018; LisaAnne/Hallucination utils/chair.py and data/synonyms.txt)

_IRREGULAR = dict(men="man", women="woman", people="person", children="child", mice="mouse", geese="goose",
                  feet="foot", teeth="tooth", oxen="ox", knives="knife", leaves="leaf", wolves="wolf",
                  shelves="shelf", halves="half", loaves="loaf", scarves="scarf")


def chair_words(text):
    """Lower-case word tokens: letters and digits ('teddy-bear' -> teddy, bear)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def parse_synonyms(lines, src="synonyms"):
    """
    CHAIR's synonyms.txt: one object a line, comma-separated names, the first the canonical one
    ('dog, puppy, hot dog' is not allowed: one name under two objects is an error, naming the lines),
    multi-word names allowed ('traffic light, stop light'). lines: the lines or the whole text.
    -> {tuple of words: canonical name}.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    table, line_of = {}, {}
    for lineno, line in enumerate(lines, 1):
        names = [" ".join(chair_words(n)) for n in line.split(",")]
        names = [n for n in names if n]
        for name in names:
            key = tuple(name.split())
            if key in table and table[key] != names[0]:
                raise ValueError(f"{src}: line {lineno}: {name!r} is already a name of {table[key]!r} "
                                 f"(line {line_of[key]})")
            table[key], line_of[key] = names[0], line_of.get(key, lineno)
    if not table:
        raise ValueError(f"{src}: no objects")
    return table


def read_synonyms(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: synonym file not found (CHAIR needs one: 'canonical, synonym, ...' lines)",
                        "missing file")
    try:
        return parse_synonyms(read_text(path), path)
    except DataError:
        raise
    except ValueError as e:
        raise DataError(str(e), "malformed record") from None


def _singulars(word):
    """The word, then its possible singulars, most specific first (simple English plurals; the
    original CHAIR uses pattern.en's singularize)."""
    out = [word]
    if word in _IRREGULAR:
        out.append(_IRREGULAR[word])
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("es"):
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    return out


def chair_objects(caption, synonyms):
    """
    The canonical objects a caption mentions, one entry per mention, in order. Scanning left to
    right, the longest name wins ('hot dog' is not a 'dog', 'teddy bears' is one 'teddy bear'); a
    name's last word may be plural ('boxes', 'teddy bears'). Like the original, a mention is a
    mention whatever the sentence says about it: 'there is no dog' mentions a dog.
    """
    words = chair_words(caption)
    longest = max(len(k) for k in synonyms)
    found, i = [], 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            head = tuple(words[i:i + n - 1])
            hit = next((synonyms[head + (s,)] for s in _singulars(words[i + n - 1]) if head + (s,) in synonyms), None)
            if hit is not None:
                found.append(hit)
                i += n
                break
        else:
            i += 1
    return found


def canonical_objects(objects, synonyms):
    """True-object names -> canonical names (a synonym or plural becomes its object; unknown names
    are kept, lower-cased)."""
    out = set()
    for o in objects:
        hit = chair_objects(o, synonyms)
        out.add(hit[0] if len(hit) == 1 else " ".join(chair_words(o)))
    return out


def chair_metrics(captions, true_objects_list, synonyms):
    """
    CHAIR over captions with their images' true objects (as the original compute_chair):
      chair_s  share of captions mentioning at least one object not in the image
      chair_i  hallucinated mentions / all object mentions (every mention counts, repeats too)
      recall   true objects mentioned / true objects (each object once per image)
      avg_len  words per caption (split on whitespace)
    Where the original divides by zero (no mentions, no true objects), the figure is 0.0.
    """
    if len(captions) != len(true_objects_list) or not captions:
        raise ValueError(f"chair_metrics: {len(captions)} captions for {len(true_objects_list)} object lists")
    hallucinating = mentions = hallucinated = recalled = n_true = words = 0
    for caption, objects in zip(captions, true_objects_list):
        truth = canonical_objects(objects, synonyms)
        said = chair_objects(caption, synonyms)
        bad = [o for o in said if o not in truth]
        hallucinating += bool(bad)
        mentions += len(said)
        hallucinated += len(bad)
        recalled += len(truth & set(said))
        n_true += len(truth)
        words += len(caption.split())
    n = len(captions)
    return dict(chair_s=hallucinating / n, chair_i=hallucinated / mentions if mentions else 0.0,
                recall=recalled / n_true if n_true else 0.0, avg_len=words / n, n=n)


# --- one task's questions + answers -> per-question verdicts and metrics

def judge(task, row, synonyms=None):
    """What the task's rule makes of one answer (row: a benchmark_question with 'text'), for
    predictions.jsonl: pope {pred}; mc {pred (letter or None), score}; vqa {pred (normalised),
    score}; cot {pred, score, missing_marker}; chair {mentioned, hallucinated}."""
    text = row["text"]
    if task == "pope":
        return dict(pred=pope_answer(text))
    if task == "mc":
        letter = extract_letter(text, len(row["options"]), row["options"])
        return dict(pred=letter, score=float(letter == row["answer"]))
    if task == "vqa":
        return dict(pred=normalize_vqa(text), score=vqa_accuracy(text, row["answers"]))
    if task == "cot":
        short = cot_answer(text)
        if short is None:  # no marker, no answer: wrong, and counted in missing_marker
            return dict(pred=None, score=0.0, missing_marker=True)
        return dict(judge("mc" if "options" in row else "vqa", dict(row, text=short)), missing_marker=False)
    if task == "chair":
        truth = canonical_objects(row["objects"], synonyms)
        said = chair_objects(text, synonyms)
        return dict(mentioned=said, hallucinated=[o for o in said if o not in truth])
    raise ValueError(f"unknown benchmark {task!r}, expected one of {BENCHMARKS}")


def score(task, rows, synonyms=None):
    """
    rows (benchmark questions with their answers in 'text') -> {split: metrics}, one split per
    category ('all' when there is none). POPE: score_pope, with 'average'. Others, with 'overall'
    (every question pooled) when there is more than one split:
      mc     accuracy, no_letter (share of answers with no option letter), n
      vqa    accuracy (mean VQA score), n
      cot    accuracy, missing_marker (share without '### Answer:'), n; with a gold 'rationale' per
             question also chain_exact (the answer is the gold chain, verbatim) and
             right_answer_wrong_chain (a right short answer after any other chain)
      chair  chair_s, chair_i, recall, avg_len, n
    """
    if task == "pope":
        return score_pope(rows)
    if task == "chair" and synonyms is None:
        raise ValueError("CHAIR needs a synonym list")

    def metrics(group):
        if task == "chair":
            return chair_metrics([r["text"] for r in group], [r["objects"] for r in group], synonyms)
        verdicts = [judge(task, r) for r in group]
        m = dict(accuracy=sum(v["score"] for v in verdicts) / len(group))
        if task == "mc":
            m["no_letter"] = sum(v["pred"] is None for v in verdicts) / len(group)
        if task == "cot":
            m["missing_marker"] = sum(v["missing_marker"] for v in verdicts) / len(group)
            if all("rationale" in r for r in group):  # the truth is known: was the reasoning itself right?
                exact = [r["text"].strip() == r["rationale"].strip() for r in group]
                m["chain_exact"] = sum(exact) / len(group)
                m["right_answer_wrong_chain"] = sum(v["score"] > 0 and not e for v, e in zip(verdicts, exact)) / len(group)
        return dict(m, n=len(group))

    if not rows:
        raise ValueError(f"{task}: no answers to score")
    out = {c: metrics(g) for c, g in by_category(rows).items()}
    if len(out) > 1:
        out["overall"] = metrics(rows)
    return out

# -----------------------------------------------------------------------------
# 7. preference pairs (dpo.py): three published formats -> one pair -> chosen and rejected samples
#   csr       {"id", "image", "conversations": [.. human, gpt chosen], "rejected_conversations": [.. human, gpt rejected]}
#   reasoner  {"id"?, "image"?, "question", "chosen", "rejected"}          (LLaVA-Reasoner's DPO files)
#   trl       {"prompt", "chosen", "rejected", "images"?}; prompt a string or chat messages whose content
#             may be typed parts [{"type": "image"}, {"type": "text", "text": ...}]; chosen / rejected a
#             string or [{"role": "assistant", "content": ...}]                 (TRL's vision DPO datasets)


def _message_text(content, what):
    """A TRL message's content as text: a string, or typed parts with images as <image>."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("text", "image") for p in content):
        return "".join(IMAGE_PLACEHOLDER + "\n" if p["type"] == "image" else p.get("text", "") for p in content)
    raise DataError(f"{what}: content must be a string or a list of text / image parts, got {content!r:.80}",
                    "malformed record")


def _answer_text(value, what):
    if isinstance(value, list):  # TRL's conversational form: the assistant message(s)
        if not value or not all(isinstance(m, dict) and m.get("role") == "assistant" for m in value):
            raise DataError(f"'{what}' must be a string or a list of assistant messages", "malformed record")
        value = "".join(_message_text(m.get("content"), what) for m in value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"'{what}' must be a non-empty string, got {value!r:.80}", "malformed record")
    return value


def pair_from_record(rec):
    """One preference record in any of the three formats -> dict(id, image, prompt (LLaVA turns up to
    the last human turn), chosen, rejected). Raises DataError naming the problem (the caller adds where)."""
    if not isinstance(rec, dict):
        raise DataError(f"record is a {type(rec).__name__}, not an object", "malformed record")
    if "rejected_conversations" in rec:  # CSR
        conv, rej = rec.get("conversations"), rec["rejected_conversations"]
        for name, c in (("conversations", conv), ("rejected_conversations", rej)):
            check_conversations(c)
            if ROLES[c[-1]["from"]] != "assistant":
                raise DataError(f"'{name}' must end with the answer (a gpt turn)", "malformed record")
        if [(t["from"], t["value"]) for t in conv[:-1]] != [(t["from"], t["value"]) for t in rej[:-1]]:
            raise DataError("the prompt differs between 'conversations' and 'rejected_conversations' "
                            "(every turn before the answer must be the same)", "prompt mismatch")
        prompt, chosen, rejected, image = conv[:-1], conv[-1]["value"], rej[-1]["value"], rec.get("image")
    elif "question" in rec:  # LLaVA-Reasoner
        question, image = rec["question"], rec.get("image")
        if not isinstance(question, str) or not question.strip():
            raise DataError("'question' must be a non-empty string", "malformed record")
        if image and IMAGE_PLACEHOLDER not in question:
            question = IMAGE_PLACEHOLDER + "\n" + question
        prompt = [{"from": "human", "value": question}]
        chosen, rejected = rec.get("chosen"), rec.get("rejected")
    elif "prompt" in rec:  # TRL
        p = rec["prompt"]
        if isinstance(p, str):
            prompt = [{"from": "human", "value": p}]
        elif isinstance(p, list) and p and all(isinstance(m, dict) and m.get("role") in ROLES for m in p):
            prompt = [{"from": m["role"], "value": _message_text(m.get("content"), "prompt")} for m in p]
        else:
            raise DataError("'prompt' must be a string or a list of chat messages with 'role' and 'content'",
                            "malformed record")
        image = rec.get("images", rec.get("image"))
        if isinstance(image, list) and len(image) == 1:
            image = image[0]
        n_img = len(image) if isinstance(image, list) else int(bool(image))
        if n_img and not any(IMAGE_PLACEHOLDER in t["value"] for t in prompt):
            prompt[0] = dict(prompt[0], value=IMAGE_PLACEHOLDER * n_img + "\n" + prompt[0]["value"])
        chosen, rejected = rec.get("chosen"), rec.get("rejected")
    else:
        raise DataError("not a preference record: expected 'conversations' + 'rejected_conversations' (CSR), "
                        "'question' + 'chosen' + 'rejected' (LLaVA-Reasoner) or 'prompt' + 'chosen' + 'rejected' (TRL)",
                        "malformed record")
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if v is None:
            raise DataError(f"missing '{name}'", "malformed record")
    chosen, rejected = _answer_text(chosen, "chosen"), _answer_text(rejected, "rejected")
    if chosen.strip() == rejected.strip():
        raise DataError("chosen and rejected are the same answer: the pair teaches nothing", "identical pair")
    if not prompt or ROLES[prompt[-1]["from"]] != "user":
        raise DataError("the prompt must end with a human turn", "malformed record")
    pair = dict(id=rec.get("id"), image=image, prompt=prompt, chosen=chosen, rejected=rejected)
    check_record(dict(image=image, conversations=prompt + [{"from": "gpt", "value": chosen}]))
    return pair


def load_pairs(spec, image_root=None):
    """All pairs of the files in spec (paths with optional ':ratio', as load_records), each with _src
    and _image_root. The first bad record raises DataError naming its file, index and problem."""
    pairs = []
    for path, ratio in parse_spec(spec):
        root = image_root if image_root is not None else os.path.dirname(path)
        file_pairs = []
        for i, rec in enumerate(read_json_file(path)):
            try:
                pair = pair_from_record(rec)
            except DataError as e:
                raise DataError(f"{where(rec, (path, i))}: {e}", e.kind) from None
            if pair["id"] is None:
                pair["id"] = f"{os.path.basename(path)}:{i}"
            file_pairs.append(dict(pair, _src=(path, i), _image_root=root))
        pairs += subsample(file_pairs, ratio)
    return pairs


def truncate_words(text, n):
    """The first n whitespace-separated words (LLaVA-Reasoner trains DPO on the first 90); n=0: all."""
    words = text.split()
    return text if not n or len(words) <= n else " ".join(words[:n])


def build_answer(prompt, answer, tokenizer, template, image_token_id, num_image_tokens, n_images, max_len=None,
                 max_words=0, drop_eos=False):
    """The conversation prompt (LLaVA turns ending with a human one) + answer -> (input_ids, labels,
    start): only the final answer is supervised (earlier answers in a multi-turn prompt are not), start
    is its first token. max_words: cut the answer to its first words; drop_eos: leave its end-of-turn
    token(s) unsupervised (LLaVA-Reasoner: a truncated answer must not learn to stop there). DPO's
    chosen and rejected, and a best-of-N verifier's candidates, are scored on exactly these tokens."""
    conv = list(prompt) + [{"from": "gpt", "value": truncate_words(answer, max_words)}]
    s = build_sample(conv, tokenizer, template, image_token_id, num_image_tokens, n_images=n_images, max_len=max_len)
    ids, labels = s["input_ids"], s["labels"]
    start = next(i for i in range(len(labels) - 1, -1, -1) if labels[i] != IGNORE_INDEX and
                 (i == 0 or labels[i - 1] == IGNORE_INDEX))  # the final answer's first token
    labels = [IGNORE_INDEX] * start + labels[start:]
    if drop_eos:
        special = set(tokenizer.all_special_ids)
        end = len(labels)
        while end > start and (labels[end - 1] == IGNORE_INDEX or labels[end - 1] in special):
            end -= 1
        labels = labels[:end] + [IGNORE_INDEX] * (len(labels) - end)
    if all(l == IGNORE_INDEX for l in labels):
        raise DataError("no supervised tokens left", "no supervised tokens")
    return ids, labels, start


def build_pair(pair, tokenizer, template, image_token_id, num_image_tokens, max_len=None, max_words=0, drop_eos=False):
    """A pair -> dict(chosen_ids, chosen_labels, rejected_ids, rejected_labels): the prompt is shared
    and unsupervised, only the final answer is supervised (build_answer)."""
    n_images = len(record_images(pair))
    out, prompt_ids = {}, None
    for side in ("chosen", "rejected"):
        try:
            ids, labels, start = build_answer(pair["prompt"], pair[side], tokenizer, template, image_token_id,
                                              num_image_tokens, n_images, max_len, max_words, drop_eos)
        except DataError as e:  # name the side that failed
            raise DataError(f"{side}: {e}", e.kind) from None
        if prompt_ids is None:
            prompt_ids = ids[:start]
        elif ids[:start] != prompt_ids:
            raise DataError("chosen and rejected tokenise to different prompts", "prompt mismatch")
        out[side + "_ids"], out[side + "_labels"] = ids, labels
    return out


class PairDataset(SFTDataset):
    """Pairs -> dict(index, chosen_ids, chosen_labels, rejected_ids, rejected_labels, pixel_values, n_images).
    The image is loaded once per pair; skip_bad, validate() and error messages as SFTDataset."""

    def __init__(self, pairs, tokenizer, image_processor, template, image_token_id, num_image_tokens, image_root,
                 max_len=None, pad_to_square=True, skip_bad=False, max_words=0, drop_eos=False):
        super().__init__(pairs, tokenizer, image_processor, template, image_token_id, num_image_tokens, image_root,
                         max_len=max_len, pad_to_square=pad_to_square, skip_bad=skip_bad)
        self.max_words, self.drop_eos = max_words, drop_eos

    def text_sample(self, pair):
        return build_pair(pair, self.tokenizer, self.template, self.image_token_id, self.num_image_tokens,
                          self.max_len, self.max_words, self.drop_eos)

    def __getitem__(self, i):
        pair = self.records[i]
        try:
            s = self.text_sample(pair)
            images = [process_image(load_image(p), self.image_processor, self.pad_to_square)
                      for p in image_paths(pair, self.image_root)]
        except DataError as e:
            return self.bad(pair, e)
        return dict(index=i, pixel_values=torch.stack(images) if images else None, n_images=len(images),
                    **{k: torch.tensor(v, dtype=torch.long) for k, v in s.items()})


def collate_pairs(batch, pad_id):
    """Pairs -> one batch of 2B rows: the B chosen rows, then the B rejected ones (right-padded together),
    pixel_values of the B pairs once (the model repeats their features for the rejected rows:
    image_repeat=2), index (B,), the pairs' dataset indices, and skipped (as collate). None if every
    pair was skipped."""
    batch, skipped = dropped(batch)
    if not batch:
        return None
    rows = [dict(input_ids=b["chosen_ids"], labels=b["chosen_labels"], pixel_values=b["pixel_values"]) for b in batch]
    rows += [dict(input_ids=b["rejected_ids"], labels=b["rejected_labels"]) for b in batch]
    out = collate(rows, pad_id)
    out["index"] = torch.tensor([b["index"] for b in batch], dtype=torch.long)
    out["skipped"] = skipped
    return out

# -----------------------------------------------------------------------------
# 8. prompt files (selfreward.py): the prompts a model answers to make its own preference pairs
#   csr    {"id", "image", "input"}                          (CSR's CSR-Prompt-Dataset-12k.json)
#   llava  {"id", "image", "conversations": [human, ...]}     (the first human turn is the prompt)


def prompt_from_record(rec):
    """dict(id, image, prompt) with the prompt's own text: <image> placeholders removed (the
    prompt builder puts one <image> first, as LLaVA and CSR's sampler do). Raises DataError."""
    if not isinstance(rec, dict):
        raise DataError(f"record is a {type(rec).__name__}, not an object", "malformed record")
    if "input" in rec:
        text = rec["input"]
    elif "conversations" in rec:
        conv = rec["conversations"]
        if not isinstance(conv, list) or not conv or not isinstance(conv[0], dict) or ROLES.get(conv[0].get("from")) != "user":
            raise DataError("'conversations' must start with a human turn (the prompt)", "malformed record")
        text = conv[0].get("value")
    else:
        raise DataError("unknown prompt format: expected 'input' (CSR: id, image, input) or 'conversations' "
                        "(LLaVA: the first human turn is the prompt)", "malformed record")
    if not isinstance(text, str) or not text.replace(IMAGE_PLACEHOLDER, "").strip():
        raise DataError("empty prompt", "no prompt")
    images = record_images(rec)
    if len(images) != 1:
        raise DataError(f"self-rewarding needs exactly one image per prompt, got {len(images)}", "image count mismatch")
    return dict(id=rec.get("id"), image=images[0], prompt=text.replace(IMAGE_PLACEHOLDER, "").strip())


GOLD_KEYS = ("options", "answer", "answers")  # what question_from_record keeps of the gold


def question_from_record(rec):
    """A question with its gold short answer, for CoT answer sampling -> dict(id, image, prompt (with
    COT_SUFFIX, <image> removed) and the gold: options + answer (a letter) or answers [..]). Either
      - a question record: question (or text), answer (or answers), options (optional), image, as
        data.benchmark_question reads a 'cot' question, or
      - a LLaVA conversation: the first human turn is the question, the first gpt turn the gold (the
        text after its last '### Answer:' when it has one); options are read from the question
        ('A. ...' lines or 'Options: (A) ...'), the gold then read as a letter.
    A direct-answer suffix on the question is replaced by the CoT one. The gold chain, when the record
    has one ('rationale', or a gpt turn with '### Answer:'), comes along as 'rationale': never used to
    check an answer, only to count how often a right answer came after another chain. Raises DataError."""
    if not isinstance(rec, dict):
        raise DataError(f"record is a {type(rec).__name__}, not an object", "malformed record")
    images = record_images(rec)
    if len(images) != 1:
        raise DataError(f"answer sampling needs exactly one image per question, got {len(images)}", "image count mismatch")
    if "conversations" in rec and "question" not in rec and "text" not in rec:
        check_conversations(rec["conversations"])
        turns = rec["conversations"]
        human = next((t["value"] for t in turns if ROLES[t["from"]] == "user"), None)
        gpt = next((t["value"] for t in turns if ROLES[t["from"]] == "assistant"), None)
        if human is None or gpt is None:
            raise DataError("needs a human turn (the question) and a gpt turn (the gold answer)", "malformed record")
        text = human.replace(IMAGE_PLACEHOLDER, "").strip()
        gold = cot_answer(gpt) if COT_MARKER in gpt else gpt.strip()
        if not gold:
            raise DataError(f"no gold answer in the gpt turn {gpt!r:.60}", "no gold answer")
        q = dict(id=rec.get("id"), image=images[0], **(dict(rationale=gpt) if COT_MARKER in gpt else {}))
        opts = parse_options(text)
        if opts:
            letter = extract_letter(gold, len(opts), opts)
            if letter is None:
                raise DataError(f"the gold answer {gold!r:.40} names none of the options", "no gold answer")
            q.update(options=opts, answer=letter)
        else:
            q["answers"] = [gold]
    else:
        if "answer" not in rec and "answers" not in rec:
            raise DataError("no gold answer: needs 'answer' (or 'answers')", "no gold answer")
        b = benchmark_question(dict(rec, question_id=rec.get("question_id", rec.get("id", 0))), "cot")
        text = b["prompt"]
        q = dict(id=rec.get("question_id", rec.get("id")), image=images[0],
                 **{k: b[k] for k in GOLD_KEYS + ("rationale",) if k in b})
    text = strip_modes(text)  # a direct-answer suffix makes way for the CoT one
    if not text:
        raise DataError("empty question", "no prompt")
    return dict(q, prompt=with_suffix(text, COT_SUFFIX))


def load_prompts(path, image_root=None, limit=0, image_prefix="", kind="prompt"):
    """The prompts of a .json / .jsonl file (the first `limit` when limit > 0), each with _src, the
    image's full path under 'path' (image_root / image_prefix + image: CSR's file names images
    000000442786.jpg, COCO's train2014 folder holds COCO_train2014_000000442786.jpg) and a unique id;
    every image is checked to exist. kind: 'prompt' (prompt_from_record: CSR's describe prompts) or
    'question' (question_from_record: questions with a gold answer). The first bad record raises
    DataError naming the file, record and problem."""
    root = image_root if image_root is not None else os.path.dirname(path)
    raw = read_json_file(path)
    parse = dict(prompt=prompt_from_record, question=question_from_record)[kind]
    out, seen = [], set()
    for i, rec in enumerate(raw[:limit] if limit else raw):
        try:
            p = parse(rec)
            p["image"] = os.path.join(os.path.dirname(p["image"]), image_prefix + os.path.basename(p["image"]))
            p["path"] = resolve_image(root, p["image"])
            check_image_file(p["path"])
        except DataError as e:
            raise DataError(f"{where(rec, (path, i))}: {e}", e.kind) from None
        p["id"] = str(p["id"]) if p["id"] is not None else f"{os.path.basename(path)}:{i}"
        if p["id"] in seen:
            raise DataError(f"{where(rec, (path, i))}: duplicate id {p['id']!r} (ids name the pairs and the resume journal)",
                            "duplicate id")
        seen.add(p["id"])
        out.append(dict(p, _src=(path, i)))
    return out


def prompt_inputs(prompts, vlm):
    """Prompts as load_prompts gives them (dicts with 'prompt' and the image's 'path') -> (prompt id
    lists, (B, 3, H, W) pixels on the model's device, the PIL images): the image first, as LLaVA's
    eval scripts put it, each prepared as training prepares it (the model's template and padding)."""
    images = [load_image(p["path"]) for p in prompts]
    dev = next(vlm.parameters()).device
    px = torch.stack([process_image(im, vlm.image_processor, vlm.config["pad_to_square"]) for im in images]).to(dev)
    ids = [build_prompt(IMAGE_PLACEHOLDER + "\n" + p["prompt"], vlm.tokenizer, vlm.config["template"],
                        vlm.image_token_id, vlm.num_image_tokens) for p in prompts]
    return ids, px, images
