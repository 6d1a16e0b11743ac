"""
Any benchmark's questions and answers: question files -> prompts, answer files -> rows, and one task's
rows -> per-question verdicts and metrics, each by the benchmark's own rule (in its file):

  pope     tasks/pope.py     LLaVA's eval_pope.py (yes/no, the first sentence), random / popular / adversarial
  mc       tasks/mc.py       ScienceQA (LLaVA's eval_science_qa.py) and plain multiple choice: the option letter
  vqa      tasks/vqa.py      the VQA challenge's normalisation and 3-of-10 accuracy (EvalAI / m4c_evaluator.py)
  cot      tasks/cot.py      LLaVA-Reasoner: the short answer after the last '### Answer:', then the mc or vqa rule
  chair    tasks/chair.py    CHAIR (Rohrbach et al. 2018, the original chair.py): mentioned vs true objects
  mme      tasks/mme.py      MME's yes/no pairs: accuracy and acc+ per subtask, perception / cognition totals
  mmbench  tasks/mmbench.py  MMBench's circular multiple choice, VLMEvalKit's answer matching
How a question is put (mode suffixes, option letters) is tasks/prompts.py's.

Everything here is a pure function of the files and the answer text, so `evaluate.py --predictions=`
scores an answer file from any model, and the tests check every rule on hand-made cases. Also the
gold-answer questions answer sampling mines from (question_from_record, selfreward.py mode=answer).
Reading files and records (DataError, read_json_file, ...) is data.py's.
"""
import json
import os
import warnings

from data import (IMAGE_PLACEHOLDER, ROLES, DataError, check_conversations, check_image_file, load_image,
                  load_image_b64, read_json_file, read_text, record_images, resolve_image)
from tasks.chair import CHAIR_PROMPT, canonical_objects, chair_metrics, chair_objects
from tasks.cot import cot_answer
from tasks.mc import extract_letter
from tasks.mmbench import mmbench_letter, read_mmbench, score_mmbench
from tasks.mme import mme_question, mme_answer, mme_labels, score_mme
from tasks.pope import by_category, pope_answer, pope_labels, score_pope
from tasks.prompts import (COT_MARKER, COT_SUFFIX, LETTERS, MC_SUFFIX, SHORT_SUFFIX, gold_letter, option_lines,
                           parse_options, strip_modes, with_suffix)
from tasks.vqa import normalize_vqa, vqa_accuracy

BENCHMARKS = ("pope", "mc", "vqa", "cot", "chair", "mme", "mmbench")


def answer_key(rec, task=None):
    """What pairs an answer with its question: str(question_id) (1 and "1" are one question: files
    disagree on the type), with the round for MMBench's circular rounds ('7#2'), and for MME the
    question too: LLaVA's MME question_id is the image, asked twice (its converter matches answers
    to questions by the answer file's 'prompt')."""
    key = str(rec["question_id"])
    if task == "mme":
        return key + "#" + mme_question(rec.get("prompt") or "")
    return key if rec.get("round_id") is None else f"{key}#{rec['round_id']}"


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

