"""
MMBench (Liu et al. 2023): a TSV of 4-option questions with images in base64, asked once per rotation
of the options (circular evaluation), answers matched by VLMEvalKit's rules.
"""
import csv
import io
import os
import re
import sys

from data import DataError, read_text
from tasks.prompts import LETTERS, MC_SUFFIX, option_lines, with_suffix


def _is_none(v):
    """An empty cell as MMBench's TSV has them (LLaVA's is_none: NaN / 'nan' / 'none' / empty)."""
    return v is None or (isinstance(v, str) and v.strip().lower() in ("", "nan", "none"))


def read_mmbench(path, circular=True):
    """
    MMBench's TSV (MMBench_DEV_EN.tsv: index, question, hint, A, B, C, D, answer, category,
    l2-category, image as base64; an image cell that is an index points at that row's image) -> one
    question per round, as LLaVA's model_vqa_mmbench.py asks them: the prompt is hint + '\\n' + question,
    then 'A. ...' lines, then MC_SUFFIX; the options are those up to the first empty one; with
    circular, round r shows them rotated left by r (the same letters A, B, ... in order), so a
    question with 4 options is asked 4 times. Each question has question_id (the index), round_id,
    options (as shown), answer (the gold letter in that round), category, l2_category, image (a name
    for it) and image_b64. Needs 'answer' (the dev split; the test split is scored by MMBench's server).
    """
    csv.field_size_limit(sys.maxsize)  # an image cell holds a whole base64 picture
    text = read_text(path)
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t"))
    if not rows:
        raise DataError(f"{path}: no questions", "malformed record")
    missing = [c for c in ("index", "question", "A", "B", "answer", "image") if c not in rows[0]]
    if missing:
        raise DataError(f"{path}: not an MMBench TSV with answers: no column {', '.join(map(repr, missing))} (header: "
                        f"{list(rows[0])[:12]})" + (" - the test split has no answers; MMBench's server scores it"
                                                    if missing == ["answer"] else ""), "malformed record")
    images = {r["index"]: r["image"] for r in rows}
    questions, seen = [], set()
    for i, r in enumerate(rows):
        where_ = f"{path}: row {i + 2} (index {r.get('index')!r})"  # row 1 is the header
        if r["index"] in seen:
            raise DataError(f"{where_}: index repeats", "malformed record")
        seen.add(r["index"])
        options = []
        for letter in LETTERS[:8]:
            if letter not in r or _is_none(r[letter]):
                break
            options.append(r[letter])
        if len(options) < 2 or _is_none(r["question"]):
            raise DataError(f"{where_}: needs a question and at least options A and B", "malformed record")
        answer = (r["answer"] or "").strip()
        if answer not in LETTERS[:len(options)]:
            raise DataError(f"{where_}: answer {answer!r} is not one of its options' letters {LETTERS[:len(options)]}",
                            "malformed record")
        image = r["image"]
        if len(image) <= 64 and image.strip() in images:  # a pointer to another row's image
            image = images[image.strip()]
        if _is_none(image):
            raise DataError(f"{where_}: no image", "no image")
        question = r["question"] if _is_none(r.get("hint")) else r["hint"] + "\n" + r["question"]
        gold = LETTERS.index(answer)
        for k in range(len(options) if circular else 1):
            shown = options[k:] + options[:k]
            questions.append(dict(question_id=r["index"], round_id=k, image=f"{os.path.basename(path)}#{r['index']}",
                                  image_b64=image, category=r.get("category") or None,
                                  l2_category=r.get("l2-category") or None, options=shown,
                                  answer=LETTERS[(gold - k) % len(options)],
                                  prompt=with_suffix(option_lines(question, shown), MC_SUFFIX)))
    return questions


_VLMEVAL_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                     "I'm sorry, but without the image provided", "Cannot determine the answer")


def mmbench_letter(text, options):
    """
    The option an MMBench answer picks, by VLMEvalKit's rule-based matcher (vlmeval/utils/matching_util.py
    can_infer, at commit 2cf2a36), or None. Its GPT matcher, which VLMEvalKit asks when these rules
    find nothing, is not used: such an answer counts as wrong. The rules, in order:
      1. a refusal phrase ('Cannot determine the answer', ...) -> none ('Z')
      2. punctuation .()[],:;!*#{} becomes spaces; if exactly one option letter stands as a word
         and it is among the last four words, that letter ('B', 'The answer is (B).')
      3. '(correct) answer is X', any case, asterisks allowed ('The answer is **c**') -> X
      4. the answer is at most twice as long as all option texts together and contains exactly one
         option's text (case-insensitive)
    A lone 'Z' is VLMEvalKit's "none of them": wrong. VLMEvalKit's 'A might be a quantifier' check
    runs only with VERBOSE set, so it is off here too: 'A red circle' picks A.
    """
    letters = LETTERS[:len(options)]
    if any(err in text for err in _VLMEVAL_REFUSALS):
        return None
    splits = text
    for c in ".()[],:;!*#{}":
        splits = splits.replace(c, " ")
    splits = splits.split()
    hits = [c for c in letters if c in splits]
    if len(hits) == 1 and splits.index(hits[0]) > len(splits) - 5:
        return hits[0]
    if not hits and "Z" in splits:
        return None
    m = re.search(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", text)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    low = text.lower()
    if len(low) > 2 * sum(len(o) for o in options):
        return None
    found = [c for c, o in zip(letters, options) if o.lower() in low]
    return found[0] if len(found) == 1 else None


def score_mmbench(rows):
    """MMBench's circular accuracy: a question is right only if every round of it is right.
    -> {category: {accuracy, single (round 0 alone: the non-circular figure), n (questions)}} for each
    category, 'l2/<l2-category>' for each of its ability dimensions, and 'overall'."""
    per_q = {}
    for r in rows:
        q = per_q.setdefault(r["question_id"], dict(category=r.get("category"), l2=r.get("l2_category"), rounds={}))
        q["rounds"][r["round_id"]] = mmbench_letter(r["text"], r["options"]) == r["answer"]

    def metrics(qs):
        return dict(accuracy=sum(all(q["rounds"].values()) for q in qs) / len(qs),
                    single=sum(q["rounds"].get(0, False) for q in qs) / len(qs), n=len(qs))
    out = {}
    for key, prefix in (("category", ""), ("l2", "l2/")):
        groups = {}
        for q in per_q.values():
            if q[key]:
                groups.setdefault(prefix + q[key], []).append(q)
        out.update({c: metrics(groups[c]) for c in sorted(groups)})
    out["overall"] = metrics(list(per_q.values()))
    return out
