"""
Self-rewarding: the model answers prompts, rewards its own answers, and keeps one preference pair per
prompt for dpo.py. mode=csr is calibrated self-rewarding (Zhou et al. 2024, CSR): a sentence-level
tree search whose sentence reward mixes the model's own confidence with an image-text scorer's
(CLIP); the best and the worst whole description become chosen and rejected. The rules, with each
choice of the paper vs the released code as a named option, are in sentence_tree.py.

The shapes world (after `python prepare_shapes.py` and a base model, e.g. `python sft.py`):
    python selfreward.py config/shapes_csr.py --init_from=out/sft
then DPO on the pairs (LoRA, the adapters-off reference) and again from the merged model:
    python dpo.py config/shapes_csr_dpo.py --init_from=out/sft --data_path=out/selfreward/pairs.json
Three iterations over 3 seeds, with the ablations, evaluated in one table:
    python experiment.py config/exp_csr.py
LLaVA-1.5-7B on CSR's 12,856 COCO prompts, 8 GPUs (prompts are sharded over ranks, gathered in order):
    torchrun --standalone --nproc_per_node=8 selfreward.py config/csr_sample.py

Input (data_path, .json or .jsonl): CSR's {id, image, input} or LLaVA conversations (first human turn).
Written to out_dir, each atomically:
  pairs.json    CSR's pair format, which dpo.py reads: id, image, conversations [prompt, chosen],
                rejected_conversations [prompt, rejected], plus chosen_score / rejected_score
  trees.jsonl   every scored tree (nodes: parent, sentence, text, lm, clip, reward, score, final)
  summary.json  counts (prompts, pairs, skipped by reason, sentences), timing, the settings
A journal (trees.rank<r>.jsonl, one line per finished prompt) makes a crashed or stopped run resume:
run the same command again and only the prompts not yet in it are searched.
"""
import glob
import json
import os
import time

import torch
from tqdm import tqdm

import data as D
import model as M
import sentence_tree as S
import training as T

# -----------------------------------------------------------------------------
mode = "csr"               # 'csr' (the sentence-tree search); 'answer' is LLaVA-Reasoner's (not yet)
init_from = "out/sft"      # our checkpoint, a llava-hf directory or a hub id
data_path = "data/shapes/prompts.json"
image_root = "data/shapes/images"
image_prefix = ""          # put before each image file name (CSR's prompt file + COCO train2014: 'COCO_train2014_')
clip_path = "models/shapes/clip"  # the scorer: a CLIPModel directory or hub id (openai/clip-vit-large-patch14-336)
out_dir = "out/selfreward"
max_prompts = 0            # 0 = every prompt of the file; else the first n
batch_size = 16            # prompts searched together (every live node of all of them in one generate call)
# the search (sentence_tree.SEARCH_DEFAULTS says what each does)
proposals = 5
proposal = "diverse"       # 'diverse' | 'sample'
diversity_penalty = 3.0
temperature = 1.0          # 'sample' only
top_p = 1.0                # 'sample' only
max_new_tokens = 70
max_chars = 1024
max_sentences = 0
keep_best = 1
keep_worst = 2
prune_by = "lm"            # 'lm' (released code) | 'reward' (paper)
lam = 0.9                  # lambda: weight of the image-text score; 0 = self-reward without calibration
combine = "rank"           # 'rank' (released code) | 'raw' (paper)
lm_score = "penalised"     # 'penalised' | 'logprob'
path_length = "sentences"  # 'sentences' | 'nodes' (released code)
max_nodes = 0              # live nodes per generate call: 0 = all at once, 1 = node by node (as the released code)
seed = 1337
device = "auto"
dtype = "auto"             # auto = bfloat16 on CUDA, float32 elsewhere
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------
if mode != "csr":
    raise ValueError(f"mode must be 'csr' (mode 'answer' is not built yet), got {mode!r}")
search = {k: config[k] for k in S.SEARCH_DEFAULTS if k != "max_nodes"}
search["max_nodes"] = max_nodes
S.check_search(search)
# what the trees depend on: a journal written under other settings must not be continued
identity = dict(mode=mode, init_from=init_from, data_path=data_path, clip_path=clip_path, seed=seed,
                **{k: v for k, v in search.items() if k != "max_nodes"})

prompts = D.load_prompts(data_path, image_root, max_prompts, image_prefix)  # checked before any model is loaded
run = T.setup(seed, device, dtype)
dist, dev, log = run.dist, run.device, run.log
os.makedirs(out_dir, exist_ok=True)
settings_path = os.path.join(out_dir, "settings.json")
if dist.master:
    if os.path.exists(settings_path):
        old = json.load(open(settings_path))
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff and glob.glob(os.path.join(out_dir, "trees.rank*.jsonl")):
            raise SystemExit(f"{out_dir} holds trees searched with other settings ({', '.join(diff)}); "
                             f"use another out_dir, or delete its trees.rank*.jsonl to start over")
    D.write_atomic(settings_path, json.dumps(identity, indent=1))
if dist.ddp:
    torch.distributed.barrier()


