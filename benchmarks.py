"""
Benchmarks: question files -> prompts, and answers -> scores, by each benchmark's published rule.
Everything here is a pure function of the files and the answer text, so `evaluate.py --predictions=`
scores an answer file from any model, and the tests check every rule on hand-made cases.

  pope    LLaVA's eval_pope.py (yes/no, the first sentence), random / popular / adversarial splits
  mc      ScienceQA (LLaVA's eval_science_qa.py) and plain multiple choice: the option letter
  vqa     the VQA challenge's normalisation and 3-of-10 accuracy (EvalAI / LLaVA's m4c_evaluator.py)
  cot     LLaVA-Reasoner: the short answer after the last '### Answer:', then the mc or vqa rule
  chair   CHAIR (Rohrbach et al. 2018, the original chair.py): objects a caption mentions vs the image's

Also the gold-answer questions answer sampling mines from (question_from_record, selfreward.py
mode=answer). Reading files and records (DataError, read_json_file, ...) is data.py's.
"""
import csv
import io
import itertools
import json
import os
import re
import sys
import warnings
from collections import Counter

from data import (IMAGE_PLACEHOLDER, ROLES, DataError, check_conversations, check_image_file, load_image,
                  load_image_b64, read_json_file, read_text, record_images, resolve_image)

BENCHMARKS = ("pope", "mc", "vqa", "cot", "chair", "mme", "mmbench")
# the prompt suffixes of LLaVA-1.5's eval scripts (short answer, multiple choice) and LLaVA-Reasoner (CoT)
SHORT_SUFFIX = "Answer the question using a single word or phrase."
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
COT_SUFFIX = "Generate a reason first and then output a short answer."
DIRECT_SUFFIX = "Answer the question with a short answer."  # LLaVA-Reasoner's direct mode
MODE_SUFFIXES = (SHORT_SUFFIX, MC_SUFFIX, COT_SUFFIX, DIRECT_SUFFIX)
COT_MARKER = "### Answer:"
CHAIR_PROMPT = "Describe the image in detail."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
POPE_SPLITS = ("random", "popular", "adversarial")
MME_SUFFIX = "Please answer yes or no."
# MME's two totals (its eval_tool/calculation.py): the sum of the subtask scores in each
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def answer_key(rec, task=None):
    """What pairs an answer with its question: str(question_id) (1 and "1" are one question: files
    disagree on the type), with the round for MMBench's circular rounds ('7#2'), and for MME the
    question too: LLaVA's MME question_id is the image, asked twice (its converter matches answers
    to questions by the answer file's 'prompt')."""
    key = str(rec["question_id"])
    if task == "mme":
        return key + "#" + _mme_question(rec.get("prompt") or "")
    return key if rec.get("round_id") is None else f"{key}#{rec['round_id']}"


def with_suffix(text, suffix):
    """text + '\\n' + suffix, unless the text already carries it (LLaVA's own question files do)."""
    return text if suffix in text else text.rstrip() + "\n" + suffix


def strip_modes(text):
    """The question without the suffixes that select an answer mode (MODE_SUFFIXES), stripped."""
    for suffix in MODE_SUFFIXES:
        text = text.replace(suffix, "")
    return text.strip()


def option_lines(question, options):
    """LLaVA-1.5's multiple-choice layout (model_vqa_mmbench): the question, then 'A. option' lines."""
    return "\n".join([question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)])


def parse_options(text):
    """The options written in a ScienceQA prompt, either LLaVA's conversion 'Options: (A) x (B) y' or
    LLaVA-1.5's 'A. x' lines; [] if there are none. Letters must run A, B, C... in order."""
    line = next((l for l in text.splitlines() if l.startswith("Options:")), None)
    if line is not None:
        found = re.findall(r"\(([A-Z])\)\s*(.*?)\s*(?=\([A-Z]\)|$)", line[len("Options:"):])
    else:
        found = re.findall(r"^([A-Z])\. (.*?)\s*$", text, re.M)
    letters = "".join(l for l, _ in found)
    return [o for _, o in found] if found and LETTERS.startswith(letters) else []


def gold_letter(answer, options):
    """A gold answer as an option letter: 'B', 1 (an index, as in ScienceQA's problems.json) or the
    option's text. Raises DataError when it is none of them."""
    n = len(options)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < n:
        return LETTERS[answer]
    if isinstance(answer, str):
        if len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[:n]:
            return answer.strip().upper()
        if answer in options:
            return LETTERS[options.index(answer)]
    raise DataError(f"answer {answer!r} is not an option letter A-{LETTERS[n - 1]}, an index or an option's text",
                    "malformed record")


