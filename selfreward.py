"""
Self-rewarding: the model answers prompts, rewards its own answers, and keeps preference pairs for
dpo.py. Two modes:
  csr     calibrated self-rewarding (Zhou et al. 2024, CSR): a sentence-level tree search whose
          sentence reward mixes the model's own confidence with an image-text scorer's (CLIP); the
          best and the worst whole description become chosen and rejected, one pair per prompt. The
          rules, with each choice of the paper vs the released code as a named option, are in
          methods/csr.py.
  answer  LLaVA-Reasoner's mining (Zhang et al. 2024): N sampled chains of thought per question with
          a gold short answer, checked against it; questions with a sample accuracy inside the band
          give up to 3 (correct, incorrect) pairs each. The rules are in methods/reasoner.py.

The shapes world (after `python -m shapes.prepare` and a base model, e.g. `python sft.py`):
    python selfreward.py config/shapes_csr.py --init_from=out/sft
then DPO on the pairs (LoRA, the adapters-off reference) and again from the merged model:
    python dpo.py config/shapes_csr_dpo.py --init_from=out/sft --data_path=out/shapes_csr/pairs.json
Three iterations over 3 seeds, with the ablations, evaluated in one table:
    python -m experiments.run experiments/csr.py
LLaVA-1.5-7B on CSR's 12,856 COCO prompts, 8 GPUs (batches of prompts are sharded over ranks, gathered in order):
    torchrun --standalone --nproc_per_node=8 selfreward.py config/csr_sample.py
LLaVA-Reasoner's pairs on the shapes world's training questions, from a CoT-SFT model:
    python selfreward.py config/shapes_reasoner_sample.py --init_from=out/shapes_cot_sft

Input (data_path, .json or .jsonl; data.load_prompts says what each record may look like):
  csr     CSR's {id, image, input} or LLaVA conversations (the first human turn)
  answer  {id, image, question (+ options), answer} or LLaVA conversations (gold = the gpt turn, the
          text after its '### Answer:' if any); the CoT suffix replaces a direct-answer one
Written to out_dir, each atomically:
  pairs.json    csr: CSR's pair format: id, image, conversations [prompt, chosen], rejected_conversations
                [prompt, rejected], chosen_score / rejected_score. answer: LLaVA-Reasoner's: id, image,
                question, chosen, rejected, accuracy (the question's). dpo.py reads both.
  trees.jsonl   csr: every scored tree (nodes: parent, sentence, text, lm, clip, reward, score, final)
  samples.jsonl answer: every question's samples (text, answer read, correct) and accuracy
  summary.json  counts (prompts, pairs, skipped by reason, ...), timing, the settings; answer mode with the
                gold chains known ('rationale'): the share of right answers, and of chosen ones, after another chain
A journal (<trees|samples>.rank<r>.jsonl, one line per finished prompt) makes a crashed or stopped run
resume: run the same command again and only the prompts not yet in it are done. The batches, not the
prompts, are dealt to the ranks, and each batch samples from a stream fixed by the seed and its first
prompt: the same file, seed and batch size give the same samples on any number of ranks (a resumed
run draws its remaining prompts' samples afresh).
"""
import glob
import json
import os
import time

import torch
from tqdm import tqdm

import data as D
import model as M
from lucid import common
from methods import csr as S
from methods import reasoner as A
from tasks import benchmark as B

