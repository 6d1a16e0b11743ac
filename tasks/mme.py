"""
MME (Fu et al. 2023): yes/no question pairs per image; LLaVA's convert_answer_to_mme.py + MME's
eval_tool/calculation.py (accuracy and acc+ per subtask, perception and cognition totals).
"""
import os
from collections import Counter

from data import DataError, read_text
from tasks.prompts import SHORT_SUFFIX


MME_SUFFIX = "Please answer yes or no."


# MME's two totals (its eval_tool/calculation.py): the sum of the subtask scores in each
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")


MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_question(text):
    """A question as MME's answer files and LLaVA's question file both hold it, for matching: without
    LLaVA's short-answer suffix and MME's 'Please answer yes or no.', whitespace collapsed. (LLaVA's
    converter strips the one suffix and re-adds the other, trying one and two spaces before it.)"""
    return " ".join(text.replace(SHORT_SUFFIX, "").replace(MME_SUFFIX, "").split())


def mme_gold(mme_root):
    """{(subtask, image stem, question): 'yes'|'no'} from MME's folder (MME_Benchmark_release_version):
    <subtask>/questions_answers_YN/<stem>.txt when <subtask>/images exists, else <subtask>/<stem>.txt,
    one 'question<TAB>answer' a line (LLaVA's get_gt reads it the same way)."""
    if not os.path.isdir(mme_root):
        raise DataError(f"{mme_root}: MME's benchmark folder (per-subtask answer files) not found; point "
                        f"mme_root at MME_Benchmark_release_version", "missing file")
    gold = {}
    for subtask in sorted(os.listdir(mme_root)):
        d = os.path.join(mme_root, subtask)
        if not os.path.isdir(d):
            continue
        qa_dir = os.path.join(d, "questions_answers_YN") if os.path.isdir(os.path.join(d, "images")) else d
        for name in sorted(os.listdir(qa_dir)) if os.path.isdir(qa_dir) else []:
            if not name.endswith(".txt"):
                continue
            f = os.path.join(qa_dir, name)
            for lineno, line in enumerate(read_text(f).splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.strip().split("\t")
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    raise DataError(f"{f}: line {lineno}: expected 'question<TAB>Yes|No', got {line.strip()!r:.80}",
                                    "malformed record")
                gold[subtask, name[:-4], mme_question(parts[0])] = parts[1].strip().lower()
    return gold


def mme_labels(questions, path, mme_root):
    """MME questions with their label (from the record or MME's folder, mme_gold), checked as MME's
    calculation.py needs them: every image of a subtask has exactly two questions."""
    if any(q["label"] is None for q in questions):
        gold = mme_gold(mme_root)
        for q in questions:
            if q["label"] is None:
                key = (*q["mme_image"], mme_question(q["prompt"]))
                if key not in gold:
                    raise DataError(f"{path}: question_id {q['question_id']!r}: no answer in {mme_root}/{key[0]}/ for "
                                    f"image {key[1]!r} and question {key[2]!r:.60}", "missing answer")
                q["label"] = gold[key]
    per_image = Counter(q["mme_image"] for q in questions)
    bad = next((k for k, n in per_image.items() if n != 2), None)
    if bad is not None:
        raise DataError(f"{path}: subtask {bad[0]!r} image {bad[1]!r} has {per_image[bad]} questions; MME asks two "
                        f"of each image (acc+ needs both)", "malformed record")
    return questions


def mme_answer(text):
    """MME's rule (calculation.py parse_pred_ans), on the lower-cased answer: 'yes' or 'no' as the whole
    answer; else 'yes' if its first four characters contain 'yes', else 'no' if they contain 'no', else
    'other' (wrong either way). So 'Yes, ...' is yes, 'Not ...' and 'None' are no, 'There is ...' is other."""
    t = text.lower()
    if t in ("yes", "no"):
        return t
    return "yes" if "yes" in t[:4] else "no" if "no" in t[:4] else "other"


def mme_metrics(rows):
    """One MME subtask: accuracy (per question), acc_plus (images with both questions right), score =
    100 * (accuracy + acc_plus), the figure MME's tables sum (0-200 per subtask), other = answers
    that are neither yes nor no, n questions."""
    preds, right = [mme_answer(r["text"]) for r in rows], {}
    for r, p in zip(rows, preds):
        right.setdefault(r["mme_image"], []).append(p == r["label"])
    acc = sum(map(sum, right.values())) / len(rows)
    acc_plus = sum(all(v) for v in right.values()) / len(right)
    return dict(accuracy=acc, acc_plus=acc_plus, score=100 * (acc + acc_plus),
                other=preds.count("other") / len(rows), n=len(rows))


def score_mme(rows):
    """{subtask: mme_metrics} in MME's order, then 'perception' and 'cognition': the sum of their
    subtasks' scores (out of 2000 and 800 with every subtask present; 'subtasks' says how many were)."""
    groups = {}
    for r in rows:
        groups.setdefault(r["category"], []).append(r)
    order = [t for t in MME_PERCEPTION + MME_COGNITION if t in groups] + sorted(t for t in groups if t not in
                                                                               MME_PERCEPTION + MME_COGNITION)
    out = {t: mme_metrics(groups[t]) for t in order}
    for total, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [t for t in names if t in out]
        if present:
            out[total] = dict(score=sum(out[t]["score"] for t in present), subtasks=len(present),
                              n=sum(out[t]["n"] for t in present))
    return out