def read_journal(d):
    """{prompt id: tree row} from every rank's journal (a crash can leave half a last line: skipped)."""
    done = {}
    for path in sorted(glob.glob(os.path.join(d, "trees.rank*.jsonl"))):
        for line in open(path, encoding="utf-8"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["id"]] = row
    return done


done = read_journal(out_dir)
if dist.ddp:  # every rank reads the journals before any rank appends to its own: the same todo list everywhere
    torch.distributed.barrier()
todo = [p for p in prompts if p["id"] not in done]
mine = todo[dist.rank::dist.world_size]
log(f"{len(prompts)} prompts in {data_path}: {len(prompts) - len(todo)} already searched, {len(todo)} to go "
    f"over {dist.world_size} rank(s)")

vlm = M.VLM.from_pretrained(init_from, dtype=run.ptdtype).to(dev).eval()
scorer = S.ClipScorer(clip_path, dev, run.ptdtype)
journal_path = os.path.join(out_dir, f"trees.rank{dist.rank}.jsonl")
if os.path.exists(journal_path):  # a crash mid-write leaves half a line: cut it, so new lines start clean
    with open(journal_path, "rb+") as f:
        text = f.read()
        if text and not text.endswith(b"\n"):
            f.truncate(text.rfind(b"\n") + 1)
journal = open(journal_path, "a", encoding="utf-8")
stats = {}
t0 = time.time()
bar = tqdm(total=len(mine), disable=not dist.master, unit="prompt", desc="csr", dynamic_ncols=True)
for b in range(0, len(mine), batch_size):
    batch = mine[b:b + batch_size]
    # proposal='sample' draws from a stream fixed by the seed and the batch's first prompt: the same prompts, ranks
    # and batch size give the same trees ('diverse' is greedy: the same trees whatever the batching)
    gen = torch.Generator(dev).manual_seed(seed * 1_000_003 + batch[0]["_src"][1])
    with torch.no_grad(), run.autocast:
        trees = S.search_prompts(vlm, scorer, batch, search, gen, stats)
    for p, tree in zip(batch, trees):
        chosen, rejected, skipped = S.pick_pair(tree, path_length)
        row = dict(id=p["id"], image=p["image"], prompt=p["prompt"], chosen=chosen, rejected=rejected,
                   skipped=skipped, nodes=S.tree_record(tree, path_length))
        journal.write(json.dumps(row) + "\n")
    journal.flush()
    os.fsync(journal.fileno())
    bar.update(len(batch))
    dt = time.time() - t0
    bar.set_postfix_str(f"{stats['sentences'] / dt:.1f} sentences/s")
journal.close()
bar.close()
elapsed = time.time() - t0
if dist.ddp:
    torch.distributed.barrier()

# rank 0 gathers every rank's journal in the prompt file's order
if dist.master:
    done = read_journal(out_dir)
    missing = [p["id"] for p in prompts if p["id"] not in done]
    if missing:
        raise SystemExit(f"{len(missing)} prompts have no tree (first: {missing[0]}); run again to finish them")
    rows = [done[p["id"]] for p in prompts]
    pairs, skipped = [], {}
    for r in rows:
        if r["skipped"]:
            skipped[r["skipped"]] = skipped.get(r["skipped"], 0) + 1
            continue
        human = {"from": "human", "value": D.IMAGE_PLACEHOLDER + "\n" + r["prompt"]}
        ch, rj = r["nodes"][r["chosen"]], r["nodes"][r["rejected"]]
        pairs.append({"id": r["id"], "image": r["image"],
                      "conversations": [human, {"from": "gpt", "value": ch["text"]}],
                      "rejected_conversations": [human, {"from": "gpt", "value": rj["text"]}],
                      "chosen_score": ch["score"], "rejected_score": rj["score"]})
    D.write_atomic(os.path.join(out_dir, "trees.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    D.write_atomic(os.path.join(out_dir, "pairs.json"), json.dumps(pairs, indent=1))
    n_nodes = sum(len(r["nodes"]) - 1 for r in rows)
    n_leaves = sum(sum(n["final"] for n in r["nodes"]) for r in rows)
    summary = dict(prompts=len(rows), pairs=len(pairs), skipped=skipped, nodes=n_nodes, leaves=n_leaves,
                   searched_now=len(todo), seconds=round(elapsed, 1),
                   sentences_per_s_rank0=round(stats.get("sentences", 0) / max(elapsed, 1e-9), 2),
                   prompts_per_s=round(len(todo) / max(elapsed, 1e-9), 3), settings=identity)
    D.write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
    margin = [p["chosen_score"] - p["rejected_score"] for p in pairs]
    print(f"\n| prompts | pairs | skipped | nodes / tree | leaves / tree | mean score margin | prompts/s |\n|---|---|---|---|---|---|---|\n"
          f"| {len(rows)} | {len(pairs)} | {sum(skipped.values())} {skipped or ''} | {n_nodes / max(len(rows), 1):.1f} | "
          f"{n_leaves / max(len(rows), 1):.1f} | {sum(margin) / max(len(margin), 1):.3f} | {summary['prompts_per_s']} |")
    print(f"wrote {out_dir}/pairs.json, trees.jsonl, summary.json")
T.finish(run)
