"""
Evaluate a checkpoint on benchmarks: generate answers, score them by each benchmark's published rule
(tasks/), print one table, write predictions and metrics.json (atomically) under out_dir.

The shapes suite, held-out scenes (after `python -m shapes.prepare` and `python sft.py`): POPE,
multiple choice, VQA, CoT, CHAIR, MME and MMBench in one call, one table:
    python evaluate.py
One benchmark, any checkpoint (ours or llava-hf), question files in LLaVA's formats:
    python evaluate.py --task=pope --init_from=llava-hf/llava-1.5-7b-hf --data_path=pope/llava_pope_test.jsonl --image_root=val2014
    python evaluate.py --task=mc --data_path=scienceqa/llava_test_CQM-A.json --image_root=scienceqa/images/test
    python evaluate.py --task=mme --data_path=MME/llava_mme.jsonl --image_root=MME/MME_Benchmark_release_version
    python evaluate.py --task=mmbench --data_path=mmbench/mmbench_dev_20230712.tsv
    python evaluate.py --task=chair --data_path=chair_coco.jsonl --image_root=val2014 --synonyms_path=coco
Score answers generated elsewhere (LLaVA answer files: question_id + text), no model loaded:
    python evaluate.py --task=pope --data_path=Q.jsonl --predictions=answers.jsonl --out_dir=D
    python evaluate.py --predictions=out/sft/eval      # re-score a shapes run's <task>_predictions.jsonl
Best-of-N on CoT questions (LLaVA-Reasoner's DPO model as a verifier): init_from (the SFT model) also
samples N answers per question; each is scored by the DPO reward log pi_verifier - log pi_init_from,
summed over its tokens; the best one vs the majority answer vs greedy, in one table and best_of.json:
    python evaluate.py --task=cot --data_path=data/shapes/eval/cot.jsonl --init_from=out/shapes_cot_sft \
        --best_of=8 --verifier=out/shapes_reasoner_dpo
Several GPUs (questions are sharded over ranks, gathered, scored on rank 0):
    torchrun --standalone --nproc_per_node=8 evaluate.py --init_from=...

Question files (JSONL, one object a line; image paths relative to image_root; details and the
prompt rules in tasks.benchmark.benchmark_question):
  pope   question_id, image, text, label yes|no, category random|popular|adversarial (optional);
         or LLaVA's llava_pope_test.jsonl (no label) + POPE's coco/coco_pope_<category>.json (the labels)
  mc     question_id, image (optional), question, options [..], answer (letter), category (optional);
         or ScienceQA as LLaVA ships it (.json list: id, image?, conversations [human, gpt 'The answer is X.'])
  vqa    question_id, image, question (or text), answers [..] (or answer), category (optional)
  cot    like mc (with options) or vqa (without); the CoT suffix is appended
  chair  question_id (or image_id), image, text (optional prompt), objects [true objects]; + synonyms_path
         (synonyms_path=coco: the original CHAIR's COCO list, with its COCO rules)
  mme    LLaVA's llava_mme.jsonl (question_id '<subtask>/<image>', image, text) + MME's folder
         (mme_root, MME_Benchmark_release_version: per-subtask 'question<TAB>Yes|No' answer files)
  mmbench  MMBench's TSV with answers (MMBench_DEV_EN.tsv: index, question, hint, A-D, answer, category,
         l2-category, image in base64), asked once per rotation of the options (circular)
  shapes shapes_dir/{pope,mc,vqa,cot,chair,mme,knowledge}.jsonl, mmbench.tsv, synonyms.txt and mme/, all of the
         above; knowledge (lookup + rule questions) scored as vqa, and cot.jsonl asked a second time in the
         direct mode (direct_cot, scored as vqa): tasks/shapes.py
('short', the old name of the short-answer task, runs vqa.)

Written to out_dir:
  predictions.jsonl  LLaVA's answer format (question_id, prompt, text) + the gold fields + the verdict
                     (shapes: <task>_predictions.jsonl, one per task)
  metrics.json       {split: {metric: fraction, ..., n}} with a split per category ('all' if none),
                     POPE's 'average' of its splits, 'overall' for the others (shapes: {task: {...}})
  run.json           what was run: config, files, timing
  best_of.json       with --best_of: {split: {greedy, sample, majority, verifier, weighted, oracle, in_band, n, verifier_auc}}:
                     the accuracy of the greedy answer, of one random sample (the mean over the N), of
                     the majority answer, of the verifier's pick (the highest reward), of weighted voting
                     (each sample's answer weighted by softmax of the rewards), of an oracle that picks a right one
                     when any is; and how often the reward ranks a question's better sample higher;
                     in_band: the share of questions right in `band` (0.25-0.85) of their samples, where
                     answer-checked mining finds a pair
  best_of_predictions.jsonl   every question's samples, rewards, scores and picks
"""
import json
import os
import time
from collections import Counter

