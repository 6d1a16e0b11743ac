"""
Reflective instruction tuning (REVERIE, Zhang et al. 2024): turn REVERIE's annotations into the LLaVA
conversations sft.py trains on. Besides the answer, the model learns a rationale for why the correct
response is right and why a confusing response is wrong; the rationales are a training-time signal
only (evaluation asks the first turn, as always).

    python prepare_reverie.py                                        # the shapes world's rows (shapes/prepare.py)
    python prepare_reverie.py --rationales=none                      # the answer-only baseline, same questions
    python prepare_reverie.py --data_path=reverie.json --image_root=playground/data \
        --image_map="VG_100K:vg/VG_100K,VG_100K_2:vg/VG_100K_2,train2017:coco/train2017" \
        --base_path=playground/data/llava_v1_5_mix665k.json --out_path=playground/data/reverie_mix665k.json

Input (data_path, .json list or .jsonl), detected from its records:
  raw       REVERIE's generator rows: image, question, correct_answer, confusing_answer,
            correct_rationale, incorrect_rationale, optionally a judge verdict (gemini_pro_judge,
            chatgpt_judge, gpt3.5_judge or judge: 'yes' = the two rationales contradict each other).
            Several rows of one instruction (one per confusing answer) are grouped by image + question.
  released  reverie.json: one row per instance, a 4-turn LLaVA conversation (question, answer,
            a request for the rationale, the rationale); a row whose request says the answer is
            wrong / incorrect is a negative one. Rows are kept in their released wording.
Output (out_path, atomically): LLaVA records {id, image, conversations}, shuffled by seed, <image>
first in the first human turn; with base_path, that file's records (a base_ratio share of them) mixed
in. Every image is checked up front (after image_map): the missing ones are listed in one error.

Rows per instruction (layout=separate, the paper's choice): one per response,
    positive  Q -> correct answer -> positive_prompt -> why it is right
    negative  Q -> correct answer -> negative_prompt (the confusing answer) -> why that one is wrong
layout=joint: one conversation, Q -> answer -> positive_prompt -> why -> negative_prompt -> why not.
rationales=none writes Q -> correct answer only: with answer_rows=match as many rows per instruction
as rationales=both would, none for an instruction with no usable rationale (so a comparison holds the
questions, the answer tokens and the steps equal), with answer_rows=one a single row. A raw row's answers
may be numbers (the released generator parses its model's output with ast.literal_eval): read as text.
"""
import json
import os
import random
import re
from collections import Counter

import data as D

# -----------------------------------------------------------------------------
data_path = "data/shapes/reverie_raw.json"
out_path = "data/shapes/reverie.json"
image_root = "data/shapes/images"     # images are checked under it
image_map = ""                        # 'from:to,...': a path with a folder named 'from' becomes 'to' + what follows it
rationales = "both"                   # both | positive | negative | none (answer only: the baseline)
layout = "separate"                   # separate (one conversation per response) | joint (one with both rationales)
answer_rows = "match"                 # rationales=none: match (as many rows as 'both' would make) | one
positive_prompt = "Explain why."      # the request for the correct response's rationale
negative_prompt = "Explain why this answer is wrong: {answer}"  # ... for the confusing one's ({answer} = it)
filter_inconsistent = True            # raw rows with a judge verdict: drop the instruction if it says 'yes' (a contradiction)
max_instructions = 0                  # keep this many instructions (all rows of one together); 0 = all
base_path = ""                        # mix with a base SFT file (LLaVA's llava_v1_5_mix665k.json) ...
base_ratio = 1.0                      # ... this share of its records
seed = 1337
# -----------------------------------------------------------------------------
from configurator import ConfigError, configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------
RAW_FIELDS = ("image", "question", "correct_answer", "confusing_answer", "correct_rationale", "incorrect_rationale")
JUDGE_FIELDS = ("gemini_pro_judge", "chatgpt_judge", "gpt3.5_judge", "judge")
NEGATIVE_REQUEST = re.compile(r"\b(wrong|incorrect)\b", re.I)  # how a released negative row's request reads


def text_of(value, where, field):
    if field in ("correct_answer", "confusing_answer") and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # the released generator parses the model's output with ast.literal_eval: "2" arrives as 2
    if not isinstance(value, str):
        raise D.DataError(f"{where}: {field!r} must be a string, got {type(value).__name__}", "malformed record")
    return value.replace(D.IMAGE_PLACEHOLDER, "").strip()


def parse_map(spec):
    """'a:b,c:d' -> [('a', 'b'), ('c', 'd')]."""
    pairs = [p.split(":", 1) for p in spec.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() for p in pairs):
        raise ConfigError(f"image_map must be 'from:to,...', got {spec!r}")
    return [(a.strip(), b.strip()) for a, b in pairs]


