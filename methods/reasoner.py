"""
LLaVA-Reasoner's pair mining (Zhang et al. 2024, "Improve Vision Language Model Chain-of-thought
Reasoning"), which its authors did not release: for each question with a gold short answer, sample N
chain-of-thought answers from the CoT-SFT model, read the short answer after the last '### Answer:',
check it against the gold, keep the questions whose sample accuracy lies inside a band (a question
the model always or never gets right has no pair worth learning from), and pair correct with
incorrect chains at random. selfreward.py (mode=answer) runs it over a question file; tests check
the rules here on hand-made samples. And the paper's follow-up use of the DPO model: a verifier that
picks one of N sampled answers by the DPO reward, beside the majority answer (evaluate.py --best_of=N).

  sample   one VLM.generate call per batch of questions: each prompt (its image included) prefilled
           once and its KV cache copied N times (group_size), then temperature / top-p sampling
  check    tasks.cot.cot_answer + tasks.cot.answer_correct: the option letter for multiple choice (as
           evaluate.py reads it), relaxed numbers (5 %), VQA-normalised exact match otherwise (evaluate.py
           scores VQA by the soft 3-of-10 rule instead); an answer without the marker is incorrect (and counted)
  pick     accuracy in [min_accuracy, max_accuracy]; up to pairs_per_question (correct, incorrect) pairs
           of samples drawn without replacement (draw='samples', the paper's "random pairs": a chain
           the model produced often is drawn as often), or of distinct texts (draw='distinct'), from a
           stream fixed by the seed and the question's id, so the pairs do not depend on batching,
           ranks or resuming
  verify   answer_logps: each answer's summed log-prob under a model, on the tokens DPO trains
           (data.build_answer); reward = log pi_dpo - log pi_sft, DPO's implicit reward (times 1/beta)
  rank     ranking_auc: how often a reward orders a question's samples as their scores do
  vote     majority_index: the most common short answer (letters, numbers by value, VQA-normalised text);
           weighted_index: the same vote with each sample weighted by its reward's share, softmax over
           the question's samples (with the DPO reward, pi_dpo / pi_sft normalised: an importance weight)
"""
import random
from collections import Counter

import torch

import data as D
import tasks.cot
import tasks.mc
import tasks.vqa


def sample_answers(vlm, questions, n, temperature=1.0, top_p=1.0, max_new_tokens=256, generator=None):
    """n sampled answers per question (a list of n texts each), for questions as data.load_prompts
    (parse=tasks.benchmark.question_from_record) gives them. Call under torch.no_grad (and autocast)."""
    ids, px, _ = D.prompt_inputs(questions, vlm)
    ids, mask = D.collate_prompts(ids, vlm.tokenizer.pad_token_id)
    out = vlm.generate(ids.to(px.device), px, mask.to(px.device), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, generator=generator, group_size=n)
    return [[t.strip() for t in out.text[i * n:(i + 1) * n]] for i in range(len(questions))]


def check_answers(question, texts, tolerance=0.05, by_chain=False):
    """Each sampled text -> dict(text, answer (after the last '### Answer:'; None when the marker is
    missing), correct). by_chain: an oracle for analysis, not the method: correct only when the whole
    text is the question's gold chain ('rationale') verbatim, reasoning and answer alike."""
    rows = []
    for t in texts:
        short = tasks.cot.cot_answer(t)
        correct = t.strip() == question["rationale"].strip() if by_chain else \
            bool(short) and tasks.cot.answer_correct(short, question, tolerance)
        rows.append(dict(text=t, answer=short, correct=correct))
    return rows


def pick_pairs(samples, qid, seed, min_accuracy=0.25, max_accuracy=0.85, max_pairs=3, draw="samples"):
    """-> (accuracy, [(chosen, rejected) texts], None) for a question inside the band, else
    (accuracy, [], 'below band' | 'above band' | 'all correct' | 'all incorrect'). draw='samples': pairs of
    samples, so a text sampled k times is k times as likely to be drawn (and a pair may repeat);
    'distinct': pairs of distinct texts, each text once however often it was sampled. The pairs are drawn
    from random.Random(f'{seed}:{qid}') over the samples sorted by text, so the same question, samples and
    seed give the same pairs whatever order the samples came in."""
    if draw not in ("samples", "distinct"):
        raise ValueError(f"draw must be 'samples' or 'distinct', got {draw!r}")
    if not samples:
        raise ValueError(f"question {qid!r}: no samples")
    acc = sum(s["correct"] for s in samples) / len(samples)
    if acc < min_accuracy:
        return acc, [], "below band"
    if acc > max_accuracy:
        return acc, [], "above band"
    pool = list if draw == "samples" else set  # every sample, or each text once
    right = sorted(pool(s["text"] for s in samples if s["correct"]))
    wrong = sorted(pool(s["text"] for s in samples if not s["correct"]))
    combos = [(c, r) for c in right for r in wrong]
    if not combos:  # only when the band reaches 0 or 1
        return acc, [], "all correct" if right else "all incorrect"
    return acc, random.Random(f"{seed}:{qid}").sample(combos, min(max_pairs, len(combos))), None


