"""
Evaluate a checkpoint: generate answers to benchmark questions, score them, print a table and
write predictions.jsonl + metrics.json (atomically) under out_dir.

Held-out short-answer questions of the shapes world (after `python prepare_shapes.py` and `python sft.py`):
    python evaluate.py
Any checkpoint (ours or llava-hf) on a question file in the same format:
    python evaluate.py --init_from=out/sft --data_path=data/shapes/test.jsonl
Several GPUs (questions are sharded over ranks and gathered):
    torchrun --standalone --nproc_per_node=8 evaluate.py --init_from=...

Task 'short': LLaVA-style question files, one JSON object a line: question_id, image (relative to
image_root), text (the prompt), answer (gold short answer), type (a category to break accuracy down
by). Score: exact match after lower-casing and stripping punctuation and articles.
"""
import json
import os
import re
import time

import torch
from tqdm import tqdm

import data as D
import model as M

# -----------------------------------------------------------------------------
init_from = "out/sft"
task = "short"
data_path = "data/shapes/test.jsonl"
image_root = "data/shapes/images"
out_dir = ""               # '' = <init_from>/eval
batch_size = 32
max_new_tokens = 16
show = 8                   # print this many question / answer / truth examples
device = "auto"
dtype = "auto"
seed = 1337
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------


def normalize(text):
    """Lower case, first line, no punctuation or articles: 'Yes.' == 'yes', 'A red circle.' == 'red circle'."""
    text = text.strip().split("\n")[0].lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


dist = M.init_distributed(seed, None if device == "auto" else device)
dev = dist.device
if dtype == "auto":
    dtype = "bfloat16" if dev.type == "cuda" else "float32"
vlm = M.VLM.from_pretrained(init_from, dtype={"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]).to(dev).eval()
tok, template = vlm.tokenizer, vlm.config["template"]
out_dir = out_dir or os.path.join(init_from, "eval")

with open(data_path) as f:
    questions = [json.loads(line) for line in f if line.strip()]
mine = questions[dist.rank::dist.world_size]
results = []
t0 = time.time()
for i in tqdm(range(0, len(mine), batch_size), disable=not dist.master, unit="batch", desc=task):
    qs = mine[i:i + batch_size]
    prompts = [D.build_prompt(q["text"] if "<image>" in q["text"] else "<image>\n" + q["text"], tok, template,
                              vlm.image_token_id, vlm.num_image_tokens) for q in qs]
    ids, mask = D.collate_prompts(prompts, tok.pad_token_id)
    px = torch.stack([D.process_image(D.load_image(os.path.join(image_root, q["image"])), vlm.image_processor,
                                      vlm.config["pad_to_square"]) for q in qs])
    toks, _ = vlm.generate(ids.to(dev), px.to(dev), mask.to(dev), max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id)
    for q, t in zip(qs, toks.tolist()):
        t = t[:t.index(tok.eos_token_id)] if tok.eos_token_id in t else t
        text = tok.decode(t, skip_special_tokens=True).strip()
        results.append(dict(question_id=q["question_id"], prompt=q["text"], text=text, answer=q.get("answer"),
                            type=q.get("type", "all"), correct=normalize(text) == normalize(str(q.get("answer", "")))))
if dist.ddp:
    gathered = [None] * dist.world_size
    torch.distributed.all_gather_object(gathered, results)
    results = sorted((r for part in gathered for r in part), key=lambda r: str(r["question_id"]))

if dist.master:
    elapsed = time.time() - t0
    types = sorted({r["type"] for r in results})
    metrics = {t: dict(accuracy=sum(r["correct"] for r in results if r["type"] == t) / sum(r["type"] == t for r in results),
                       n=sum(r["type"] == t for r in results)) for t in types}
    metrics["all"] = dict(accuracy=sum(r["correct"] for r in results) / len(results), n=len(results))
    print(f"\n{'question':60s} {'answer':18s} truth")
    for r in results[:show]:
        print(f"{r['prompt'].split(chr(10))[0][:60]:60s} {r['text'][:18]:18s} {r['answer']}")
    print(f"\n{'type':12s} {'n':>6s} {'accuracy':>9s}")
    for t, m in metrics.items():
        print(f"{t:12s} {m['n']:6d} {100 * m['accuracy']:8.1f}%")
    print(f"{len(results)} questions in {elapsed:.1f}s ({len(results) / elapsed:.1f} questions/s)")
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in (("predictions.jsonl", results), ("metrics.json", None)):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "w") as f:
            if rows is None:
                json.dump(dict(task=task, init_from=init_from, data_path=data_path, metrics=metrics), f, indent=2)
            else:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, os.path.join(out_dir, name))
    print(f"wrote {out_dir}/predictions.jsonl and metrics.json")
if dist.ddp:
    torch.distributed.destroy_process_group()