# -----------------------------------------------------------------------------
mode = "csr"               # 'csr' (CSR's sentence-tree search) | 'answer' (LLaVA-Reasoner's answer-checked sampling)
init_from = "out/sft"      # our checkpoint, a llava-hf directory or a hub id
data_path = "data/shapes/prompts.json"
image_root = "data/shapes/images"
image_prefix = ""          # put before each image file name (CSR's prompt file + COCO train2014: 'COCO_train2014_')
clip_path = "shapes/models/clip"  # csr's scorer: a CLIPModel directory or hub id (openai/clip-vit-large-patch14-336)
out_dir = "out/selfreward"
max_prompts = 0            # 0 = every prompt of the file; else the first n
batch_size = 16            # prompts done together (csr: every live node of all of them in one generate call)
temperature = 1.0          # sampling: csr's proposal='sample', and answer mode (the paper samples at 1.0-1.2)
top_p = 1.0
max_new_tokens = 0         # 0 = the mode's default: 70 per sentence (csr, as released), 256 per answer (answer)
# mode=answer (methods/reasoner.py)
samples = 32               # CoT answers sampled per question
tolerance = 0.05           # relative tolerance of a numeric answer
check = "answer"           # 'answer': LLaVA-Reasoner's check of the short answer | 'chain': an oracle for analysis,
                           # right = the whole answer is the question's gold chain verbatim (needs 'rationale')
min_accuracy = 0.25        # a question gives pairs when its sample accuracy lies in [min_accuracy, max_accuracy]
max_accuracy = 0.85
pairs_per_question = 3
pair_draw = "samples"      # 'samples': pairs of samples, a chain drawn as often as the model produced it (the paper's
                           # "random pairs") | 'distinct': pairs of distinct texts, each once however often sampled
# mode=csr: the search (methods.csr.SEARCH_DEFAULTS says what each does)
proposals = 5
proposal = "diverse"       # 'diverse' | 'sample'
diversity_penalty = 3.0
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
from configurator import ConfigError, configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------
if mode not in ("csr", "answer"):
    raise ConfigError(f"mode must be 'csr' or 'answer', got {mode!r}")
