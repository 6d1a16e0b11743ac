"""
LLaVA-Reasoner's pair mining (Zhang et al. 2024, "Improve Vision Language Model Chain-of-thought
Reasoning"), which its authors did not release: for each question with a gold short answer, sample N
chain-of-thought answers from the CoT-SFT model, read the short answer after the last '### Answer:',
check it against the gold, keep the questions whose sample accuracy lies inside a band (a question
the model always or never gets right has no pair worth learning from), and pair correct with
incorrect chains at random. selfreward.py (mode=answer) runs it over a question file; tests check
the rules here on hand-made samples.

  sample   one VLM.generate call per batch of questions: each prompt (its image included) prefilled
           once and its KV cache copied N times (group_size), then temperature / top-p sampling
  check    data.cot_answer + data.answer_correct: the option letter for multiple choice (as
           evaluate.py reads it), relaxed numbers (5 %), VQA-normalised exact match otherwise (evaluate.py
           scores VQA by the soft 3-of-10 rule instead); an answer without the marker is incorrect (and counted)
  pick     accuracy in [min_accuracy, max_accuracy]; up to pairs_per_question distinct (correct,
           incorrect) texts drawn without replacement, from a stream fixed by the seed and the
           question's id, so the pairs do not depend on batching, ranks or resuming
"""
import random

import data as D


def sample_answers(vlm, questions, n, temperature=1.0, top_p=1.0, max_new_tokens=256, generator=None):
    """n sampled answers per question (a list of n texts each), for questions as data.load_prompts
    (kind='question') gives them. Call under torch.no_grad (and autocast)."""
    ids, px, _ = D.prompt_inputs(questions, vlm)
    ids, mask = D.collate_prompts(ids, vlm.tokenizer.pad_token_id)
    out = vlm.generate(ids.to(px.device), px, mask.to(px.device), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, generator=generator, group_size=n)
    return [[t.strip() for t in out.text[i * n:(i + 1) * n]] for i in range(len(questions))]


def check_answers(question, texts, tolerance=0.05):
    """Each sampled text -> dict(text, answer (after the last '### Answer:'; None when the marker is
    missing), correct)."""
    rows = []
    for t in texts:
        short = D.cot_answer(t)
        rows.append(dict(text=t, answer=short,
                         correct=bool(short) and D.answer_correct(short, question, tolerance)))
    return rows


def pick_pairs(samples, qid, seed, min_accuracy=0.25, max_accuracy=0.85, max_pairs=3):
    """-> (accuracy, [(chosen, rejected) texts], None) for a question inside the band, else
    (accuracy, [], 'below band' | 'above band' | 'all correct' | 'all incorrect'). Identical texts count once; the pairs are drawn from
    random.Random(f'{seed}:{qid}'), so the same question and seed give the same pairs."""
    if not samples:
        raise ValueError(f"question {qid!r}: no samples")
    acc = sum(s["correct"] for s in samples) / len(samples)
    if acc < min_accuracy:
        return acc, [], "below band"
    if acc > max_accuracy:
        return acc, [], "above band"
    right = sorted({s["text"] for s in samples if s["correct"]})
    wrong = sorted({s["text"] for s in samples if not s["correct"]})
    combos = [(c, r) for c in right for r in wrong]
    if not combos:  # only when the band reaches 0 or 1
        return acc, [], "all correct" if right else "all incorrect"
    return acc, random.Random(f"{seed}:{qid}").sample(combos, min(max_pairs, len(combos))), None