def benchmark_question(rec, task):
    """
    One record of a benchmark file -> dict(question_id, image (path or None), prompt (the text the
    model is asked, without <image>), category (None if absent), + the gold fields of the task):
      pope   text, label yes|no                              -> label
      mc     question + options (list) + answer (letter, index or option text) -> options, answer
             or text (a prompt that already lists the options) + options + answer
             or ScienceQA as LLaVA ships it: {id, image?, conversations: [human, gpt 'The answer is X.']}
      vqa    question or text, answers (list; VQAv2's [{answer: ...}] too) or answer -> answers
      cot    like mc when it has options, else like vqa
      chair  text (default CHAIR_PROMPT), objects (the true objects)  -> objects
      mme    question_id '<subtask>/<image>', image, text (as written: LLaVA's file carries its suffixes),
             label yes|no (optional: mme_labels reads it from MME's folder)  -> label, mme_image
    (MMBench's TSV rows: read_mmbench.)
    Prompts follow LLaVA's eval scripts: POPE and VQA get SHORT_SUFFIX, mc MC_SUFFIX, cot COT_SUFFIX,
    each only if the text does not already carry it. Raises DataError (the caller adds file and index).
    """
    if not isinstance(rec, dict):
        raise DataError(f"record is a {type(rec).__name__}, not an object", "malformed record")
    if task not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {task!r}, expected one of {BENCHMARKS}")
    qid = next((rec[k] for k in ("question_id", "id", "image_id") if rec.get(k) is not None), None)
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise DataError("needs a 'question_id' (or 'id'; 'image_id' for CHAIR), a string or an integer", "malformed record")
    image = rec.get("image")
    if image is not None and not (isinstance(image, str) and image):
        raise DataError(f"'image' must be one path, got {image!r:.80}", "malformed record")
    category = rec.get("category", rec.get("type"))  # 'type': the old shapes test.jsonl's name for it
    q = dict(question_id=qid, image=image, category=None if category is None else str(category))

    def text_field(*keys):
        t = next((rec[k] for k in keys if rec.get(k) is not None), None)
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"needs a non-empty string {' or '.join(repr(k) for k in keys)}", "malformed record")
        return t.replace(IMAGE_PLACEHOLDER, "").strip()  # the image goes first, as LLaVA's eval scripts put it

    def choices():
        opts = rec.get("options")
        if not (isinstance(opts, list) and 2 <= len(opts) <= len(LETTERS) and all(isinstance(o, str) for o in opts)):
            raise DataError(f"'options' must be a list of 2 to {len(LETTERS)} strings, got {opts!r:.80}", "malformed record")
        if "answer" not in rec:
            raise DataError("needs 'answer' (the right option's letter)", "malformed record")
        return opts, gold_letter(rec["answer"], opts)

    def chain():  # a cot question's gold reasoning chain, when the file has one (the shapes world's do)
        return dict(rationale=rec["rationale"]) if task == "cot" and isinstance(rec.get("rationale"), str) else {}

    def asked(suffix):  # 'question' is the bare question (options get listed); 'text' is the whole prompt
        if "options" in rec and rec.get("question") is not None:
            return with_suffix(option_lines(text_field("question"), rec["options"]), suffix)
        return with_suffix(text_field("question", "text"), suffix)

    if task == "pope":
        label = rec.get("label")
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            raise DataError(f"'label' must be 'yes' or 'no', got {label!r:.40}", "malformed record")
        return dict(q, prompt=with_suffix(text_field("text", "question"), SHORT_SUFFIX), label=label.strip().lower())
    if task == "mc" and "conversations" in rec:  # ScienceQA, LLaVA's llava_test_CQM-A.json
        check_conversations(rec["conversations"])
        human = next((t["value"] for t in rec["conversations"] if ROLES[t["from"]] == "user"), None)
        if human is None:
            raise DataError("no human turn (the question)", "malformed record")
        prompt = human.replace(IMAGE_PLACEHOLDER, "").strip()
        opts = parse_options(prompt)
        if not opts:
            raise DataError("no options found in the question ('Options: (A) ... (B) ...' or 'A. ...' lines)",
                            "malformed record")
        if "answer" in rec:
            answer = gold_letter(rec["answer"], opts)
        else:  # LLaVA's eval reads the gold from problems.json; its conversion also writes it as the gpt turn
            gpt = next(t["value"] for t in rec["conversations"] if ROLES[t["from"]] == "assistant")
            answer = extract_letter(gpt, len(opts))
            if answer is None:
                raise DataError(f"no gold letter in the gpt turn {gpt!r:.60} and no 'answer'", "malformed record")
        # ScienceQA-IMG is the image subset: splitting by it gives that number directly
        q["category"] = q["category"] or ("img" if image else "no_img")
        return dict(q, prompt=with_suffix(prompt, MC_SUFFIX), options=opts, answer=answer)
    if task == "mc":
        opts, answer = choices()
        return dict(q, prompt=asked(MC_SUFFIX), options=opts, answer=answer)
    if task == "vqa" or (task == "cot" and "options" not in rec):
        answers = rec.get("answers", rec.get("answer"))
        if isinstance(answers, (str, int, float)) and not isinstance(answers, bool):
            answers = [answers]
        if isinstance(answers, list):  # VQAv2's annotations: [{"answer": ..., "answer_confidence": ...}]
            answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
        if not (isinstance(answers, list) and answers and
                all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in answers)):
            raise DataError("needs 'answers' (a list of strings) or 'answer' (a string)", "malformed record")
        suffix = SHORT_SUFFIX if task == "vqa" else COT_SUFFIX
        return dict(q, prompt=asked(suffix), answers=[str(a) for a in answers], **chain())
    if task == "cot":
        opts, answer = choices()
        return dict(q, prompt=asked(COT_SUFFIX), options=opts, answer=answer, **chain())
    if task == "mme":  # LLaVA's llava_mme.jsonl: question_id '<subtask>/<image file>', the prompt as written
        label = rec.get("label", rec.get("answer"))
        if label is not None and (not isinstance(label, str) or label.strip().lower() not in ("yes", "no")):
            raise DataError(f"'label' must be 'yes' or 'no', got {label!r:.40}", "malformed record")
        subtask = str(qid).split("/")[0]
        return dict(q, category=q["category"] or subtask, prompt=text_field("text", "question"),
                    label=None if label is None else label.strip().lower(),
                    mme_image=(subtask, str(qid).split("/")[-1].split(".")[0]))
    if task == "mmbench":
        raise ValueError("MMBench rows are read by read_mmbench (a TSV row becomes one question per round)")
    # chair
    objects = rec.get("objects")
    if not (isinstance(objects, list) and all(isinstance(o, str) for o in objects)):
        raise DataError(f"'objects' must be a list of object names, got {objects!r:.80}", "malformed record")
    prompt = text_field("text") if rec.get("text") is not None else CHAIR_PROMPT
    return dict(q, prompt=prompt, objects=objects)


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


