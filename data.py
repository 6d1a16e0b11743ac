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
6. preference pairs for dpo.py: the CSR, LLaVA-Reasoner and TRL formats -> chosen and rejected
   samples sharing one prompt and one image.
7. prompt files for selfreward.py: CSR's {id, image, input} or LLaVA conversations (first human turn).
(Benchmark question files and their scoring rules are tasks/'s.)

A record looks like
    {"id": "0001", "image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}
"image" may also be a list of paths (one per <image>) or absent/null for text-only samples.
"""
import base64
import io
import json
import math
import multiprocessing
import os
import random
import re
import tempfile
import warnings
from collections import Counter
from functools import lru_cache

import torch
from PIL import Image

from lucid import errors

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
    (lucid/errors.py), or, where the user asked to skip (skip_bad), counts it and reports the counts."""

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
    crash leaves the previous file intact (results and metrics files of every stage script). A kill
    between the two leaves the temporary (.<name>.<random>.tmp) behind: atomic_temporary names it, and
    a training run's recovery (lucid/checkpoint.py) deletes those in its directory."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


_ATOMIC_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}(\.tmp)?$")  # mkstemp's 8 random characters; '.tmp' since 2026-12-07


def atomic_temporary(name):
    """True for the file name of a write_atomic temporary (also the older ones, without '.tmp')."""
    return bool(_ATOMIC_TEMPORARY.match(name))


# -----------------------------------------------------------------------------
# 2. templates: conversation -> segments (text or a token id, supervised or not) -> ids, labels


def image_first(text):
    """LLaVA's preprocess_multimodal: a turn's one <image> moves to the front ('Q\\n<image>', as some
    llava_v1_5_mix665k records have it, is read as '<image>\\nQ', as evaluation prompts put it). Several
    placeholders in one turn stay where they are: their places say which image goes where."""
    if text.count(IMAGE_PLACEHOLDER) != 1 or text.startswith(IMAGE_PLACEHOLDER + "\n"):
        return text
    return IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()


def to_messages(conversations, system=None):
    """LLaVA turns -> chat messages (a turn's single <image> first, image_first); `system` is used
    when the conversation has no system turn."""
    messages = [{"role": ROLES[t["from"]], "content": image_first(t["value"])} for t in conversations]
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


def load_image_b64(text, name, check=False):
    """An image stored as base64 text (MMBench's TSV cells); name says which, in errors. check: read
    the header only (what check_image_file does for a file)."""
    try:
        img = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
        return img if check else img.convert("RGB")
    except Exception as e:
        raise DataError(f"cannot read the base64 image of {name}: {type(e).__name__}: {e}", "corrupt image") from None


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

    def validate(self, check_images=False, rank=0, world_size=1, workers=0):
        """
        Build every sample's text (no image decoding) and return the indices that are fine.
        check_images=True also opens each image file's header: catches missing and non-image
        files; 'full' decodes each image too, which also catches truncated ones (otherwise those
        fail when decoded: an error, or with skip_bad a skip the batch counts). skip_bad=False:
        raises the first error, in file order. Sets self.lengths: each good sample's token count.

        world_size > 1 (torch.distributed initialised): each rank checks every world_size-th
        record and the verdicts are gathered, so the work is split and every rank ends with the
        same list, the same skip counts and the same first error (ranks that disagreed on the data
        would disagree on the number of steps, and hang). workers: see check.
        """
        verdicts = self.check(check_images, rank, world_size, workers)
        if world_size > 1:
            parts = [None] * world_size
            torch.distributed.all_gather_object(parts, verdicts)
            verdicts = {i: v for part in parts for i, v in part.items()}
        good, self.lengths = [], {}
        for i in range(len(self.records)):
            if isinstance(verdicts[i], tuple):
                self.bad(self.records[i], DataError(*verdicts[i]))
            else:
                good.append(i)
                self.lengths[i] = verdicts[i]
        return good

    def check(self, check_images=False, rank=0, world_size=1, workers=0, indices=None):
        """validate()'s work on this rank's share: {index: token count, or (message, kind) of its error}.
        workers > 1: in that many forked processes (tokenising is most of start-up: ~0.5 ms a record, measured)."""
        indices = range(rank, len(self.records), world_size) if indices is None else indices
        if workers > 1 and len(indices) >= 2000:
            global _checking
            _checking = (self, check_images)
            chunks = [indices[k:k + 1000] for k in range(0, len(indices), 1000)]
            with multiprocessing.get_context("fork").Pool(workers) as pool:  # fork: the dataset is shared, not pickled
                return {i: v for part in pool.imap(_check_chunk, chunks) for i, v in part.items()}
        verdicts = {}
        for i in indices:
            record = self.records[i]
            try:
                sample = self.text_sample(record)
                if check_images:
                    for path in image_paths(record, self.image_root):
                        check_image_file(path, decode=check_images == "full")
                verdicts[i] = max(len(sample[k]) for k in ("input_ids", "chosen_ids", "rejected_ids") if k in sample)
            except DataError as e:
                verdicts[i] = (str(e), e.kind)
        return verdicts


_checking = None  # (dataset, check_images) for the forked workers of SFTDataset.check


def _check_chunk(indices):
    ds, check_images = _checking
    return ds.check(check_images, indices=indices)


def check_image_file(path, decode=False):
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}", "missing image")
    try:
        with Image.open(path) as img:  # lazy: reads the header only
            if decode:
                img.load()
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