import torch
from tqdm import tqdm

import data as D
import model as M
import tasks.chair
import tasks.pope
import tasks.prompts
import tasks.shapes
from lucid import checkpoint, common
from methods import reasoner as A
from tasks import benchmark as B

# -----------------------------------------------------------------------------
init_from = "out/sft"      # checkpoint dir, ours or llava-hf, or a hub id (llava-hf/llava-1.5-7b-hf)
task = "shapes"            # pope | mc | vqa | cot | chair | mme | mmbench | shapes (all of them on the shapes world's eval sets)
data_path = ""             # the question file (not used by shapes)
shapes_dir = "data/shapes/eval"
image_root = "data/shapes/images"
synonyms_path = ""         # CHAIR's synonyms.txt; '' = synonyms.txt beside the question file
mme_root = ""              # MME's folder of per-subtask answer files (MME_Benchmark_release_version); '' = image_root
circular = True            # MMBench: ask each question once per rotation of its options, right only if right every time
pope_annotation_dir = ""   # POPE questions without labels (LLaVA's llava_pope_test.jsonl) take them from
                           # <dir>/coco_pope_<category>.json; '' = coco/ beside the question file (LLaVA's layout)
predictions = ""           # score this answer file (shapes: a directory of <task>_predictions.jsonl) instead of generating
out_dir = ""               # '' = <init_from>/eval (a hub id: out/eval/<org>--<name>), or <predictions>_scored
batch_size = 32
max_new_tokens = 0         # 0 = the task's default (MAX_NEW below)
prompt_suffix = ""         # '' = each task's own mode suffix; else this one instead, e.g. LLaVA-Reasoner's direct
                           # mode on CoT questions: --task=vqa --prompt_suffix='Answer the question with a short answer.'
temperature = 0.0          # 0 = greedy, as LLaVA's evals
top_p = 1.0                # nucleus sampling when temperature > 0
max_questions = 0          # ask only the first N questions of each file (0 = all)
show = 3                   # print this many question / answer / truth examples per task
device = "auto"
dtype = "auto"             # auto = bfloat16 on CUDA, float32 elsewhere; or float32 | bfloat16 | float16
seed = 1337
# best-of-N on the cot questions (LLaVA-Reasoner's verifier; methods/reasoner.py has the rules)
best_of = 0                # N > 0: also sample N CoT answers per question and compare ways of picking one
best_of_temperature = 1.0  # the paper samples at 1.0-1.2
band = (0.25, 0.85)        # best_of.json's in_band: the share of questions whose samples are right this often (the
                           # questions where answer-checked mining finds both a right and a wrong answer to pair)
verifier = ""              # the DPO checkpoint: reward log pi_verifier(answer) - log pi_init_from(answer); '' = majority only
verifier_max_words = None  # the reward is summed over the tokens DPO trained on: the answer cut to its first N words
verifier_drop_eos = None   # and without its end of turn when DPO dropped it; None = as dpo.py trained the verifier
                           # (its train_state.pt's max_words / drop_eos; 0 / False for a checkpoint without one)
# -----------------------------------------------------------------------------
from configurator import ConfigError, configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------
# short answers and letters need few tokens; a reasoning chain or a detailed caption needs room
MAX_NEW = dict(pope=16, mc=16, vqa=16, cot=256, chair=128, mme=16, mmbench=16)
if task == "short":
    task = "vqa"