def remap(path, pairs):
    """The first 'from' that is a folder of path: everything up to and including it becomes 'to'."""
    parts = path.replace("\\", "/").split("/")
    for a, b in pairs:
        if a in parts[:-1]:
            return "/".join([b.rstrip("/")] + parts[parts.index(a) + 1:])
    return path


def detect(records, path):
    first = records[0]
    if isinstance(first, dict) and "conversations" in first:
        return "released"
    if isinstance(first, dict) and "correct_answer" in first:
        return "raw"
    keys = list(first)[:8] if isinstance(first, dict) else type(first).__name__
    raise D.DataError(f"{path}: record 0: unknown format {keys}: expected REVERIE's raw rows ({', '.join(RAW_FIELDS)}) "
                      f"or reverie.json's 4-turn 'conversations'", "unknown format")


def verdict(rec, where):
    """True if a judge says the rationales contradict each other, False if every judge says they do
    not, None without a verdict."""
    says = []
    for k in JUDGE_FIELDS:
        if rec.get(k) is not None:
            v = str(rec[k]).strip().lower()
            if not v.startswith(("yes", "no")):
                raise D.DataError(f"{where}: {k!r} must be 'Yes' or 'No', got {rec[k]!r:.40}", "malformed record")
            says.append(v.startswith("yes"))
    return any(says) if says else None


def read_instructions(records, fmt, path, dropped):
    """-> {key: instruction}, in file order; an instruction is dict(image, question, answer, pos, neg),
    pos and neg the (request, rationale) turns that follow the answer in its positive and negative
    rows: for raw rows the requests are positive_prompt and negative_prompt with the confusing answer,
    for released rows their own wording."""
    out = {}
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise D.DataError(f"{where}: a {type(rec).__name__}, not an object", "malformed record")
        if fmt == "raw":
            missing = [f for f in RAW_FIELDS if f not in rec]
            if missing:
                raise D.DataError(f"{where}: missing field {', '.join(map(repr, missing))} (raw REVERIE rows have "
                                  f"{', '.join(RAW_FIELDS)})", "malformed record")
            f = {k: text_of(rec[k], where, k) for k in RAW_FIELDS}
            if not f["image"] or not f["question"] or not f["correct_answer"]:
                raise D.DataError(f"{where}: empty image, question or correct_answer", "malformed record")
            key = (f["image"], f["question"])
            ins = out.setdefault(key, dict(image=f["image"], question=f["question"], answer=f["correct_answer"],
                                           pos=[], neg=[], inconsistent=False, src=where))
            if ins["answer"] != f["correct_answer"]:
                raise D.DataError(f"{where}: correct_answer {f['correct_answer']!r:.40} differs from {ins['src']}'s "
                                  f"{ins['answer']!r:.40} for the same image and question", "malformed record")
            if filter_inconsistent and verdict(rec, where):
                ins["inconsistent"] = True
            if f["correct_rationale"]:
                ins["pos"] = ins["pos"] or [(positive_prompt, f["correct_rationale"])]
            else:
                dropped["empty correct_rationale"] += 1
            if not f["confusing_answer"] or not f["incorrect_rationale"]:
                dropped["empty confusing_answer or incorrect_rationale"] += 1
            elif f["confusing_answer"].lower() == f["correct_answer"].lower():
                dropped["confusing answer equals the correct one"] += 1
            elif (request := negative_prompt.format(answer=f["confusing_answer"])) not in [r for r, _ in ins["neg"]]:
                ins["neg"].append((request, f["incorrect_rationale"]))
        else:
            conv = rec.get("conversations")
            try:
                D.check_conversations(conv)
            except D.DataError as e:
                raise D.DataError(f"{where}: {e}", e.kind) from None
            if len(conv) != 4 or [D.ROLES[t["from"]] for t in conv] != ["user", "assistant"] * 2:
                raise D.DataError(f"{where}: reverie.json rows are 4 turns (human question, gpt answer, human request, "
                                  f"gpt rationale), got {len(conv)}", "malformed record")
            image = rec.get("image")
            if not isinstance(image, str) or not image:
                raise D.DataError(f"{where}: needs an 'image'", "malformed record")
            q, a, request, rationale = (text_of(t["value"], where, "conversations") for t in conv)
            key = (image, q)
            ins = out.setdefault(key, dict(image=image, question=q, answer=None, pos=[], neg=[], inconsistent=False,
                                           src=where))
            if not rationale:
                dropped["empty rationale"] += 1
            elif NEGATIVE_REQUEST.search(request):  # its own answer turn is not used: the positive row's is
                ins["neg"].append((request, rationale))
            else:
                ins["answer"], ins["pos"] = a, [(request, rationale)]
    return out