def read_benchmark(path, task, pope_annotation_dir=None, mme_root=None, circular=True):
    """All questions of a benchmark file (.jsonl, or a .json list such as ScienceQA's; MMBench: its
    .tsv), checked up front: a bad record or a repeated question_id is a DataError naming the file and
    record. POPE questions without labels take them from pope_annotation_dir (see pope_labels; None =
    the 'coco' folder beside the question file, where LLaVA's eval layout keeps them); MME questions
    from MME's folder mme_root (mme_labels; None = the question file's folder). MMBench: read_mmbench
    (circular: one question per rotation of the options)."""
    if task == "mmbench":
        return read_mmbench(path, circular)
    records = read_json_file(path)
    if task == "pope" and any(isinstance(r, dict) and r.get("label") is None for r in records):
        records = pope_labels(records, path, pope_annotation_dir or os.path.join(os.path.dirname(path), "coco"))
    questions, seen = [], {}
    for i, rec in enumerate(records):
        try:
            q = benchmark_question(rec, task)
        except DataError as e:
            qid = next((rec.get(k) for k in ("question_id", "id", "image_id") if isinstance(rec, dict) and k in rec), None)
            raise DataError(f"{path}: record {i}" + (f" (question_id {qid!r})" if qid is not None else "") + f": {e}",
                            e.kind) from None
        key = answer_key(q, task)
        if key in seen:
            raise DataError(f"{path}: record {i}: question_id {q['question_id']!r} repeats record {seen[key]}",
                            "malformed record")
        seen[key] = i
        questions.append(q)
    if not questions:
        raise DataError(f"{path}: no questions", "malformed record")
    if task == "mme":
        questions = mme_labels(questions, path, mme_root if mme_root is not None else os.path.dirname(path))
    return questions


def question_image(q, image_root, check=False):
    """The image a question shows (RGB): MMBench's base64 cell, or the file image_root / q['image'].
    check: only see that it is there and opens (its header)."""
    if "image_b64" in q:
        return load_image_b64(q["image_b64"], q["image"], check)
    path = resolve_image(image_root, q["image"])
    return check_image_file(path) if check else load_image(path)


