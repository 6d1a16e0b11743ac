"""tasks/: benchmark files -> prompts, and the scoring rules, on hand-made answers whose
metrics were worked out by hand (the arithmetic is in the comments)."""
import base64
import csv
import io
import json

import pytest

from tasks import benchmark as B
import tasks.chair
import tasks.cot
import tasks.mc
import tasks.mmbench
import tasks.mme
import tasks.pope
import tasks.prompts
import tasks.vqa
import data as D

# ----------------------------------------------------------------------------- POPE


@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is not a dog.", "no"),
    ("no", "no"),
    ("Not sure, not really.", "no"),            # 'not' after the comma is dropped
    ("There is no dog. Yes", "no"),              # only the first sentence counts
    ("Yes. There is no dog.", "yes"),            # ... both ways
    ("I don't see a dog.", "yes"),               # LLaVA's rule: "don't" is not 'not', so this is a yes
    ("NO", "yes"),                               # case-sensitive: 'NO' is none of No/no/not
    ("", "yes"),                                 # an empty answer is a yes, as in eval_pope.py
    ("No.", "no"),
    ("nope", "yes"),
])
def test_pope_answer_is_llavas_rule(text, expected):
    assert tasks.pope.pope_answer(text) == expected


def pope_rows():
    return [
        # random: TP, TN, FP, TP  -> TP 2, FP 1, TN 1, FN 0
        dict(text="Yes, there is a dog in the image.", label="yes", category="random"),
        dict(text="No, there is not a dog.", label="no", category="random"),
        dict(text="I don't see a dog.", label="no", category="random"),
        dict(text="", label="yes", category="random"),
        # popular: TN, TP, FP, FN -> 1 each
        dict(text="There is no dog. Yes", label="no", category="popular"),
        dict(text="Yes.", label="yes", category="popular"),
        dict(text="NO", label="no", category="popular"),
        dict(text="no", label="yes", category="popular"),
    ]


def test_score_pope_by_hand():
    m = tasks.pope.score_pope(pope_rows())
    assert list(m) == ["random", "popular", "average"]
    # random: acc (2+1)/4 = .75; precision 2/(2+1); recall 2/(2+0) = 1; f1 2*(2/3)*1/(2/3+1) = .8; yes 3/4
    r = m["random"]
    assert r["n"] == 4 and r["accuracy"] == 0.75 and r["recall"] == 1.0 and r["yes_ratio"] == 0.75
    assert r["precision"] == pytest.approx(2 / 3) and r["f1"] == pytest.approx(0.8)
    # popular: TP=FP=TN=FN=1: every figure .5
    assert m["popular"] == dict(accuracy=0.5, precision=0.5, recall=0.5, f1=0.5, yes_ratio=0.5, n=4)
    # average of the two splits: acc (.75+.5)/2, precision (2/3+.5)/2 = 7/12, recall .75, f1 .65, yes .625
    a = m["average"]
    assert a["n"] == 8 and a["accuracy"] == pytest.approx(0.625) and a["precision"] == pytest.approx(7 / 12)
    assert a["recall"] == pytest.approx(0.75) and a["f1"] == pytest.approx(0.65) and a["yes_ratio"] == pytest.approx(0.625)


def test_score_pope_one_split_and_no_category():
    rows = [dict(r, category=None) for r in pope_rows()[:4]]
    m = tasks.pope.score_pope(rows)
    assert list(m) == ["all"]  # no category -> 'all'; one split -> no average
    order = tasks.pope.score_pope([dict(r, category=c) for r, c in zip(pope_rows()[:3], ["adversarial", "popular", "random"])])
    assert list(order) == ["random", "popular", "adversarial", "average"]


def test_pope_metrics_where_llava_divides_by_zero():
    m = tasks.pope.pope_metrics(["no", "no"], ["no", "yes"])  # no 'yes' answers: precision 0/0
    assert m == dict(accuracy=0.5, precision=0.0, recall=0.0, f1=0.0, yes_ratio=0.0, n=2)
    with pytest.raises(ValueError, match="yes' or 'no"):
        tasks.pope.pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError):
        tasks.pope.pope_metrics(["yes"], [])

