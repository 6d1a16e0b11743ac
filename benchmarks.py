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
import json
import os
import re
import warnings

from data import (IMAGE_PLACEHOLDER, ROLES, DataError, check_conversations, read_json_file, read_text,
                  record_images)

BENCHMARKS = ("pope", "mc", "vqa", "cot", "chair")
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


def read_benchmark(path, task, pope_annotation_dir=None):
    """All questions of a benchmark file (.jsonl, or a .json list such as ScienceQA's), checked up
    front: a bad record or a repeated question_id is a DataError naming the file and record. POPE
    questions without labels take them from pope_annotation_dir (see pope_labels; None = the 'coco'
    folder beside the question file, where LLaVA's eval layout keeps them)."""
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
        key = str(q["question_id"])
        if key in seen:
            raise DataError(f"{path}: record {i}: question_id {q['question_id']!r} repeats record {seen[key]}",
                            "malformed record")
        seen[key] = i
        questions.append(q)
    if not questions:
        raise DataError(f"{path}: no questions", "malformed record")
    return questions


def read_answers(path):
    """A LLaVA answer file (one JSON a line: question_id, text, ...) -> {str(question_id): text}."""
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
        key = str(a["question_id"])  # 1 and "1" are the same question: files disagree on the type
        if key in answers:
            raise DataError(f"{path}: line {lineno}: a second answer to question_id {a['question_id']!r}",
                            "malformed record")
        answers[key] = a["text"]
    if not answers:
        raise DataError(f"{path}: no answers (the file is empty)", "empty file")
    return answers


def attach_answers(questions, answers, path, questions_path="the question file"):
    """questions + {str(question_id): text} -> rows with 'text'. DataError naming the answer file and the
    first question it does not answer. Answers whose question_id no question has are not scored: a
    warning says how many; when none match, the two files do not belong together (DataError)."""
    known = {str(q["question_id"]) for q in questions}
    extra = [k for k in answers if k not in known]
    if len(extra) == len(answers):
        raise DataError(f"{path}: none of its {len(answers)} answers is to a question of {questions_path} (first "
                        f"question_id {extra[0]!r}): answers to another question file?", "unmatched answers")
    if extra:
        warnings.warn(f"{path}: {len(extra)} of {len(answers)} answers have a question_id that no question of "
                      f"{questions_path} has (first: {extra[0]!r}); they are not scored", stacklevel=2)
    rows = []
    for q in questions:
        key = str(q["question_id"])
        if key not in answers:
            raise DataError(f"{path}: no answer for question_id {q['question_id']!r}", "missing answer")
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

def extract_letter(text, n_options, options=None):
    """
    The option letter an answer picks, or None. Our rule (after LLaVA's eval_science_qa.py, which
    takes a bare letter, 'X. ...' at the start or 'The answer is X', and VLMEvalKit's can_infer, which
    takes a single option letter standing alone), tried in this order:
      1. the whole answer is one letter, any case, maybe bracketed or punctuated: 'B', 'b', '(B)', 'B.'
      2. an answer phrase: 'The answer is D.', 'Answer: B', 'the correct option is (C)', 'choice C';
         the letter must be a capital, or a small letter that ends the answer ('the answer is b.')
      3. a leading capital with a delimiter: 'B. foo', 'B) foo', '(B) foo', 'B: foo'
      4. exactly one distinct capital in brackets anywhere: 'I pick (C) because ...'
      5. exactly one distinct capital standing alone as a word, where 'A' and 'I' followed by a
         lowercase word (other than or/and/is/was) are read as the article and the pronoun:
         'A red circle.' picks nothing, 'I think B' picks B, 'A or B' is ambiguous: None
      6. options given: the answer is exactly one option's text after VQA normalisation
    Only letters of the first n_options count. So the article 'a' never becomes option A, except as a
    whole one-letter answer, where it can only be the letter.
    """
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
    LLaVA's m4c_evaluator.py). Both sides are normalised (normalize_vqa); the official script
    normalises the gold answers only when they disagree, which changes nothing for VQAv2's
    already-normalised answers.
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

_IRREGULAR = dict(men="man", women="woman", people="person", children="child", mice="mouse", geese="goose",
                  feet="foot", teeth="tooth", oxen="ox", knives="knife", leaves="leaf", wolves="wolf",
                  shelves="shelf", halves="half", loaves="loaf", scarves="scarf")


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
    """The word, then its possible singulars, most specific first (simple English plurals; the
    original CHAIR uses pattern.en's singularize)."""
    out = [word]
    if word in _IRREGULAR:
        out.append(_IRREGULAR[word])
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("es"):
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    return out


def chair_objects(caption, synonyms):
    """
    The canonical objects a caption mentions, one entry per mention, in order. Scanning left to
    right, the longest name wins ('hot dog' is not a 'dog', 'teddy bears' is one 'teddy bear'); a
    name's last word may be plural ('boxes', 'teddy bears'). Like the original, a mention is a
    mention whatever the sentence says about it: 'there is no dog' mentions a dog.
    """
    words = chair_words(caption)
    longest = max(len(k) for k in synonyms)
    found, i = [], 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            head = tuple(words[i:i + n - 1])
            hit = next((synonyms[head + (s,)] for s in _singulars(words[i + n - 1]) if head + (s,) in synonyms), None)
            if hit is not None:
                found.append(hit)
                i += n
                break
        else:
            i += 1
    return found


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


# --- one task's questions + answers -> per-question verdicts and metrics

def judge(task, row, synonyms=None):
    """What the task's rule makes of one answer (row: a benchmark_question with 'text'), for
    predictions.jsonl: pope {pred}; mc {pred (letter or None), score}; vqa {pred (normalised),
    score}; cot {pred, score, missing_marker}; chair {mentioned, hallucinated}."""
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
    """
    if task == "pope":
        return score_pope(rows)
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