def read_answers(path, task=None):
    """A LLaVA answer file (one JSON a line: question_id, text, ...; MMBench's also round_id) ->
    {answer_key: text}. MME's answers need their 'prompt' (answer_key)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: answer file not found", "missing file")
    answers = {}
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            a = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno}: invalid JSON: {e.msg} at column {e.colno}", "invalid json") from None
        if not (isinstance(a, dict) and "question_id" in a and isinstance(a.get("text"), str)):
            raise DataError(f"{path}: line {lineno}: an answer needs 'question_id' and 'text' (a string)",
                            "malformed record")
        if task == "mme" and not isinstance(a.get("prompt"), str):
            raise DataError(f"{path}: line {lineno}: an MME answer needs its 'prompt' (the question): MME asks "
                            f"two questions of each image under one question_id", "malformed record")
        key = answer_key(a, task)
        if key in answers:
            raise DataError(f"{path}: line {lineno}: a second answer to question_id {a['question_id']!r}",
                            "malformed record")
        answers[key] = a["text"]
    if not answers:
        raise DataError(f"{path}: no answers (the file is empty)", "empty file")
    return answers


def attach_answers(questions, answers, path, questions_path="the question file", task=None):
    """questions + {answer_key: text} -> rows with 'text'. DataError naming the answer file and the
    first question it does not answer. Answers whose question_id no question has are not scored: a
    warning says how many; when none match, the two files do not belong together (DataError)."""
    known = {answer_key(q, task) for q in questions}
    extra = [k for k in answers if k not in known]
    if len(extra) == len(answers):
        raise DataError(f"{path}: none of its {len(answers)} answers is to a question of {questions_path} (first "
                        f"question_id {extra[0]!r}): answers to another question file?", "unmatched answers")
    if extra:
        warnings.warn(f"{path}: {len(extra)} of {len(answers)} answers have a question_id that no question of "
                      f"{questions_path} has (first: {extra[0]!r}); they are not scored", stacklevel=2)
    rows = []
    for q in questions:
        key = answer_key(q, task)
        if key not in answers:
            raise DataError(f"{path}: no answer for question_id {q['question_id']!r}"
                            + (f" round {q['round_id']}" if q.get("round_id") is not None else ""), "missing answer")
        rows.append(dict(q, text=answers[key]))
    return rows


# --- POPE

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


# --- multiple choice

LLAVA_SQA_LETTERS = "ABCDE"  # eval_science_qa.py's --options default


def llava_sqa_letter(text):
    """The letter LLaVA's eval_science_qa.py reads, by its three rules in its order, or None (its
    'FAILED'): the answer is exactly one of A-E; or it starts 'X. ' with X in A-E; or
    'The answer is ([A-Z]).' occurs exactly once (case-sensitive; the '.' is any character). The
    answer is stripped first, as LLaVA's model_vqa_science.py writes it. A letter past the question's
    options counts as wrong there (get_pred_idx gives -1)."""
    t = text.strip()
    if len(t) == 1 and t in LLAVA_SQA_LETTERS:
        return t
    if len(t) >= 3 and t[0] in LLAVA_SQA_LETTERS and t[1:3] == ". ":
        return t[0]
    found = re.findall(r"The answer is ([A-Z]).", t)
    return found[0] if len(found) == 1 else None


def extract_letter(text, n_options, options=None):
    """
    The option letter an answer picks, or None. First LLaVA's own rules (llava_sqa_letter): where
    they read a letter, that letter is the answer (None if it is not one of the n_options), so every
    answer LLaVA's ScienceQA scorer reads is read the same here ('A. The answer is B.' is A). Where
    they read nothing, our further forms (after VLMEvalKit's can_infer, which takes a single option
    letter standing alone), tried in this order:
      1. the whole answer is one letter, any case, maybe bracketed or punctuated: 'b', '(B)', 'B.'
      2. an answer phrase: 'The answer is D' (at the end), 'Answer: B', 'the correct option is (C)',
         'choice C'; the letter must be a capital, or a small letter that ends the answer ('the answer is b.')
      3. a leading capital with a delimiter: 'B) foo', '(B) foo', 'B: foo', 'B.foo'
      4. exactly one distinct capital in brackets anywhere: 'I pick (C) because ...'
      5. exactly one distinct capital standing alone as a word, where 'A' and 'I' followed by a
         lowercase word (other than or/and/is/was) are read as the article and the pronoun:
         'A red circle.' picks nothing, 'I think B' picks B, 'A or B' is ambiguous: None
      6. options given: the answer is exactly one option's text after VQA normalisation
    Only letters of the first n_options count. So the article 'a' never becomes option A, except as a
    whole one-letter answer, where it can only be the letter.
    """
    llava = llava_sqa_letter(text)
    if llava is not None:
        return llava if llava in LETTERS[:n_options] else None
    valid = LETTERS[:n_options]
    t = text.replace("*", "").strip()  # markdown emphasis: '**B**'
    if not t or not valid:
        return None
    m = re.fullmatch(r"[(\[]?([A-Za-z])[)\]]?[.:)]?", t)
    if m:
        return m.group(1).upper() if m.group(1).upper() in valid else None
    m = re.search(rf"\b(?i:answer|option|choice)(?:\s+(?i:is|would\s+be|should\s+be))?\s*:?\s*[(\[]?"
                  rf"(?:([{valid}])(?![A-Za-z])|([{valid.lower()}])[)\]]?[.!]?\s*$)", t)
    if m:
        return (m.group(1) or m.group(2)).upper()
    m = re.match(rf"[(\[]?([{valid}])[)\].:](?:\s|$)", t)
    if m:
        return m.group(1)
    found = set(re.findall(rf"[(\[]([{valid}])[)\]]", t))
    if len(found) == 1:
        return found.pop()
    found = {m.group(1) for m in re.finditer(rf"(?<![A-Za-z'])([{valid}])(?![A-Za-z'])", t)
             if not (m.group(1) in "AI" and re.match(r"\s+(?!(?:or|and|is|was)\b)[a-z]", t[m.end():]))}
    if len(found) == 1:
        return found.pop()
    if options:
        hits = [i for i, o in enumerate(options[:n_options]) if normalize_vqa(o) == normalize_vqa(t)]
        if len(hits) == 1:
            return LETTERS[hits[0]]
    return None


# --- VQA: EvalAI's answer processor (mmf; LLaVA copies it into llava/eval/m4c_evaluator.py and uses it
# for VQAv2 submissions and TextVQA), i.e. the VQA challenge's normalisation

_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've""".split())
_NUMBERS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5", six="6", seven="7",
                eight="8", nine="9", ten="10")
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: '(?!<=' is no lookbehind, so any '.' not before a digit goes
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def normalize_vqa(text):
    """VQA answer normalisation: lower case; ',' '?' dropped; punctuation removed (next to a space)
    or turned into a space; '.' removed unless before a digit; number words 'none'..'ten' -> digits;
    articles a/an/the dropped; 'dont' -> "don't" style contractions. 'Two.' -> '2',
    'The red circle.' -> 'red circle'."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(pred, answers):
    """
    The VQA score of one answer. With 10 human answers (VQAv2, TextVQA, VizWiz), the official rule:
    the mean over the 10 leave-one-out sets of 9 of min(1, #matches / 3). It is the min(#matches / 3, 1)
    of the papers averaged, and differs from it only for 1-3 matches: 0.3, 0.6, 0.9 instead of 1/3,
    2/3, 1. With any other number of gold answers (one string, a few aliases) there is no human
    agreement to weigh: 1.0 if the answer matches one of them, else 0.0 (ST-VQA's accuracy in
    LLaVA's m4c_evaluator.py). Both sides are always normalised (normalize_vqa, EvalAI's processor).
    The official vqaEval.py at its current commit (GT-Vision-Lab/VQA a013f00, "Fixed processing
    answers bug") normalises the gold answers AND the prediction only when the ten gold answers
    disagree; when all ten agree it compares the prediction as written (stripped), so there 'Two.'
    scores 0 against ten '2'. We follow LLaVA's pipeline instead, which normalises every prediction
    before scoring (convert_vqav2_for_submission.py for VQAv2, m4c_evaluator.py for TextVQA): on
    answers already normalised the two agree exactly.
    """
    if isinstance(answers, str):
        answers = [answers]
    p, gold = normalize_vqa(pred), [normalize_vqa(a) for a in answers]
    if len(gold) == 10:
        return sum(min(1.0, sum(g == p for j, g in enumerate(gold) if j != i) / 3) for i in range(10)) / 10
    return float(p in gold)


# --- CoT (LLaVA-Reasoner): the short answer follows the last '### Answer:'

def cot_answer(text):
    """The text after the LAST '### Answer:', stripped; None when the marker is missing."""
    i = text.rfind(COT_MARKER)
    return None if i < 0 else text[i + len(COT_MARKER):].strip()


# --- checking a sampled answer against the gold one (selfreward.py mode=answer, LLaVA-Reasoner's mining)

_NUMBER = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+))\s*(%|[a-z]+)?")


def read_number(text):
    """A short answer that is a number, with at most one unit word after it, as (value, unit or ''):
    '12', '1,024', '-3.5', '40%', '12 cm', 'two' (a number word VQA normalisation reads); else None."""
    t = str(text).strip().lower().replace(",", "").rstrip(".")
    m = _NUMBER.fullmatch(t) or _NUMBER.fullmatch(normalize_vqa(text))
    return None if m is None else (float(m.group(1)), m.group(2) or "")


def answer_correct(pred, q, tolerance=0.05):
    """Whether the short answer pred is right for q (a question as benchmark_question gives it):
      options   the option letter extract_letter reads equals the gold letter
      numbers   relaxed accuracy (ChartQA's, which LLaVA-Reasoner's mining uses for numbers): within
                `tolerance` of a gold number, relative (a gold 0 only matches 0); units must agree when
                both answers give one ('12 cm' matches '12', not '12 m')
      otherwise normalize_vqa(pred) equals a normalised gold answer (exact match, not VQA's 3-of-10)."""
    if "options" in q:
        return extract_letter(pred, len(q["options"]), q["options"]) == q["answer"]
    p, norm = read_number(pred), normalize_vqa(pred)
    for gold in q["answers"]:
        g = read_number(gold)
        if p is not None and g is not None:
            if (not p[1] or not g[1] or p[1] == g[1]) and abs(p[0] - g[0]) <= tolerance * abs(g[0]):
                return True
        elif norm == normalize_vqa(gold):
            return True
    return False


# --- CHAIR (Rohrbach et al. 2018; LisaAnne/Hallucination utils/chair.py and data/synonyms.txt)

_IRREGULAR = dict(people="person", children="child", mice="mouse", geese="goose", feet="foot", teeth="tooth",
                  oxen="ox", dice="die", lice="louse", cacti="cactus", fungi="fungus")

# The original chair.py's rules for COCO, applied when the synonym list has COCO's objects (see
# coco_rules): a qualifier and an animal or a vehicle is that animal or vehicle only ('baby bird' is a
# bird, not a person and a bird; 'passenger train' is a train), 'toilet seat' is a toilet, and 'seat'
# is no chair in a caption that mentions a toilet ("the seat of the toilet").
_COCO_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
COCO_PHRASES = {**{(q, a): a for q in ("baby", "adult") for a in _COCO_ANIMALS},
                ("passenger", "jet"): "jet", ("passenger", "train"): "train", ("toilet", "seat"): "toilet"}


def coco_rules(synonyms):
    """Whether a synonym table is COCO's (it names the objects the COCO rules are about)."""
    return {"person", "chair", "toilet", "train", "dog"} <= set(synonyms.values())


def chair_words(text):
    """Lower-case word tokens: letters and digits ('teddy-bear' -> teddy, bear)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def parse_synonyms(lines, src="synonyms"):
    """
    CHAIR's synonyms.txt: one object a line, comma-separated names, the first the canonical one
    ('dog, puppy, hot dog' is not allowed: one name under two objects is an error, naming the lines),
    multi-word names allowed ('traffic light, stop light'). lines: the lines or the whole text.
    -> {tuple of words: canonical name}.
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    table, line_of = {}, {}
    for lineno, line in enumerate(lines, 1):
        names = [" ".join(chair_words(n)) for n in line.split(",")]
        names = [n for n in names if n]
        for name in names:
            key = tuple(name.split())
            if key in table and table[key] != names[0]:
                raise ValueError(f"{src}: line {lineno}: {name!r} is already a name of {table[key]!r} "
                                 f"(line {line_of[key]})")
            table[key], line_of[key] = names[0], line_of.get(key, lineno)
    if not table:
        raise ValueError(f"{src}: no objects")
    return table


def read_synonyms(path):
    """A CHAIR synonym file, or 'coco': the original CHAIR's list of COCO's 80 objects (COCO_SYNONYMS)."""
    if path == "coco":
        return parse_synonyms(COCO_SYNONYMS, "COCO_SYNONYMS")
    if not os.path.isfile(path):
        raise DataError(f"{path}: synonym file not found (CHAIR needs one: 'canonical, synonym, ...' lines)",
                        "missing file")
    try:
        return parse_synonyms(read_text(path), path)
    except DataError:
        raise
    except ValueError as e:
        raise DataError(str(e), "malformed record") from None


def _singulars(word):
    """The word, then its possible singulars, most specific first: irregular plurals (people, mice,
    ...), -men -> -man (men, women, policemen), -ves -> -f / -fe (calves, knives), -ies -> -y, -es,
    -s. The original CHAIR uses pattern.en's singularize; these rules cover the plurals of COCO's
    object names and their synonyms."""
    out = [word]
    if word in _IRREGULAR:
        out.append(_IRREGULAR[word])
    if word.endswith("men"):
        out.append(word[:-3] + "man")
    if word.endswith("ves") and len(word) > 4:
        out += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("es"):
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    return out


def chair_objects(caption, synonyms, coco=None):
    """
    The canonical objects a caption mentions, one entry per mention, in order. Scanning left to
    right, the longest name wins ('hot dog' is not a 'dog', 'teddy bears' is one 'teddy bear'); a
    name's words may be plural ('boxes', 'teddy bears'). Like the original, a mention is a
    mention whatever the sentence says about it: 'there is no dog' mentions a dog. coco: apply the
    original's COCO rules (COCO_PHRASES, 'seat' beside 'toilet'); None = when coco_rules(synonyms).
    """
    coco = coco_rules(synonyms) if coco is None else coco
    words = chair_words(caption)
    longest = max(len(k) for k in synonyms)
    found, i = [], 0  # (canonical name, the name it was read as)
    while i < len(words):
        if coco and i + 1 < len(words):
            as_word = next((COCO_PHRASES[a, b] for a in _singulars(words[i]) for b in _singulars(words[i + 1])
                            if (a, b) in COCO_PHRASES), None)
            if as_word is not None:  # both words are read as this one; it may be no object ('baby animal')
                if (as_word,) in synonyms:
                    found.append((synonyms[as_word,], (as_word,)))
                i += 2
                continue
        for n in range(min(longest, len(words) - i), 0, -1):
            key = next((k for k in itertools.product(*map(_singulars, words[i:i + n])) if k in synonyms), None)
            if key is not None:
                found.append((synonyms[key], key))
                i += n
                break
        else:
            i += 1
    if coco and any("toilet" in _singulars(w) for w in words):
        found = [(o, key) for o, key in found if key != ("seat",)]
    return [o for o, _ in found]


def canonical_objects(objects, synonyms):
    """True-object names -> canonical names (a synonym or plural becomes its object; unknown names
    are kept, lower-cased)."""
    out = set()
    for o in objects:
        hit = chair_objects(o, synonyms)
        out.add(hit[0] if len(hit) == 1 else " ".join(chair_words(o)))
    return out


def chair_metrics(captions, true_objects_list, synonyms):
    """
    CHAIR over captions with their images' true objects (as the original compute_chair):
      chair_s  share of captions mentioning at least one object not in the image
      chair_i  hallucinated mentions / all object mentions (every mention counts, repeats too)
      recall   true objects mentioned / true objects (each object once per image)
      avg_len  words per caption (split on whitespace)
    Where the original divides by zero (no mentions, no true objects), the figure is 0.0.
    """
    if len(captions) != len(true_objects_list) or not captions:
        raise ValueError(f"chair_metrics: {len(captions)} captions for {len(true_objects_list)} object lists")
    hallucinating = mentions = hallucinated = recalled = n_true = words = 0
    for caption, objects in zip(captions, true_objects_list):
        truth = canonical_objects(objects, synonyms)
        said = chair_objects(caption, synonyms)
        bad = [o for o in said if o not in truth]
        hallucinating += bool(bad)
        mentions += len(said)
        hallucinated += len(bad)
        recalled += len(truth & set(said))
        n_true += len(truth)
        words += len(caption.split())
    n = len(captions)
    return dict(chair_s=hallucinating / n, chair_i=hallucinated / mentions if mentions else 0.0,
                recall=recalled / n_true if n_true else 0.0, avg_len=words / n, n=n)


# --- MME (Fu et al. 2023): yes/no pairs per image; LLaVA's convert_answer_to_mme.py + MME's eval_tool/calculation.py

def _mme_question(text):
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
                gold[subtask, name[:-4], _mme_question(parts[0])] = parts[1].strip().lower()
    return gold


def mme_labels(questions, path, mme_root):
    """MME questions with their label (from the record or MME's folder, mme_gold), checked as MME's
    calculation.py needs them: every image of a subtask has exactly two questions."""
    if any(q["label"] is None for q in questions):
        gold = mme_gold(mme_root)
        for q in questions:
            if q["label"] is None:
                key = (*q["mme_image"], _mme_question(q["prompt"]))
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


# --- MMBench (Liu et al. 2023): a TSV of 4-option questions, circular evaluation, rule-based matching

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


# --- one task's questions + answers -> per-question verdicts and metrics

def judge(task, row, synonyms=None):
    """What the task's rule makes of one answer (row: a benchmark_question with 'text'), for
    predictions.jsonl: pope {pred}; mc {pred (letter or None), score}; vqa {pred (normalised),
    score}; cot {pred, score, missing_marker}; chair {mentioned, hallucinated}; mme {pred (yes, no or
    other), score}; mmbench {pred (letter or None), score} (one round)."""
    text = row["text"]
    if task == "pope":
        return dict(pred=pope_answer(text))
    if task == "mc":
        letter = extract_letter(text, len(row["options"]), row["options"])
        return dict(pred=letter, score=float(letter == row["answer"]))
    if task == "vqa":
        return dict(pred=normalize_vqa(text), score=vqa_accuracy(text, row["answers"]))
    if task == "cot":
        short = cot_answer(text)
        if short is None:  # no marker, no answer: wrong, and counted in missing_marker
            return dict(pred=None, score=0.0, missing_marker=True)
        return dict(judge("mc" if "options" in row else "vqa", dict(row, text=short)), missing_marker=False)
    if task == "chair":
        truth = canonical_objects(row["objects"], synonyms)
        said = chair_objects(text, synonyms)
        return dict(mentioned=said, hallucinated=[o for o in said if o not in truth])
    if task == "mme":
        pred = mme_answer(text)
        return dict(pred=pred, score=float(pred == row["label"]))
    if task == "mmbench":
        letter = mmbench_letter(text, row["options"])
        return dict(pred=letter, score=float(letter == row["answer"]))
    raise ValueError(f"unknown benchmark {task!r}, expected one of {BENCHMARKS}")


def score(task, rows, synonyms=None):
    """
    rows (benchmark questions with their answers in 'text') -> {split: metrics}, one split per
    category ('all' when there is none). POPE: score_pope, with 'average'. Others, with 'overall'
    (every question pooled) when there is more than one split:
      mc     accuracy, no_letter (share of answers with no option letter), n
      vqa    accuracy (mean VQA score), n
      cot    accuracy, missing_marker (share without '### Answer:'), n; with a gold 'rationale' per
             question also chain_exact (the answer is the gold chain, verbatim) and
             right_answer_wrong_chain (a right short answer after any other chain)
      chair  chair_s, chair_i, recall, avg_len, n
      mme    score_mme: per subtask accuracy, acc_plus, score; the perception and cognition totals
      mmbench score_mmbench: circular accuracy per category, per l2-category and overall
    """
    if task == "pope":
        return score_pope(rows)
    if task == "mme":
        return score_mme(rows)
    if task == "mmbench":
        return score_mmbench(rows)
    if task == "chair" and synonyms is None:
        raise ValueError("CHAIR needs a synonym list")

    def metrics(group):
        if task == "chair":
            return chair_metrics([r["text"] for r in group], [r["objects"] for r in group], synonyms)
        verdicts = [judge(task, r) for r in group]
        m = dict(accuracy=sum(v["score"] for v in verdicts) / len(group))
        if task == "mc":
            m["no_letter"] = sum(v["pred"] is None for v in verdicts) / len(group)
        if task == "cot":
            m["missing_marker"] = sum(v["missing_marker"] for v in verdicts) / len(group)
            if all("rationale" in r for r in group):  # the truth is known: was the reasoning itself right?
                exact = [r["text"].strip() == r["rationale"].strip() for r in group]
                m["chain_exact"] = sum(exact) / len(group)
                m["right_answer_wrong_chain"] = sum(v["score"] > 0 and not e for v, e in zip(verdicts, exact)) / len(group)
        return dict(m, n=len(group))

    if not rows:
        raise ValueError(f"{task}: no answers to score")
    out = {c: metrics(g) for c, g in by_category(rows).items()}
    if len(out) > 1:
        out["overall"] = metrics(rows)
    return out


# --- questions with a gold answer, for answer sampling (selfreward.py mode=answer)

GOLD_KEYS = ("options", "answer", "answers")  # what question_from_record keeps of the gold


def question_from_record(rec):
    """A question with its gold short answer, for CoT answer sampling -> dict(id, image, prompt (with
    COT_SUFFIX, <image> removed) and the gold: options + answer (a letter) or answers [..]). Either
      - a question record: question (or text), answer (or answers), options (optional), image, as
        benchmark_question reads a 'cot' question, or
      - a LLaVA conversation: the first human turn is the question, the first gpt turn the gold (the
        text after its last '### Answer:' when it has one); options are read from the question
        ('A. ...' lines or 'Options: (A) ...'), the gold then read as a letter.
    A direct-answer suffix on the question is replaced by the CoT one. The gold chain, when the record
    has one ('rationale', or a gpt turn with '### Answer:'), comes along as 'rationale': never used to
    check an answer, only to count how often a right answer came after another chain. Raises DataError."""
    if not isinstance(rec, dict):
        raise DataError(f"record is a {type(rec).__name__}, not an object", "malformed record")
    images = record_images(rec)
    if len(images) != 1:
        raise DataError(f"answer sampling needs exactly one image per question, got {len(images)}", "image count mismatch")
    if "conversations" in rec and "question" not in rec and "text" not in rec:
        check_conversations(rec["conversations"])
        turns = rec["conversations"]
        human = next((t["value"] for t in turns if ROLES[t["from"]] == "user"), None)
        gpt = next((t["value"] for t in turns if ROLES[t["from"]] == "assistant"), None)
        if human is None or gpt is None:
            raise DataError("needs a human turn (the question) and a gpt turn (the gold answer)", "malformed record")
        text = human.replace(IMAGE_PLACEHOLDER, "").strip()
        gold = cot_answer(gpt) if COT_MARKER in gpt else gpt.strip()
        if not gold:
            raise DataError(f"no gold answer in the gpt turn {gpt!r:.60}", "no gold answer")
        q = dict(id=rec.get("id"), image=images[0], **(dict(rationale=gpt) if COT_MARKER in gpt else {}))
        opts = parse_options(text)
        if opts:
            letter = extract_letter(gold, len(opts), opts)
            if letter is None:
                raise DataError(f"the gold answer {gold!r:.40} names none of the options", "no gold answer")
            q.update(options=opts, answer=letter)
        else:
            q["answers"] = [gold]
    else:
        if "answer" not in rec and "answers" not in rec:
            raise DataError("no gold answer: needs 'answer' (or 'answers')", "no gold answer")
        b = benchmark_question(dict(rec, question_id=rec.get("question_id", rec.get("id", 0))), "cot")
        text = b["prompt"]
        q = dict(id=rec.get("question_id", rec.get("id")), image=images[0],
                 **{k: b[k] for k in GOLD_KEYS + ("rationale",) if k in b})
    text = strip_modes(text)  # a direct-answer suffix makes way for the CoT one
    if not text:
        raise DataError("empty question", "no prompt")
    return dict(q, prompt=with_suffix(text, COT_SUFFIX))


# CHAIR's synonyms for COCO's 80 objects, as the original ships them (LisaAnne/Hallucination,
# data/synonyms.txt; its odd entries too: 'knive', 'phon', 'televison' are what its singularizer
# makes of words): read_synonyms('coco'), evaluate.py --synonyms_path=coco
COCO_SYNONYMS = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter,  motor bike, motor cycle, motorbike, scooter, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, lamb, goat, ewe
cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison 
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake,  cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, toilet, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""