def rows_of(ins):
    """The conversations (lists of (human, gpt) pairs) this instruction gives under the settings."""
    q, a, pos, neg = ins["question"], ins["answer"], ins["pos"], ins["neg"]
    if rationales == "none":  # the answer-only baseline: one row, or (match) as many as 'both' writes, none included
        n = 1 if answer_rows == "one" else (1 if pos or neg else 0) if layout == "joint" else len(pos) + len(neg)
        return [("answer", [(q, a)])] * n
    pos = pos if rationales in ("both", "positive") else []
    neg = neg if rationales in ("both", "negative") else []
    if layout == "joint":
        return [("joint", [(q, a)] + pos + neg)] if pos or neg else []
    return [("positive", [(q, a), p]) for p in pos] + [("negative", [(q, a), n]) for n in neg]


# -----------------------------------------------------------------------------
if rationales not in ("both", "positive", "negative", "none"):
    raise ConfigError(f"rationales must be both, positive, negative or none, got {rationales!r}")
if layout not in ("separate", "joint"):
    raise ConfigError(f"layout must be separate or joint, got {layout!r}")
if answer_rows not in ("match", "one"):
    raise ConfigError(f"answer_rows must be match or one, got {answer_rows!r}")
if "{answer}" not in negative_prompt:
    raise ConfigError("negative_prompt must contain {answer} (where the confusing answer goes)")
pairs = parse_map(image_map)
records = D.read_json_file(data_path)
fmt = detect(records, data_path)
dropped = Counter()
instructions = read_instructions(records, fmt, data_path, dropped)
for key, ins in list(instructions.items()):
    reason = ("inconsistent rationales (judge)" if ins["inconsistent"] else
              "no correct answer (no positive row)" if ins["answer"] is None else None)
    if reason:
        dropped[reason] += 1
        del instructions[key]
rng = random.Random(seed)
keys = list(instructions)
if max_instructions and max_instructions < len(keys):
    keep = set(rng.sample(range(len(keys)), max_instructions))
    keys = [k for i, k in enumerate(keys) if i in keep]

out, kinds, missing = [], Counter(), {}
for n, key in enumerate(keys):
    ins = instructions[key]
    image = remap(ins["image"], pairs)
    try:
        path = D.resolve_image(image_root, image) if image_root else image
    except D.DataError as e:  # a relative path that leaves image_root
        raise D.DataError(f"{ins['src']}: {e}", e.kind) from None
    if not os.path.isfile(path):
        missing.setdefault(path, ins["src"])
    for j, (kind, turns) in enumerate(rows_of(ins)):
        kinds[kind] += 1
        conv = []
        for t, (h, g) in enumerate(turns):
            conv += [{"from": "human", "value": (D.IMAGE_PLACEHOLDER + "\n" + h) if t == 0 else h},
                     {"from": "gpt", "value": g}]
        out.append({"id": f"reverie_{n}_{kind}_{j}", "image": image, "conversations": conv})
if missing:
    first = list(missing.items())[:10]
    raise D.DataError(f"{data_path}: {len(missing)} images not found under {image_root!r}"
                      + (f" (after image_map {image_map!r})" if image_map else "") + ": "
                      + "; ".join(f"{p} ({src})" for p, src in first) + (" ..." if len(missing) > 10 else ""),
                      "missing image")
n_base = 0
if base_path:
    base = D.subsample(D.read_json_file(base_path), base_ratio, seed)
    n_base = len(base)
    out += base
rng.shuffle(out)
if not out:
    raise D.DataError(f"{data_path}: no rows to write (dropped: {dict(dropped)})", "empty output")
D.write_atomic(out_path, json.dumps(out, indent=1))
summary = dict(config=config, format=fmt, instructions=len(keys), rows=dict(kinds), base_rows=n_base,
               dropped=dict(dropped), total=len(out))
D.write_atomic(os.path.splitext(out_path)[0] + "_summary.json", json.dumps(summary, indent=1))
print(f"{data_path} ({fmt} rows): {len(keys)} instructions -> " + ", ".join(f"{k} rows {v}" for k, v in kinds.items())
      + (f", base rows {n_base} ({base_path}, ratio {base_ratio})" if base_path else ""))
print("dropped: " + (", ".join(f"{k} {v}" for k, v in dropped.items()) if dropped else "nothing"))
print(f"wrote {out_path} ({len(out)} records) and its _summary.json")