if task not in B.BENCHMARKS + ("shapes",):
    raise ConfigError(f"task must be one of {B.BENCHMARKS + ('shapes',)}, got {task!r}")
if best_of and (task not in ("cot", "shapes") or predictions):
    raise ConfigError("best_of samples answers to the cot questions: use it with task=cot or shapes, without predictions")
if verifier and not best_of:
    raise ConfigError("verifier picks one of best_of sampled answers: set best_of too")

# the runs: (task, question file, answer file to score or None)
if task == "shapes":
    if not os.path.isdir(shapes_dir):
        raise FileNotFoundError(f"{shapes_dir}: no shapes eval sets; run `python -m shapes.prepare` first")
    runs = [(t, os.path.join(shapes_dir, f), os.path.join(predictions, f"{t}_predictions.jsonl") if predictions else None)
            for t, f in tasks.shapes.FILES.items()]
    # the tasks whose files are there (a world prepared before MME and MMBench joined has five; re-scoring
    # a run: the tasks it answered); none at all is the error the first file gives
    present = [r for r in runs if os.path.isfile(r[2] if predictions else r[1])] or runs
    if len(present) < len(runs):
        print(f"shapes suite: no {', '.join(os.path.basename(r[2] if predictions else r[1]) for r in runs if r not in present)}"
              f" in {predictions or shapes_dir}; running {', '.join(r[0] for r in present)}")
    runs = present
    synonyms_path = synonyms_path or os.path.join(shapes_dir, "synonyms.txt")
    mme_root = mme_root or os.path.join(shapes_dir, "mme")
else:
    if not data_path:
        raise ConfigError(f"task {task!r} needs --data_path=<question file>")
    runs = [(task, data_path, predictions or None)]
    synonyms_path = synonyms_path or os.path.join(os.path.dirname(data_path), "synonyms.txt")
# every file is read and checked before a model is loaded: a bad record costs seconds, not a model load
scorer = {t: tasks.shapes.SCORER.get(t, t) if task == "shapes" else t for t, _, _ in runs}  # the benchmark rule of each entry
questions = {t: B.read_benchmark(path, scorer[t], pope_annotation_dir or None, mme_root or image_root, circular)
             for t, path, _ in runs}
if task == "shapes":  # entries asked in another mode than their benchmark's (the arithmetic, directly)
    questions.update({t: [dict(q, prompt=tasks.prompts.in_mode(q["prompt"], sfx)) for q in questions[t]]
                      for t, sfx in tasks.shapes.SUFFIX.items() if t in questions})
synonyms = tasks.chair.read_synonyms(synonyms_path) if "chair" in questions else None
if max_questions:
    questions = {t: qs[:max_questions] for t, qs in questions.items()}
if prompt_suffix:  # the same questions in another answer mode
    questions = {t: [dict(q, prompt=tasks.prompts.in_mode(q["prompt"], prompt_suffix)) for q in qs]
                 for t, qs in questions.items()}
if best_of and (no_image := [q["question_id"] for q in questions["cot"] if q["image"] is None]):
    raise D.DataError(f"best_of: every cot question needs an image; question_id {no_image[0]!r} has none", "no image")
if predictions:
    rows = {t: B.attach_answers(questions[t], B.read_answers(answers, scorer[t]), answers, path, scorer[t]) for t, path, answers in runs}
    master, elapsed, n_generated = int(os.environ.get("RANK", 0)) == 0, 0.0, 0
    sampled_rows = None
    out_dir = out_dir or os.path.splitext(predictions.rstrip("/"))[0] + "_scored"