# ----------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("b", "B"), ("B.", "B"), ("(C)", "C"), ("[D]", "D"), ("**B**", "B"),
    ("B) a blue square", "B"), ("(B) a blue square", "B"), ("C. the ring", "C"), ("D: cross", "D"),
    ("The answer is D.", "D"), ("Answer: B", "B"), ("answer: b", "B"), ("The answer is: A", "A"),
    ("The correct option is (C).", "C"), ("I think (C) is right.", "C"), ("I think B", "B"), ("It's A.", "A"),
    ("a", "A"),                                   # a whole one-letter answer can only be the letter
    ("There is a dog.", None),                    # the article 'a' is not option A ...
    ("The answer is a dog.", None),               # ... not even after 'the answer is'
    ("A red circle is in the image.", None),      # ... nor the capital article
    ("A or B", None), ("A and B are wrong, C", None),  # ambiguous
    ("E", None), ("The answer is E.", None),      # not one of 4 options
    ("", None), ("   ", None), ("I don't know.", None),
    ("red circle", "B"), ("The red circle.", "B"),  # the text of exactly one option
])
def test_extract_letter(text, expected):
    assert tasks.mc.extract_letter(text, 4, ["blue square", "red circle", "green ring", "cross"]) == expected


def test_extract_letter_without_options_and_more_letters():
    assert tasks.mc.extract_letter("red circle", 4) is None
    assert tasks.mc.extract_letter("The answer is E.", 5) == "E"


def test_score_mc_by_category():
    opts = ["red", "green", "blue", "white"]
    rows = [dict(text="B", answer="B", options=opts, category="color"),            # right
            dict(text="The answer is C.", answer="B", options=opts, category="color"),  # wrong
            dict(text="a", answer="A", options=opts, category="shape"),            # right
            dict(text="There is a circle.", answer="A", options=opts, category="shape")]  # no letter: wrong
    m = B.score("mc", rows)
    # color 1/2, shape 1/2 with 1/2 unparsed; overall 2/4 with 1/4 unparsed
    assert m == {"color": dict(accuracy=0.5, no_letter=0.0, n=2), "shape": dict(accuracy=0.5, no_letter=0.5, n=2),
                 "overall": dict(accuracy=0.5, no_letter=0.25, n=4)}

# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("2", "2"), ("the red circle.", "red circle"), ("Red circle", "red circle"),
    ("Yes.", "yes"), ("An apple", "apple"), ("dont", "don't"), ("10,000", "10000"), ("3.5", "3.5"),
    ("top-left", "top left"), ("none", "0"), ("What?", "what"), ("  blue\n", "blue"),
])
def test_normalize_vqa(text, expected):
    assert tasks.vqa.normalize_vqa(text) == expected


def test_vqa_accuracy_single_gold_is_exact_match_after_normalisation():
    assert tasks.vqa.vqa_accuracy("Two", "2") == 1.0
    assert tasks.vqa.vqa_accuracy("the red circle.", "red circle") == 1.0
    assert tasks.vqa.vqa_accuracy("red", ["red circle"]) == 0.0
    assert tasks.vqa.vqa_accuracy("blue", ["red", "blue"]) == 1.0  # a few aliases: any match


@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers_is_the_official_leave_one_out_average(m, expected):
    # m matching answers of 10: the 10 leave-one-out sets of 9 hold m-1 matches (m of them) or m
    # (10-m of them), so acc = (m*min(1,(m-1)/3) + (10-m)*min(1,m/3)) / 10:
    # m=1: 9*(1/3)/10 = .3; m=2: (2/3 + 8*2/3)/10 = .6; m=3: (3*2/3 + 7)/10 = .9; m>=4: 1
    answers = ["2"] * m + ["3"] * (10 - m)
    assert tasks.vqa.vqa_accuracy("two", answers) == pytest.approx(expected)


def test_score_vqa():
    rows = [dict(text="Two", answers=["2"] * 5 + ["two"] * 5, category="count"),  # all 10 match: 1
            dict(text="3", answers=["3"] + ["4"] * 9, category="count"),          # 1 match: .3
            dict(text="The red circle.", answers=["red circle"], category=None)]  # exact: 1
    m = B.score("vqa", rows)
    # count (1 + .3)/2 = .65; all 1; overall (1 + .3 + 1)/3
    assert m["count"]["accuracy"] == pytest.approx(0.65) and m["all"]["accuracy"] == 1.0
    assert m["overall"]["accuracy"] == pytest.approx(2.3 / 3) and m["overall"]["n"] == 3

# ----------------------------------------------------------------------------- CoT


def test_cot_answer():
    assert tasks.cot.cot_answer("red first.\n### Answer: red\nthen\n### Answer:  blue \n") == "blue"  # the LAST marker
    assert tasks.cot.cot_answer("The answer is blue.") is None
    assert tasks.cot.cot_answer("### Answer:") == ""