def grouping_lengths(ds, indices):
    """What batch_indices' length grouping sorts by, one per index: the sample's token count (a pair's
    longer answer), negative when it has no image (LLaVA's group_by_modality_length marks them so)."""
    return tuple(ds.lengths[i] * (1 if record_images(ds.records[i]) else -1) for i in indices)


def batch_indices(n, global_batch, step, seed, rank=0, world_size=1, group=0, lengths=None):
    """
    This rank's share of optimizer step `step`'s global batch. The data is an endless stream of
    permutations of range(n) (epoch e seeded by seed + e); step s takes stream items
    [s*global_batch, (s+1)*global_batch) and rank r gets every world_size-th of them from r.
    So the global batch is the same for any world size, and resuming at a step continues exactly.

    group=k > 0 with lengths (one per item: its token count, negative for a text-only sample, as
    LLaVA's group_by_modality_length marks them): the stream is cut into windows of k global
    batches; a window's items are sorted by modality and length, cut into its k batches, and those
    visited in a seeded random order; each rank takes a contiguous run of its step's sorted batch.
    Micro-batches then hold samples of one modality and similar length: far less padding. Every
    sample is still seen once per epoch (up to the windows that straddle an epoch's end), and the
    global batch is still the same for any world size.
    """
    if n <= 0:
        raise ValueError("batch_indices: empty dataset")
    if global_batch <= 0 or global_batch % world_size != 0:
        raise ValueError(f"global batch {global_batch} must be a positive multiple of world size {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    if group and lengths is not None:
        if len(lengths) != n:
            raise ValueError(f"batch_indices: {len(lengths)} lengths for {n} items")
        w = step // group
        batch = _grouped_window(n, global_batch, seed, group, w, tuple(lengths))[step - w * group]
        share = global_batch // world_size
        return list(batch[rank * share:(rank + 1) * share])
    start = step * global_batch
    batch = [epoch_permutation(n, seed, pos // n)[pos % n] for pos in range(start, start + global_batch)]
    return batch[rank::world_size]


@lru_cache(maxsize=2)
def _grouped_window(n, global_batch, seed, group, w, lengths):
    """Window w's `group` global batches, length-grouped (see batch_indices), in their visiting order."""
    start = w * group * global_batch
    items = [epoch_permutation(n, seed, pos // n)[pos % n] for pos in range(start, start + group * global_batch)]
    items.sort(key=lambda i: (lengths[i] > 0, abs(lengths[i])))
    batches = [items[b * global_batch:(b + 1) * global_batch] for b in range(group)]
    order = torch.randperm(group, generator=torch.Generator().manual_seed(seed * 1_000_003 + w)).tolist()
    return [batches[b] for b in order]


def micro_batches(indices, micro_batch_size):
    """Split a rank's indices into gradient-accumulation micro batches."""
    return [indices[i:i + micro_batch_size] for i in range(0, len(indices), micro_batch_size)]

# -----------------------------------------------------------------------------
# 6. preference pairs (dpo.py): three published formats -> one pair -> chosen and rejected samples
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
    """The first n words (LLaVA-Reasoner trains DPO on the first 90); n=0: all. As the released code cuts:
    split on single spaces and joined back with them, so newlines stay inside a 'word' and the text up to
    the cut is kept as written."""
    words = text.split(" ")
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
# 7. prompt files (selfreward.py): the prompts a model answers to make its own preference pairs
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


def load_prompts(path, image_root=None, limit=0, image_prefix="", parse=None):
    """The prompts of a .json / .jsonl file (the first `limit` when limit > 0), each with _src, the
    image's full path under 'path' (image_root / image_prefix + image: CSR's file names images
    000000442786.jpg, COCO's train2014 folder holds COCO_train2014_000000442786.jpg) and a unique id;
    every image is checked to exist. parse reads one record: prompt_from_record (None, the default: CSR's
    describe prompts) or tasks.benchmark.question_from_record (questions with a gold answer). The first bad record raises
    DataError naming the file, record and problem."""
    root = image_root if image_root is not None else os.path.dirname(path)
    raw = read_json_file(path)
    parse = parse or prompt_from_record
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