else:
    checked = set()  # POPE asks several questions of each image: open each file once
    for t, path, _ in runs:  # every image is there and is an image (its header), before the model loads
        for q in questions[t]:
            if q["image"] is None or q["image"] in checked:
                continue
            try:
                B.question_image(q, image_root, check=True)
            except D.DataError as e:
                raise D.DataError(f"{path}: question_id {q['question_id']!r}: {e}", e.kind) from None
            checked.add(q["image"])
    dist = common.init_distributed(seed, None if device == "auto" else device)
    dev, master = dist.device, dist.master
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    vlm = M.VLM.from_pretrained(init_from, dtype=getattr(torch, dtype)).to(dev).eval()
    tok, template = vlm.tokenizer, vlm.config["template"]
    rng = torch.Generator(dev).manual_seed(seed + dist.rank)  # sampling only; each rank draws its own
    # beside a local checkpoint; for a hub id (never a folder named like it: that would shadow the id)
    out_dir = out_dir or (os.path.join(init_from, "eval") if os.path.isdir(init_from)
                          else os.path.join("out", "eval", init_from.replace("/", "--")))

    def over_ranks(qs, answer, desc):
        """answer(batch) -> one dict per question of this rank's batches, gathered from every rank, in file order."""
        mine = [dict(q, _i=i) for i, q in enumerate(qs)][dist.rank::dist.world_size]
        done = []
        bar = tqdm(total=len(mine), disable=not master, unit="question", desc=desc)
        for i in range(0, len(mine), batch_size):
            batch = mine[i:i + batch_size]
            done += answer(batch)
            bar.update(len(batch))
        bar.close()
        if dist.ddp:
            parts = [None] * dist.world_size
            torch.distributed.all_gather_object(parts, done)
            done = [r for part in parts for r in part]
        return [{k: v for k, v in r.items() if k != "_i"} for r in sorted(done, key=lambda r: r["_i"])]

    def greedy(t, batch):
        # LLaVA's eval scripts put the image first: '<image>\n' + question
        prompts = [D.build_prompt(("<image>\n" if q["image"] else "") + q["prompt"], tok, template,
                                  vlm.image_token_id, vlm.num_image_tokens, n_images=int(q["image"] is not None))
                   for q in batch]
        ids, mask = D.collate_prompts(prompts, tok.pad_token_id)
        images = [D.process_image(B.question_image(q, image_root), vlm.image_processor, vlm.config["pad_to_square"])
                  for q in batch if q["image"]]
        px = torch.stack(images).to(dev) if images else None  # rows without an image simply have no image tokens
        gen = vlm.generate(ids.to(dev), px, mask.to(dev), max_new_tokens=max_new_tokens or MAX_NEW[scorer[t]],
                           temperature=temperature, top_p=top_p, generator=rng)
        return [dict(q, text=text.strip()) for q, text in zip(batch, gen.text)]

    def sampled(batch):
        """best_of answers per question, and with a verifier their rewards."""
        qs = [dict(q, path=D.resolve_image(image_root, q["image"])) for q in batch]
        texts = A.sample_answers(vlm, qs, best_of, best_of_temperature, top_p, max_new_tokens or MAX_NEW["cot"], rng)
        rewards = [[0.0] * best_of for _ in qs]
        if ver is not None:
            rewards = (A.answer_logps(ver, qs, texts, *ver_tokens) - A.answer_logps(vlm, qs, texts, *ver_tokens)).tolist()
        return [dict(q, samples=ts, rewards=r) for q, ts, r in zip(batch, texts, rewards)]

    t0 = time.time()
    rows = {t: over_ranks(questions[t], lambda b, t=t: greedy(t, b), t) for t in questions}
    elapsed, n_generated = time.time() - t0, sum(len(r) for r in rows.values())
    sampled_rows = None
    if best_of:
        ver = M.VLM.from_pretrained(verifier, dtype=getattr(torch, dtype)).to(dev).eval() if verifier else None
        trained = {}  # what dpo.py trained the verifier on, when it was dpo.py
        if verifier and os.path.isfile(os.path.join(verifier, "train_state.pt")):
            trained = json.loads(checkpoint.load_train_state(verifier)["config"])
        ver_tokens = (trained.get("max_words", 0) if verifier_max_words is None else verifier_max_words,
                      trained.get("drop_eos", False) if verifier_drop_eos is None else verifier_drop_eos)
        t1 = time.time()
        with torch.no_grad():
            sampled_rows = over_ranks(questions["cot"], sampled, f"cot best-of-{best_of}")
        sample_seconds = time.time() - t1