def test_score_cot():
    opts = ["red", "green", "blue"]
    rows = [dict(text="Two circles...\n### Answer: 3\nWait.\n### Answer: two", answers=["2"]),  # last: 'two' = 2: 1
            dict(text="The answer is 2.", answers=["2"]),                                   # no marker: 0
            dict(text="It is left of the ring.\n### Answer: (B)", options=opts, answer="B"),  # mc rule: 1
            dict(text="### Answer: A", options=opts, answer="C")]                          # 0
    m = B.score("cot", rows)
    # accuracy (1+0+1+0)/4 = .5; missing_marker 1/4
    assert m == {"all": dict(accuracy=0.5, missing_marker=0.25, n=4)}
    assert B.judge("cot", rows[1]) == dict(pred=None, score=0.0, missing_marker=True)
    assert B.judge("cot", rows[2]) == dict(pred="B", score=1.0, missing_marker=False)


def test_score_cot_against_the_gold_chain():
    """With the gold chain known (the shapes world's cot.jsonl), how often the answer is the chain
    verbatim, and how often a right short answer came after another chain."""
    gold = "The top row has a red circle. It is red.\n### Answer: 1"
    rows = [dict(text=gold + "\n", answers=["1"], rationale=gold),                             # the chain: right
            dict(text="The top row has a red ring. It is red.\n### Answer: 1", answers=["1"], rationale=gold),  # lucky
            dict(text="The top row has nothing.\n### Answer: 0", answers=["1"], rationale=gold),   # wrong
            dict(text="no marker", answers=["1"], rationale=gold)]
    m = B.score("cot", rows)["all"]
    assert (m["accuracy"], m["chain_exact"], m["right_answer_wrong_chain"]) == (0.5, 0.25, 0.25)
    assert "chain_exact" not in B.score("cot", [dict(r) for r in rows[:1]] + [dict(text="x", answers=["1"])])["all"]
    q = B.benchmark_question(dict(question_id=1, image="x.png", question="How many?", answer="1", rationale=gold), "cot")
    assert q["rationale"] == gold and "rationale" not in B.benchmark_question(dict(question_id=1, question="How many?", answers=["1"]), "vqa")

# ----------------------------------------------------------------------------- CHAIR

SYNONYMS = """dog, puppy, doggy
hot dog
teddy bear, teddybear
person, man, people, child, children
cat, kitten
car, automobile
"""


def test_parse_synonyms_and_objects():
    syn = tasks.chair.parse_synonyms(SYNONYMS.splitlines())
    assert syn[("hot", "dog")] == "hot dog" and syn[("puppy",)] == "dog" and syn[("person",)] == "person"
    # multi-word names win over their last word; plurals; irregular plurals; synonyms; every mention
    assert tasks.chair.chair_objects("Two puppies and a hot dog near teddy bears.", syn) == ["dog", "hot dog", "teddy bear"]
    assert tasks.chair.chair_objects("A man, two children and people. The dog; the DOGS.", syn) == \
        ["person", "person", "person", "dog", "dog"]
    assert tasks.chair.chair_objects("There is no dog.", syn) == ["dog"]  # like the original: a mention is a mention
    assert tasks.chair.chair_objects("A teddy-bear and a catalogue.", syn) == ["teddy bear"]  # word-level: no 'cat'
    assert tasks.chair.chair_objects("", syn) == []


def test_parse_synonyms_errors():
    with pytest.raises(ValueError, match=r"syn.txt: line 2: 'puppy' is already a name of 'dog' \(line 1\)"):
        tasks.chair.parse_synonyms("dog, puppy\ncat, puppy\n", "syn.txt")
    with pytest.raises(ValueError, match="no objects"):
        tasks.chair.parse_synonyms("\n\n")


def test_chair_metrics_by_hand():
    syn = tasks.chair.parse_synonyms(SYNONYMS)
    captions = ["A man walks two puppies.",                    # person, dog: both true. 5 words
                "A hot dog next to teddy bears and a cat.",    # hot dog (true), teddy bear, cat (false). 10 words
                "There is a kitten and another kitten.",       # cat, cat: true (car not said). 7 words
                "An empty street."]                            # nothing. 3 words
    truth = [["person", "dog"], ["hot dog"], ["cat", "car"], ["automobile"]]  # a synonym as truth is its object
    m = tasks.chair.chair_metrics(captions, truth, syn)
    # chair_s: 1 of 4 captions hallucinates; chair_i: 2 false of 2+3+2+0 = 7 mentions
    # recall: (2 + 1 + 1 + 0) of (2 + 1 + 2 + 1) = 4/6; avg_len (5+10+7+3)/4 = 6.25
    assert m["n"] == 4 and m["chair_s"] == 0.25 and m["chair_i"] == pytest.approx(2 / 7)
    assert m["recall"] == pytest.approx(4 / 6) and m["avg_len"] == 6.25
    assert B.judge("chair", dict(text=captions[1], objects=truth[1]), syn) == \
        dict(mentioned=["hot dog", "teddy bear", "cat"], hallucinated=["teddy bear", "cat"])
    assert tasks.chair.chair_metrics(["Nothing here."], [[]], syn) == dict(chair_s=0.0, chair_i=0.0, recall=0.0, avg_len=2.0, n=1)

