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
import warnings
from collections import Counter
from functools import lru_cache

import torch
from PIL import Image

IGNORE_INDEX = -100  # label value the loss skips (same as F.cross_entropy's default ignore_index)
IMAGE_PLACEHOLDER = "<image>"
TEMPLATES = ("plain", "vicuna_v1", "chat")
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
# LLaVA's "from" values, plus the chat-template names people also write
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A problem with one record or sample. `kind` is a short label used to count skips."""

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
            raise ValueError(f"{path}: sample ratio must be a finite number >= 0, got {ratio}")
        out.append((path, ratio))
    if not out:
        raise ValueError(f"no data files in {spec!r}")
    return out


def split_ratio(item):
    if os.path.exists(item):
        return item, 1.0
    path, sep, tail = item.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return item, 1.0


def read_json_file(path):
    """The raw objects of a .json (a list) or .jsonl (one object per line) file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found", "missing file")
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from Windows editors
        text = f.read()
    if path.endswith(".jsonl"):
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} (record {len(records)}): invalid JSON: "
                                f"{e.msg} at column {e.colno}", "invalid json") from None
        return records
    if not path.endswith(".json"):
        raise DataError(f"{path}: unknown data file type (expected .json or .jsonl)", "invalid json")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}",
                        "invalid json") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got a {type(records).__name__} "
                        f"(use .jsonl for one object per line)", "invalid json")
    return records


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
    return [p if os.path.isabs(p) else os.path.join(root, p) for p in record_images(record)]

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
    counted in self.skipped (by problem kind), warned about once per kind, and returned as None.
    Call validate() first so text problems are decided and reported once, before training.
    Note: DataLoader workers count skips in their own copies of self.skipped.
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
        return None

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
        files, not truncated ones. skip_bad=False: raises the first error.
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


def collate(batch, pad_id):
    """
    Right-pad a list of samples (None = skipped, dropped) into (B, T) tensors. Images of all
    samples are concatenated in order: the model fills image-token positions in row-major
    order, which visits the samples, and the images within each, in the same order.
    Returns None if every sample was skipped.
    """
    batch = [b for b in batch if b is not None]
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
                pixel_values=torch.cat(images) if images else None)

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
