"""
POPE (Li et al. 2023): yes/no object existence with random / popular / adversarial negatives, scored
as LLaVA's eval_pope.py does (yes/no from the answer's first sentence). Labels come with the questions,
or from POPE's coco/coco_pope_<category>.json when the file is LLaVA's llava_pope_test.jsonl.
"""
import os

from data import DataError, read_json_file
from tasks.prompts import SHORT_SUFFIX, with_suffix


POPE_SPLITS = ("random", "popular", "adversarial")


def pope_labels(records, path, annotation_dir):
    """LLaVA's POPE layout: llava_pope_test.jsonl has question_id, image, text and category but no label;
    eval_pope.py takes the labels from POPE's coco_pope_<category>.json in its --annotation-dir, the
    i-th line of a category's file for the i-th question of that category. The same here, and each pair
    must show the same image and question (the short-answer suffix aside), so files in another order are
    an error naming both, not a silently shifted score. Returns the records, 'label' added where missing."""
    def same(r):  # what must agree between a question and its label line
        return r.get("image"), with_suffix(str(r.get("text", "")).strip(), SHORT_SUFFIX)

    records, todo = list(records), {}
    for i, r in enumerate(records):
        if isinstance(r, dict) and r.get("label") is None:
            todo.setdefault(r.get("category"), []).append(i)
    for category, idx in todo.items():
        if category is None:
            raise DataError(f"{path}: record {idx[0]}: no 'label', and no 'category' to find it under", "malformed record")
        label_file = os.path.join(annotation_dir, f"coco_pope_{category}.json")
        if not os.path.isfile(label_file):
            raise DataError(f"{path}: record {idx[0]} has no 'label' and {label_file} (POPE's labels for the "
                            f"{category!r} questions) does not exist; point pope_annotation_dir at the folder of "
                            f"coco_pope_<category>.json files", "missing file")
        labels = read_json_file(label_file)
        if len(labels) != len(idx):
            raise DataError(f"{label_file}: {len(labels)} lines for the {len(idx)} {category!r} questions "
                            f"of {path}", "malformed record")
        for line, (i, lab) in enumerate(zip(idx, labels), 1):
            q, lab = records[i], lab if isinstance(lab, dict) else {}
            if same(lab) != same(q):
                raise DataError(f"{label_file}: line {line} ({lab.get('image')!r}, {lab.get('text')!r:.60}) is not "
                                f"{path}: record {i} ({q.get('image')!r}, {q.get('text')!r:.60}): the label file "
                                f"must list the {category!r} questions in the question file's order", "malformed record")
            records[i] = dict(q, label=lab.get("label"))
    return records


def pope_answer(text):
    """LLaVA's POPE rule, exactly as llava/eval/eval_pope.py has it: keep the text before the first '.',
    drop commas, split on single spaces; "no" if a word is exactly 'No', 'no' or 'not', else "yes".
    So it is case-sensitive ('NO' counts as yes), "I don't see a dog" counts as yes (no such word),
    and an empty answer counts as yes."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(preds, labels):
    """preds, labels: 'yes'/'no' lists -> dict(accuracy, precision, recall, f1, yes_ratio, n), fractions,
    'yes' the positive class (eval_pope.py). Where eval_pope.py would divide by zero (no 'yes' answers
    or no 'yes' labels) the figure is 0.0."""
    if len(preds) != len(labels) or not preds:
        raise ValueError(f"pope_metrics: {len(preds)} answers for {len(labels)} labels")
    bad = sorted({v for v in (*preds, *labels) if v not in ("yes", "no")})
    if bad:
        raise ValueError(f"pope_metrics: values must be 'yes' or 'no', got {bad[:3]}")
    tp = sum(p == "yes" and l == "yes" for p, l in zip(preds, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(preds, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(preds, labels))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / sum(l == "yes" for l in labels) if "yes" in labels else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(accuracy=(tp + tn) / n, precision=precision, recall=recall, f1=f1, yes_ratio=(tp + fp) / n, n=n)


def by_category(rows):
    """{category: rows}: POPE's splits first, then the others sorted; no category -> 'all'."""
    groups = {}
    for r in rows:
        groups.setdefault(r.get("category") or "all", []).append(r)
    order = [c for c in POPE_SPLITS if c in groups] + sorted(c for c in groups if c not in POPE_SPLITS)
    return {c: groups[c] for c in order}


def score_pope(rows):
    """rows: dicts with 'text' (the answer), 'label' and optionally 'category'. -> {split: metrics},
    plus 'average' = the mean of the splits' figures (n: their total) when there is more than one
    split, the number POPE tables (LLaVA-1.5's included) report."""
    splits = {c: pope_metrics([pope_answer(r["text"]) for r in g], [r["label"] for r in g])
              for c, g in by_category(rows).items()}
    if len(splits) > 1:
        average = {k: sum(m[k] for m in splits.values()) / len(splits)
                   for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
        splits["average"] = dict(average, n=sum(m["n"] for m in splits.values()))
    return splits