# ----------------------------------------------------------------------------- question files -> prompts


def test_prompts_follow_llava_and_never_repeat_a_suffix():
    pope = B.benchmark_question(dict(question_id=1, image="x.png", text="Is there a dog in the image?",
                                     label="Yes", category="random"), "pope")
    assert pope["prompt"] == "Is there a dog in the image?\n" + tasks.prompts.SHORT_SUFFIX and pope["label"] == "yes"
    llava_file = dict(question_id=2, image="x.png", label="no",  # LLaVA's llava_pope_test.jsonl has it already
                      text="Is there a cat in the image?\nAnswer the question using a single word or phrase.")
    assert B.benchmark_question(llava_file, "pope")["prompt"] == llava_file["text"]
    mc = B.benchmark_question(dict(question_id=3, image="x.png", question="What color is the ring?",
                                   options=["red", "green"], answer="b"), "mc")
    assert mc["prompt"] == "What color is the ring?\nA. red\nB. green\n" + tasks.prompts.MC_SUFFIX and mc["answer"] == "B"
    vqa = B.benchmark_question(dict(question_id=4, image="x.png", text="<image>\nHow many?", answer=2), "vqa")
    assert vqa["prompt"] == "How many?\n" + tasks.prompts.SHORT_SUFFIX and vqa["answers"] == ["2"]
    vqa2 = B.benchmark_question(dict(question_id=5, image="x.png", question="What?",
                                     answers=[{"answer": "net", "answer_confidence": "yes"}] * 10), "vqa")
    assert vqa2["answers"] == ["net"] * 10 and vqa2["category"] is None
    cot = B.benchmark_question(dict(question_id=6, image="x.png", question="Which?", options=["a", "b"], answer=1), "cot")
    assert cot["prompt"] == "Which?\nA. a\nB. b\n" + tasks.prompts.COT_SUFFIX and cot["answer"] == "B"
    cot_vqa = B.benchmark_question(dict(question_id=7, image="x.png", question="How many?", answer="2"), "cot")
    assert cot_vqa["prompt"] == "How many?\n" + tasks.prompts.COT_SUFFIX and "options" not in cot_vqa
    chair = B.benchmark_question(dict(image_id=8, image="x.png", objects=["dog"]), "chair")
    assert chair["question_id"] == 8 and chair["prompt"] == tasks.chair.CHAIR_PROMPT
    short = B.benchmark_question(dict(question_id=9, image="x.png", text="Color?", answer="red", type="color"), "vqa")
    assert short["category"] == "color"  # the old test.jsonl's 'type'


def test_scienceqa_as_llava_ships_it():
    # LLaVA's convert_sqa_to_llava.py (CQM-A): 'Options: (A) x (B) y', gold 'The answer is X.'
    conv = dict(id="4", image="4/image.png", conversations=[
        {"from": "human", "value": "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) dog (C) fish\n<image>"},
        {"from": "gpt", "value": "The answer is B."}])
    q = B.benchmark_question(conv, "mc")
    assert q["options"] == ["frog", "dog", "fish"] and q["answer"] == "B" and q["category"] == "img"
    assert q["prompt"] == "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) frog (B) dog (C) fish\n" + tasks.prompts.MC_SUFFIX
    # LLaVA-1.5's file: 'A. x' lines, a bare letter, no image
    q = B.benchmark_question(dict(id="5", conversations=[
        {"from": "human", "value": "Context: Select the best answer.\nWhich is soft?\nA. rock\nB. wool"},
        {"from": "gpt", "value": "B"}]), "mc")
    assert q["options"] == ["rock", "wool"] and q["answer"] == "B" and q["category"] == "no_img" and q["image"] is None