def answer_logps(vlm, questions, texts, max_words=0, drop_eos=False, max_len=None):
    """Summed log-probs (len(questions), n) fp32 of texts[i][j], the j-th of n answers to questions[i]
    (as data.load_prompts gives them), each scored as DPO scores an answer (data.build_answer: the
    answer's tokens and its end of turn, after the prompt generation used). Each image is encoded once
    for its n answers. Call under torch.no_grad (and autocast)."""
    n = len(texts[0])
    if any(len(t) != n for t in texts):
        raise ValueError("every question needs the same number of answers")
    _, px, _ = D.prompt_inputs(questions, vlm)
    tok = vlm.tokenizer
    rows = []
    for j in range(n):  # sample-major: row j * B + i is texts[i][j], so image_repeat=n gives row i its image
        for q, ts in zip(questions, texts):
            prompt = [{"from": "human", "value": D.IMAGE_PLACEHOLDER + "\n" + q["prompt"]}]
            ids, labels, _ = D.build_answer(prompt, ts[j], tok, vlm.config["template"], vlm.image_token_id,
                                            vlm.num_image_tokens, 1, max_len, max_words, drop_eos)
            rows.append(dict(input_ids=ids, labels=labels))
    b = D.collate(rows, tok.pad_token_id)
    nll = vlm(b["input_ids"].to(px.device), px, b["attention_mask"].to(px.device), b["labels"].to(px.device),
              reduction="row", image_repeat=n)
    return -nll.float().view(n, len(questions)).T


def vote_key(short, question):
    """What two short answers must share to count as the same vote: the option letter (multiple
    choice), the value of a number ('2', 'two', '2.0'), else the VQA-normalised text; None without one."""
    if not short:
        return None
    if "options" in question:
        return tasks.mc.extract_letter(short, len(question["options"]), question["options"])
    number = tasks.cot.read_number(short)
    return number[0] if number is not None else tasks.vqa.normalize_vqa(short) or None


def _vote(texts, question, weights):
    """The index of the first answer giving the short answer with the most weight (ties go to the answer
    seen first); 0 when no answer has one."""
    keys = [vote_key(tasks.cot.cot_answer(t), question) for t in texts]
    total = Counter()
    for k, w in zip(keys, weights):
        if k is not None:
            total[k] += w
    if not total:
        return 0
    top = max(total.values())
    return next(i for i, k in enumerate(keys) if k is not None and total[k] == top)


def majority_index(texts, question):
    """Self-consistency's majority vote: each sample's short answer counts once."""
    return _vote(texts, question, [1] * len(texts))


def weighted_index(texts, question, rewards):
    """Weighted voting: each sample votes for its short answer with weight softmax(rewards) over the
    question's samples (majority_index when every reward is equal)."""
    return _vote(texts, question, torch.softmax(torch.as_tensor(rewards, dtype=torch.float64), 0).tolist())


def best_index(rewards):
    """The index of the highest reward (the first of equal ones)."""
    rewards = torch.as_tensor(rewards)
    return int((rewards == rewards.max()).nonzero()[0, 0])


def ranking_auc(rewards, scores):
    """Within-question AUC: over every pair of samples of the same question with different scores, the
    share the reward orders like the score (ties count half); None without such pairs. rewards and
    scores are lists (one per question) of per-sample lists."""
    agree = pairs = 0.0
    for rs, ss in zip(rewards, scores):
        for i in range(len(ss)):
            for j in range(len(ss)):
                if ss[i] > ss[j]:
                    pairs += 1
                    agree += 1.0 if rs[i] > rs[j] else 0.5 if rs[i] == rs[j] else 0.0
    return agree / pairs if pairs else None