if master:
    metrics, preds = {}, {}
    for t, rs in rows.items():
        metrics[t] = B.score(scorer[t], rs, synonyms)
        # LLaVA's answer format first (question_id, prompt, text), then the gold fields and the verdict
        preds[t] = [{"question_id": r["question_id"], "prompt": r["prompt"], "text": r["text"],
                     **{k: v for k, v in r.items() if k != "image_b64"}, **B.judge(scorer[t], r, synonyms)} for r in rs]
    # the world's scene graphs (its training and evaluation scenes), read once; {} away from the shapes world
    scenes = tasks.shapes.load_scenes(shapes_dir) if {"mc", "pope", "cot"} & set(rows) else {}
    if task == "shapes" and "mc" in rows and scenes:
        # the world knows each image: colour and shape questions split by how many options are in it
        metrics["mc"].update(tasks.shapes.mc_by_options_in_image(rows["mc"], scenes, lambda r: B.judge("mc", r)))
    if "knowledge" in metrics:
        metrics["knowledge"].update(tasks.shapes.held_out_splits(metrics["knowledge"]))
    if "pope" in rows:  # the shapes world's POPE: false positives on the absent partners vs the other absent shapes
        metrics["pope"].update(tasks.shapes.pope_by_partner(rows["pope"], scenes, lambda r: B.judge("pope", r)))
    if "cot" in rows:  # the shapes world's arithmetic: each chain's claims checked against its scene graph
        for split, g in list(tasks.pope.by_category(rows["cot"]).items()) + [("overall", rows["cot"])]:
            if split in metrics["cot"]:
                metrics["cot"][split].update(tasks.shapes.chain_facts(g, scenes, lambda r: B.judge("cot", r)))
    for t, ps in preds.items():
        print(f"\n{t}\n  {'question':48s} {'answer':28s} {'read as':14s} truth")
        for p in ps[:show]:
            truth = p["objects"] if scorer[t] == "chair" else p.get("label") or p.get("answer") or Counter(p["answers"]).most_common(1)[0][0]
            read_as = p["hallucinated"] if scorer[t] == "chair" else p["pred"]
            print(f"  {p['prompt'].splitlines()[0][:48]:48s} {p['text'].replace(chr(10), ' ')[:28]:28s} "
                  f"{str(read_as)[:14]:14s} {str(truth)[:30]}")
    # one table: a row per task and split, a column per metric any of them has
    columns = [("n", "n"), ("accuracy", "acc"), ("precision", "prec"), ("recall", "recall"), ("f1", "f1"),
               ("yes_ratio", "yes"), ("yes_rate", "FP"), ("no_letter", "no_letter"), ("missing_marker", "no_marker"),
               ("chain_exact", "chain"), ("right_answer_wrong_chain", "lucky"), ("chain_true", "true"),
               ("right_answer_false_chain", "lucky/rt"),
               ("chair_s", "CHAIR_s"), ("chair_i", "CHAIR_i"), ("avg_len", "words"),
               ("acc_plus", "acc+"), ("other", "other"), ("score", "score"), ("single", "1-round")]
    columns = [(k, h) for k, h in columns if any(k in m for splits in metrics.values() for m in splits.values())]
    print(f"\n{'task':10s} {'split':16s}" + "".join(f" {h:>9s}" for _, h in columns))
    for t, splits in metrics.items():
        for split, m in splits.items():
            cells = ["" if k not in m else str(m[k]) if k == "n" else f"{m[k]:.1f}" if k in ("avg_len", "score")
                     else f"{100 * m[k]:.1f}" for k, _ in columns]
            print(f"{t:10s} {split[:16]:16s}" + "".join(f" {c:>9s}" for c in cells))
    print("(percentages, except n, words per caption and MME's score: 100 x (acc + acc+) per subtask, summed in "
          "its totals; MMBench's acc is circular, 1-round its first round alone)")
    if n_generated:
        print(f"{n_generated} questions answered in {elapsed:.1f}s ({n_generated / elapsed:.1f} questions/s)")

    # best-of-N: every way of picking one of the same N samples, scored by the cot rule
    if sampled_rows is not None:
        greedy_score = {p["question_id"]: p["score"] for p in preds["cot"]}
        picks = ["greedy", "sample", "majority"] + (["verifier", "weighted"] if verifier else []) + ["oracle"]
        best_rows = []
        for r in sampled_rows:
            scores = [B.judge("cot", dict(r, text=t))["score"] for t in r["samples"]]
            m, v = A.majority_index(r["samples"], r), A.best_index(r["rewards"])
            w = A.weighted_index(r["samples"], r, r["rewards"])
            best_rows.append(dict(question_id=r["question_id"], category=r.get("category"), prompt=r["prompt"],
                                  samples=r["samples"], rewards=r["rewards"], scores=scores, majority_pick=m,
                                  verifier_pick=v if verifier else None, weighted_pick=w if verifier else None,
                                  greedy=greedy_score[r["question_id"]], sample=sum(scores) / len(scores),
                                  majority=scores[m], verifier=scores[v] if verifier else None,
                                  weighted=scores[w] if verifier else None, oracle=max(scores)))
        def summary(g):
            in_band = sum(band[0] <= r["sample"] <= band[1] for r in g) / len(g)
            return dict({k: sum(r[k] for r in g) / len(g) for k in picks}, in_band=in_band, n=len(g))
        best = {c: summary(g) for c, g in tasks.pope.by_category(best_rows).items()}
        if len(best) > 1:
            best["overall"] = summary(best_rows)
        if verifier:  # does the reward rank a question's better samples above its worse ones? (0.5 = chance)
            for split, g in list(tasks.pope.by_category(best_rows).items()) + [("overall", best_rows)]:
                if split in best:
                    best[split]["verifier_auc"] = A.ranking_auc([r["rewards"] for r in g], [r["scores"] for r in g])
        print(f"\ncot best-of-{best_of} (T={best_of_temperature}): accuracy of the answer each rule picks; "
              f"sample = one random sample, oracle = right if any sample is")
        print(f"{'split':12s}" + "".join(f" {k:>9s}" for k in picks))
        for split, m in best.items():
            print(f"{split:12s}" + "".join(f" {100 * m[k]:9.1f}" for k in picks)
                  + (f"   reward AUC {m['verifier_auc']:.3f}" if m.get("verifier_auc") is not None else ""))
        print(f"questions whose samples are right {band[0]:.0%}-{band[1]:.0%} of the time (in_band): "
              + ", ".join(f"{split} {100 * m['in_band']:.1f}%" for split, m in best.items()))
        print(f"{best_of * len(best_rows)} answers sampled{' and verified' if verifier else ''} in {sample_seconds:.1f}s")

    os.makedirs(out_dir, exist_ok=True)
    if sampled_rows is not None:
        D.write_atomic(os.path.join(out_dir, "best_of_predictions.jsonl"), "".join(json.dumps(r) + "\n" for r in best_rows))
        D.write_atomic(os.path.join(out_dir, "best_of.json"), json.dumps(best, indent=2))
    names = {t: f"{t}_predictions.jsonl" if task == "shapes" else "predictions.jsonl" for t in preds}
    for t, ps in preds.items():
        D.write_atomic(os.path.join(out_dir, names[t]), "".join(json.dumps(p) + "\n" for p in ps))
    # metrics.json holds the splits themselves (one task) or {task: splits} (shapes): nothing else, so
    # a reader can take every entry as a split; what was run goes to run.json
    D.write_atomic(os.path.join(out_dir, "metrics.json"), json.dumps(metrics if task == "shapes" else metrics[task], indent=2))
    D.write_atomic(os.path.join(out_dir, "run.json"), json.dumps(dict(
        config=config, task=task, files={t: dict(questions=path, answers=answers) for t, path, answers in runs},
        synonyms=synonyms_path if synonyms else None, init_from=None if predictions else init_from,
        verifier=verifier or None,
        seconds=round(elapsed, 2), questions=sum(len(r) for r in rows.values())), indent=2))
    print(f"wrote {out_dir}/metrics.json, run.json and " + ", ".join(sorted(set(names.values()))))
if not predictions:
    common.finish(dist)