def test_bad_records_are_named(tmp_path):
    p = tmp_path / "pope.jsonl"
    p.write_text(json.dumps(dict(question_id=1, image="a.png", text="Is there a dog?", label="yes")) + "\n"
                 + json.dumps(dict(question_id=2, image="a.png", text="Is there a cat?", label="maybe")) + "\n")
    with pytest.raises(D.DataError, match=r"pope.jsonl: record 1 \(question_id 2\): 'label' must be 'yes' or 'no'"):
        B.read_benchmark(str(p), "pope")
    p.write_text(json.dumps(dict(question_id=1, image="a.png", question="Q?", options=["x", "y"], answer="C")) + "\n")
    with pytest.raises(D.DataError, match="record 0 .*'C' is not an option letter A-B"):
        B.read_benchmark(str(p), "mc")
    p.write_text("".join(json.dumps(dict(question_id=1, image="a.png", text="Q?", label="no")) + "\n" for _ in range(2)))
    with pytest.raises(D.DataError, match="record 1: question_id 1 repeats record 0"):
        B.read_benchmark(str(p), "pope")
    p.write_text(json.dumps(dict(id="9", conversations=[{"from": "human", "value": "Which?"},
                                                         {"from": "gpt", "value": "No idea."}])) + "\n")
    with pytest.raises(D.DataError, match="no options found"):
        B.read_benchmark(str(p), "mc")


def test_answers_join_by_question_id(tmp_path):
    a = tmp_path / "answers.jsonl"
    a.write_text(json.dumps({"question_id": "1", "text": "Yes"}) + "\n\n" + json.dumps({"question_id": 2, "text": "No"}) + "\n")
    answers = B.read_answers(str(a))
    rows = B.attach_answers([dict(question_id=1), dict(question_id="2")], answers, str(a))  # 1 == "1"
    assert [r["text"] for r in rows] == ["Yes", "No"]
    with pytest.raises(D.DataError, match=r"answers.jsonl: no answer for question_id 3"):
        B.attach_answers([dict(question_id=1), dict(question_id=3)], answers, str(a))
    with pytest.warns(UserWarning, match=r"answers.jsonl: 1 of 2 answers have a question_id that no question of q.jsonl "
                                         r"has \(first: '2'\); they are not scored"):
        assert len(B.attach_answers([dict(question_id=1)], answers, str(a), "q.jsonl")) == 1
    with pytest.raises(D.DataError, match=r"none of its 2 answers is to a question of q.jsonl"):
        B.attach_answers([dict(question_id=3)], answers, str(a), "q.jsonl")
    a.write_text(json.dumps({"question_id": 1, "text": "Yes"}) + "\n{oops\n")
    with pytest.raises(D.DataError, match="answers.jsonl: line 2: invalid JSON"):
        B.read_answers(str(a))


# ----------------------------------------------------------------------------- multiple choice: LLaVA's order


@pytest.mark.parametrize("text, llava, ours", [
    ("A. The answer is B.", "A", "A"),            # LLaVA's 'X. ' rule comes before its 'The answer is X'
    ("B. green\nThe answer is C.", "B", "B"),
    ("B", "B", "B"), (" C ", "C", "C"),            # stripped, as model_vqa_science writes answers
    ("The answer is D.", "D", "D"),
    ("The answer is A red circle.", "A", "A"),     # its regex: a capital, then any character
    ("E. foo", "E", None),                        # LLaVA reads E: not one of 4 options, so wrong, as there
    ("The answer is C. The answer is D.", None, "C"),  # twice: LLaVA FAILED; our answer-phrase rule reads the first
    ("The answer is B", None, "B"),               # no character after the letter: LLaVA reads nothing
    ("b", None, "B"), ("(B)", None, "B"),          # our extra forms
    ("There is a dog.", None, None),
])
def test_extract_letter_reads_what_llavas_scienceqa_scorer_reads(text, llava, ours):
    assert tasks.mc.llava_sqa_letter(text) == llava
    assert tasks.mc.extract_letter(text, 4, ["blue square", "red circle", "green ring", "cross"]) == ours


def test_extract_letter_never_disagrees_with_llava_where_llava_reads_a_letter():
    """Every answer of a small grammar of letter forms: where LLaVA's rules give a valid letter, ours
    give the same one."""
    forms = ["{a}", "{a}. {t}", "The answer is {a}.", "{a}. x The answer is {b}.", "({a}) The answer is {b}.",
             "Answer: {a}. The answer is {b}.", "{a}) {t}\nThe answer is {b}.", "I pick {a}. The answer is {b}!"]
    n = 0
    for form in forms:
        for a in "ABCDE":
            for b in "ABCD":
                text = form.format(a=a, b=b, t="a red circle")
                llava = tasks.mc.llava_sqa_letter(text)
                if llava is not None and llava in "ABCD":
                    assert tasks.mc.extract_letter(text, 4) == llava, text
                    n += 1
    assert n > 60