max_new_tokens = max_new_tokens or dict(csr=70, answer=256)[mode]
# what the journal's rows depend on: a journal written under other settings must not be continued
identity = dict(mode=mode, init_from=init_from, data_path=data_path, image_prefix=image_prefix, seed=seed,
                batch_size=batch_size, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
if mode == "csr":
    search = {k: config[k] for k in S.SEARCH_DEFAULTS if k != "max_nodes"}
    search.update(max_nodes=max_nodes, max_new_tokens=max_new_tokens)
    S.check_search(search)
    identity.update(clip_path=clip_path, **{k: v for k, v in search.items() if k != "max_nodes"})
    if search["proposal"] == "diverse":  # greedy: the trees do not depend on the batching or the sampling knobs
        for k in ("batch_size", "temperature", "top_p"):
            identity.pop(k)
else:  # the band and the pair count are applied when the pairs are written: changing them needs no new samples
    if not (samples >= 2 and 0 <= min_accuracy <= max_accuracy <= 1 and pairs_per_question >= 1 and temperature > 0):
        raise ConfigError("answer mode needs samples >= 2, 0 <= min_accuracy <= max_accuracy <= 1, "
                         "pairs_per_question >= 1 and temperature > 0")
    if check not in ("answer", "chain"):
        raise ConfigError(f"check must be 'answer' or 'chain', got {check!r}")
    if pair_draw not in ("samples", "distinct"):
        raise ConfigError(f"pair_draw must be 'samples' or 'distinct', got {pair_draw!r}")
    identity.update(samples=samples, tolerance=tolerance, check=check)
journal_name = dict(csr="trees", answer="samples")[mode]

# checked before any model is loaded
prompts = D.load_prompts(data_path, image_root, max_prompts, image_prefix, parse=dict(csr=D.prompt_from_record, answer=B.question_from_record)[mode])
if mode == "answer" and check == "chain" and (no_chain := [p["id"] for p in prompts if "rationale" not in p]):
    raise SystemExit(f"{data_path}: check=chain needs each question's gold chain ('rationale'); "
                     f"{len(no_chain)} have none (first: id {no_chain[0]!r})")
run = common.setup(seed, device, dtype, training=False)
dist, dev, log = run.dist, run.device, run.log
os.makedirs(out_dir, exist_ok=True)
settings_path = os.path.join(out_dir, "settings.json")
if dist.master:
    if os.path.exists(settings_path):
        old = json.load(open(settings_path))
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff and glob.glob(os.path.join(out_dir, f"{journal_name}.rank*.jsonl")):
            raise SystemExit(f"{out_dir} holds {journal_name} made with other settings ({', '.join(diff)}); "
                             f"use another out_dir, or delete its {journal_name}.rank*.jsonl to start over")
    D.write_atomic(settings_path, json.dumps(identity, indent=1))
if dist.ddp:
    torch.distributed.barrier()


def read_journal(d):
    """{prompt id: tree row} from every rank's journal (a crash can leave half a last line: skipped)."""
    done = {}
    for path in sorted(glob.glob(os.path.join(d, f"{journal_name}.rank*.jsonl"))):
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
batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
mine = batches[dist.rank::dist.world_size]  # whole batches: the same batches on any number of ranks
log(f"{len(prompts)} prompts in {data_path}: {len(prompts) - len(todo)} already done, {len(todo)} to go "
    f"over {dist.world_size} rank(s)")

vlm = M.VLM.from_pretrained(init_from, dtype=run.ptdtype).to(dev).eval()
scorer = S.ClipScorer(clip_path, dev, run.ptdtype) if mode == "csr" else None
journal_path = os.path.join(out_dir, f"{journal_name}.rank{dist.rank}.jsonl")
if os.path.exists(journal_path):  # a crash mid-write leaves half a line: cut it, so new lines start clean
    with open(journal_path, "rb+") as f:
        text = f.read()
        if text and not text.endswith(b"\n"):
            f.truncate(text.rfind(b"\n") + 1)
journal = open(journal_path, "a", encoding="utf-8")
stats = {"sentences": 0, "samples": 0}
t0 = time.time()
bar = tqdm(total=sum(map(len, mine)), disable=not dist.master, unit="prompt", desc=mode, dynamic_ncols=True)
for batch in mine:
    # sampling draws from a stream fixed by the seed and the batch's first prompt ('diverse' is greedy)
    gen = torch.Generator(dev).manual_seed(seed * 1_000_003 + batch[0]["_src"][1])
    with torch.no_grad(), run.autocast:
        if mode == "csr":
            trees = S.search_prompts(vlm, scorer, batch, search, gen, stats)
        else:
            texts = A.sample_answers(vlm, batch, samples, temperature, top_p, max_new_tokens, gen)
    for i, p in enumerate(batch):
        row = dict(id=p["id"], image=p["image"], prompt=p["prompt"])
        if mode == "csr":
            chosen, rejected, skipped = S.pick_pair(trees[i], path_length)
            row.update(chosen=chosen, rejected=rejected, skipped=skipped, nodes=S.tree_record(trees[i], path_length))
        else:
            checked = A.check_answers(p, texts[i], tolerance, by_chain=check == "chain")
            row.update({k: p[k] for k in B.GOLD_KEYS if k in p}, samples=checked,
                       accuracy=sum(c["correct"] for c in checked) / len(checked))
            stats["samples"] += len(checked)
        journal.write(json.dumps(row) + "\n")
    journal.flush()
    os.fsync(journal.fileno())
    bar.update(len(batch))
    dt = time.time() - t0
    bar.set_postfix_str(f"{stats['sentences'] / dt:.1f} sentences/s" if mode == "csr" else f"{stats['samples'] / dt:.1f} samples/s")
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
    D.write_atomic(os.path.join(out_dir, f"{journal_name}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    timing = dict(searched_now=len(todo), seconds=round(elapsed, 1), prompts_per_s=round(len(todo) / max(elapsed, 1e-9), 3))
if dist.master and mode == "answer":
    # where the file gives each question's gold chain (the shapes world's does): how often a right short
    # answer, and a pair's chosen answer, came after another chain (the check sees the short answer only)
    chain = {p["id"]: p["rationale"].strip() for p in prompts if "rationale" in p}
    pairs, skipped, chosen_wrong = [], {}, []
    for r in rows:
        acc, picked, why = A.pick_pairs(r["samples"], r["id"], seed, min_accuracy, max_accuracy, pairs_per_question, pair_draw)
        if why:
            skipped[why] = skipped.get(why, 0) + 1
        if r["id"] in chain:
            chosen_wrong += [c.strip() != chain[r["id"]] for c, _ in picked]
        pairs += [dict(id=f"{r['id']}_{k}", image=r["image"], question=r["prompt"], chosen=c, rejected=rj, accuracy=acc)
                  for k, (c, rj) in enumerate(picked)]
    D.write_atomic(os.path.join(out_dir, "pairs.json"), json.dumps(pairs, indent=1))
    n_samples = sum(len(r["samples"]) for r in rows)
    no_marker = sum(s["answer"] is None for r in rows for s in r["samples"])
    kept = len(rows) - sum(skipped.values())
    right_wrong = [s["text"].strip() != chain[r["id"]] for r in rows if r["id"] in chain for s in r["samples"] if s["correct"]]
    chains = dict(right_answer_wrong_chain=sum(right_wrong) / len(right_wrong) if right_wrong else None,
                  chosen_wrong_chain=sum(chosen_wrong) / len(chosen_wrong) if chosen_wrong else None) if chain else {}
    summary = dict(questions=len(rows), kept=kept, below_band=skipped.get("below band", 0),
                   above_band=skipped.get("above band", 0), pairs=len(pairs), samples=n_samples,
                   no_marker=no_marker, sample_accuracy=sum(r["accuracy"] for r in rows) / max(len(rows), 1),
                   band=[min_accuracy, max_accuracy], skipped=skipped, **chains, **timing,
                   samples_per_s_rank0=round(stats["samples"] / max(elapsed, 1e-9), 2), settings=identity)
    D.write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
    print(f"\n| questions | kept | below band | above band | pairs | sample accuracy | no marker | samples/s (rank 0) |\n"
          f"|---|---|---|---|---|---|---|---|\n| {len(rows)} | {kept} | {summary['below_band']} | {summary['above_band']} | "
          f"{len(pairs)} | {100 * summary['sample_accuracy']:.1f}% | {no_marker} of {n_samples} | {summary['samples_per_s_rank0']} |")
    if chains:
        print(f"of the right answers, {100 * (chains['right_answer_wrong_chain'] or 0):.1f}% came after a chain other "
              f"than the gold one; of the pairs' chosen answers, {100 * (chains['chosen_wrong_chain'] or 0):.1f}%")
    print(f"wrote {out_dir}/pairs.json, samples.jsonl, summary.json")
if dist.master and mode == "csr":
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
    D.write_atomic(os.path.join(out_dir, "pairs.json"), json.dumps(pairs, indent=1))
    n_nodes = sum(len(r["nodes"]) - 1 for r in rows)
    n_leaves = sum(sum(n["final"] for n in r["nodes"]) for r in rows)
    summary = dict(prompts=len(rows), pairs=len(pairs), skipped=skipped, nodes=n_nodes, leaves=n_leaves,
                   repeated_proposals_rank0=stats.get("duplicates"), unanimous_continuations_rank0=stats.get("lone"), **timing,
                   sentences_per_s_rank0=round(stats["sentences"] / max(elapsed, 1e-9), 2), settings=identity)
    D.write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
    margin = [p["chosen_score"] - p["rejected_score"] for p in pairs]
    print(f"\n| prompts | pairs | skipped | nodes / tree | leaves / tree | mean score margin | prompts/s |\n|---|---|---|---|---|---|---|\n"
          f"| {len(rows)} | {len(pairs)} | {sum(skipped.values())} {skipped or ''} | {n_nodes / max(len(rows), 1):.1f} | "
          f"{n_leaves / max(len(rows), 1):.1f} | {sum(margin) / max(len(margin), 1):.3f} | {summary['prompts_per_s']} |")
    print(f"wrote {out_dir}/pairs.json, trees.jsonl, summary.json")
common.finish(run.dist)