# ----------------------------------------------------------------------------- VQA: which normalisation


def test_vqa_prediction_is_normalised_even_when_all_ten_agree():
    """Our choice (LLaVA's pipeline): 'Two.' against ten '2' scores 1. The official vqaEval.py at its
    current commit compares the raw prediction when the ten agree, and would score 0."""
    assert tasks.vqa.vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert tasks.vqa.vqa_accuracy("Two.", ["2"] * 9 + ["3"]) == 1.0  # disagreeing golds: both sides normalised there too


# ----------------------------------------------------------------------------- CHAIR on COCO: the original's rules


@pytest.mark.parametrize("caption, objects", [
    ("A baby elephant walks.", ["elephant"]),                  # not a person and an elephant
    ("Adult dogs and a baby.", ["dog", "person"]),             # 'baby' alone is a person
    ("A baby animal.", []),                                    # 'animal' is no COCO object
    ("A passenger train at the station.", ["train"]),
    ("A passenger on a bench.", ["person", "bench"]),
    ("A toilet seat is up.", ["toilet"]),
    ("The seat of the toilet is up.", ["toilet"]),             # 'seat' is no chair beside a toilet
    ("A chair and a seat.", ["chair", "chair"]),
    ("Two men ride horses past three calves.", ["person", "horse", "cow"]),  # irregular plurals
    ("Two policemen with knives.", ["person", "knife"]),
    ("Hot dogs and wine glasses on a dining table.", ["hot dog", "wine glass", "dining table"]),
    ("A teddy-bear and teddy bears.", ["teddy bear", "teddy bear"]),
])
def test_chair_objects_follow_the_original_on_coco(caption, objects):
    syn = tasks.chair.read_synonyms("coco")
    assert tasks.chair.coco_rules(syn)
    assert tasks.chair.chair_objects(caption, syn) == objects


def test_coco_rules_only_for_cocos_list_and_chair_metrics_with_them():
    syn = tasks.chair.read_synonyms("coco")
    assert tasks.chair.chair_objects("A baby elephant walks.", syn, coco=False) == ["person", "elephant"]
    assert not tasks.chair.coco_rules(tasks.chair.parse_synonyms("circle, ring\nsquare\n"))
    # caption 1 mentions elephant, toilet (hallucinated); caption 2 person ('man', hallucinated), train:
    # CHAIR_S 2/2, CHAIR_I 2/4, recall 2/2. Without the rules 'baby', 'passenger' and 'seat' would add
    # two persons and a chair.
    m = tasks.chair.chair_metrics(["A baby elephant and a toilet seat.", "A man on a passenger train."],
                        [["elephant"], ["train"]], syn)
    assert m == dict(chair_s=1.0, chair_i=0.5, recall=1.0, avg_len=6.5, n=2)


# ----------------------------------------------------------------------------- MME


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("yes", "yes"), ("Yes, there is a dog.", "yes"), ("No.", "no"), ("no", "no"),
    ("Not really", "no"), ("None", "no"),         # 'no' within the first four characters
    ("There is a dog.", "other"), ("", "other"), ("Maybe yes", "other"), ("I think no", "other"),
])
def test_mme_answer_is_mmes_rule(text, expected):
    assert tasks.mme.mme_answer(text) == expected


def write_mme(root):
    """MME's two layouts: existence/<image>.txt beside the images; count/images/ + questions_answers_YN/."""
    (root / "existence").mkdir(parents=True)
    (root / "existence" / "img1.txt").write_text("Is there a dog in this image? Please answer yes or no.\tYes\n"
                                                 "Is there a cat in this image? Please answer yes or no.\tNo\n")
    (root / "existence" / "img2.txt").write_text("Is there a bus in this image?  Please answer yes or no.\tYes\n"
                                                 "Is there a car in this image?  Please answer yes or no.\tNo\n")
    (root / "count" / "images").mkdir(parents=True)
    (root / "count" / "questions_answers_YN").mkdir()
    (root / "count" / "questions_answers_YN" / "img3.txt").write_text(
        "Are there two dogs in this image? Please answer yes or no.\tYes\n"
        "Are there three dogs in this image? Please answer yes or no.\tNo\n")
    (root / "code_reasoning").mkdir()
    (root / "code_reasoning" / "img4.txt").write_text("Is the output 3? Please answer yes or no.\tYes\n"
                                                      "Is the output 4? Please answer yes or no.\tNo\n")
    suffix = "\nAnswer the question using a single word or phrase."  # as LLaVA's llava_mme.jsonl carries it
    qs = [("existence/img1.png", "Is there a dog in this image? Please answer yes or no."),
          ("existence/img1.png", "Is there a cat in this image? Please answer yes or no."),
          ("existence/img2.png", "Is there a bus in this image? Please answer yes or no."),
          ("existence/img2.png", "Is there a car in this image? Please answer yes or no."),
          ("count/img3.png", "Are there two dogs in this image? Please answer yes or no."),
          ("count/img3.png", "Are there three dogs in this image? Please answer yes or no."),
          ("code_reasoning/img4.png", "Is the output 3? Please answer yes or no."),
          ("code_reasoning/img4.png", "Is the output 4? Please answer yes or no.")]
    path = root / "llava_mme.jsonl"
    path.write_text("".join(json.dumps(dict(question_id=q, image=q, text=t + suffix, category=q.split("/")[0])) + "\n"
                            for q, t in qs))
    return path


def test_mme_reads_llavas_files_and_scores_by_hand(tmp_path):
    path = write_mme(tmp_path / "MME")
    qs = B.read_benchmark(str(path), "mme", mme_root=str(tmp_path / "MME"))
    assert [q["label"] for q in qs] == ["yes", "no"] * 4
    # existence: img1 both right, img2 one right -> acc 3/4, acc+ 1/2, score 125; count: img3 'Maybe'
    # (other) and right -> acc 1/2, acc+ 0, score 50; code_reasoning: one right -> 50.
    answers = ["Yes", "No", "no", "No, there is none.", "Maybe", "no", "yes", "yes"]
    m = B.score("mme", [dict(q, text=a) for q, a in zip(qs, answers)])
    assert list(m) == ["existence", "count", "code_reasoning", "perception", "cognition"]
    assert m["existence"] == dict(accuracy=0.75, acc_plus=0.5, score=125.0, other=0.0, n=4)
    assert m["count"] == dict(accuracy=0.5, acc_plus=0.0, score=50.0, other=0.5, n=2)
    assert m["perception"] == dict(score=175.0, subtasks=2, n=6) and m["cognition"] == dict(score=50.0, subtasks=1, n=2)
    # LLaVA's answer file repeats question_id (the image) for its two questions: the prompt tells them apart
    ans = tmp_path / "answers.jsonl"
    ans.write_text("".join(json.dumps(dict(question_id=q["question_id"], prompt=q["prompt"], text=a)) + "\n"
                           for q, a in zip(reversed(qs), reversed(answers))))
    rows = B.attach_answers(qs, B.read_answers(str(ans), "mme"), str(ans), task="mme")
    assert [r["text"] for r in rows] == answers
    ans.write_text(json.dumps(dict(question_id="count/img3.png", text="yes")) + "\n")
    with pytest.raises(D.DataError, match="line 1: an MME answer needs its 'prompt'"):
        B.read_answers(str(ans), "mme")


def test_mme_bad_files_are_named(tmp_path):
    path = write_mme(tmp_path / "MME")
    (tmp_path / "MME" / "count" / "questions_answers_YN" / "img3.txt").write_text("Are there two dogs?\tMaybe\n")
    with pytest.raises(D.DataError, match=r"img3.txt: line 1: expected 'question<TAB>Yes\|No'"):
        B.read_benchmark(str(path), "mme", mme_root=str(tmp_path / "MME"))
    path = write_mme(tmp_path / "MME2")
    (tmp_path / "MME2" / "existence" / "img2.txt").write_text("Is there a bus in this image?\tYes\n")
    with pytest.raises(D.DataError, match="question_id 'existence/img2.png': no answer in .*MME2/existence/ for image 'img2'"):
        B.read_benchmark(str(path), "mme", mme_root=str(tmp_path / "MME2"))
    lines = path.read_text().splitlines()
    (tmp_path / "one.jsonl").write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(D.DataError, match="subtask 'existence' image 'img2' has 1 questions; MME asks two"):
        B.read_benchmark(str(tmp_path / "one.jsonl"), "mme", mme_root=str(tmp_path / "MME2"))


# ----------------------------------------------------------------------------- MMBench


def png_b64(color=(200, 30, 30)):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_mmbench(path, rows, header=("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return str(path)


MMB_ROWS = [["10", "What is it?", "A hint.", "cat", "dog", "bird", "fish", "B", "animals", "FP-S", png_b64()],
            ["11", "Which colour?", "nan", "red", "blue", "green", "", "C", "animals", "FP-C", "10"]]  # 3 options; image of row 10


def test_mmbench_rounds_rotate_the_options_as_llava_asks_them(tmp_path):
    qs = B.read_benchmark(write_mmbench(tmp_path / "dev.tsv", MMB_ROWS), "mmbench")
    assert [(q["question_id"], q["round_id"], q["answer"]) for q in qs] == \
        [("10", 0, "B"), ("10", 1, "A"), ("10", 2, "D"), ("10", 3, "C"), ("11", 0, "C"), ("11", 1, "B"), ("11", 2, "A")]
    assert qs[1]["options"] == ["dog", "bird", "fish", "cat"]
    assert qs[0]["prompt"] == ("A hint.\nWhat is it?\nA. cat\nB. dog\nC. bird\nD. fish\n"
                               "Answer with the option's letter from the given choices directly.")
    assert qs[4]["prompt"].startswith("Which colour?\nA. red\nB. blue\nC. green\nAnswer")  # no hint, no D
    assert qs[4]["image_b64"] == MMB_ROWS[0][-1]
    assert B.question_image(qs[4], None).size == (8, 8)
    assert len(B.read_benchmark(str(tmp_path / "dev.tsv"), "mmbench", circular=False)) == 2


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("The answer is B.", "B"),
    ("A dog", "A"),                                # VLMEvalKit's article check is off unless VERBOSE: A
    ("I think it is a dog", "B"),                  # no letter: the one option text it contains
    ("B because the dog is clearly visible in the photo", None),  # the letter is not among the last 4 words,
                                                   # and the answer is too long for the text rule
    ("The correct answer is **c**", "C"),          # VLMEvalKit's 'answer is X' pattern, any case
    ("Cannot determine the answer", None), ("Z", None), ("A or B", None), ("catfish", None),  # two texts
])
def test_mmbench_letter_is_vlmevalkits_rule(text, expected):
    assert tasks.mmbench.mmbench_letter(text, ["cat", "dog", "bird", "fish"]) == expected


def test_mmbench_circular_score_by_hand(tmp_path):
    """Question 10 right in all 4 rounds; question 11 right in rounds 0 and 1, wrong in round 2 ('red'
    is option B there, the gold is A): circular accuracy 1/2, first round alone 2/2."""
    qs = B.read_benchmark(write_mmbench(tmp_path / "dev.tsv", MMB_ROWS), "mmbench")
    answers = ["B", "A", "The answer is **d**", "C", "C", "B", "red"]
    ans = tmp_path / "answers.jsonl"  # LLaVA's model_vqa_mmbench answer file: question_id + round_id
    ans.write_text("".join(json.dumps(dict(question_id=int(q["question_id"]), round_id=q["round_id"], text=a)) + "\n"
                           for q, a in zip(qs, answers)))
    rows = B.attach_answers(qs, B.read_answers(str(ans)), str(ans))
    m = B.score("mmbench", rows)
    assert m["overall"] == dict(accuracy=0.5, single=1.0, n=2) == m["animals"]
    assert m["l2/FP-S"] == dict(accuracy=1.0, single=1.0, n=1) and m["l2/FP-C"] == dict(accuracy=0.0, single=1.0, n=1)
    assert [B.judge("mmbench", r)["pred"] for r in rows] == ["B", "A", "D", "C", "C", "B", "B"]


def test_mmbench_bad_files_are_named(tmp_path):
    test_split = [r[:7] + r[8:] for r in MMB_ROWS]
    path = write_mmbench(tmp_path / "test.tsv", test_split,
                         ("index", "question", "hint", "A", "B", "C", "D", "category", "l2-category", "image"))
    with pytest.raises(D.DataError, match="no column 'answer'.*the test split has no answers"):
        B.read_benchmark(path, "mmbench")
    bad = [MMB_ROWS[0][:7] + ["D2"] + MMB_ROWS[0][8:]]
    with pytest.raises(D.DataError, match=r"row 2 \(index '10'\): answer 'D2' is not one of its options' letters ABCD"):
        B.read_benchmark(write_mmbench(tmp_path / "bad.tsv", bad), "mmbench")
    bad = [MMB_ROWS[0][:10] + ["bm90IGFuIGltYWdl"]]
    qs = B.read_benchmark(write_mmbench(tmp_path / "img.tsv", bad), "mmbench")
    with pytest.raises(D.DataError, match="cannot read the base64 image of img.tsv#10"):
        B.question_image(qs[0], None, check=True)
