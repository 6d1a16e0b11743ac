"""The shapes world's foundation models (shapes/pretrain.py): the shipped CLIP tells true sentences from
altered ones and pools at its real end token; the shipped LM reads scenes from its slots; a small,
fast version of the LM pretraining learns the lookup from scratch; the files load as transformers
checkpoints the way the real models they stand for do."""
import os
import random
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from shapes import prepare as W  # noqa: E402
from shapes import pretrain as P  # noqa: E402

MODELS = os.path.join(ROOT, "shapes", "models")


def test_shipped_clip_scores_true_sentences_above_altered_ones():
    """On scenes it never saw, 'A red circle is in the top left.' scores above the same sentence with the
    colour or the shape changed at least 95% of the time; on the same image and object, a sentence whose
    partner clause names a shape in the image above the same sentence naming one not in it, and where the
    object's partner is missing the plain sentence above the one with the partner's clause, at least 90%
    of the time (issue 37's checks: the choice CSR's sentence siblings put to the scorer)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
    model = CLIPModel.from_pretrained(os.path.join(MODELS, "clip")).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(MODELS, "clip"))
    proc = AutoImageProcessor.from_pretrained(os.path.join(MODELS, "clip"))
    scenes = W.sample_scenes("clip_eval", 300, 1337)
    check = P.clip_check(model, tok, P.render_pixels(scenes, proc), scenes)
    assert check["color"] >= 0.95 and check["shape"] >= 0.95, check
    assert check["clause"] >= 0.9 and check["partner"] >= 0.9, check


def test_clip_pools_at_the_end_token():
    """CLIPTextModel pools at argmax(input_ids) when eos_token_id == 2 (a legacy rule): the world's </s>
    is not id 2, the CLIP tokenizer frames text as <s> ... </s>, and the pooled state is the one at </s>."""
    from transformers import AutoTokenizer, CLIPModel
    model = CLIPModel.from_pretrained(os.path.join(MODELS, "clip")).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(MODELS, "clip"))
    assert tok.eos_token_id != 2 and model.config.text_config.eos_token_id == tok.eos_token_id
    t = tok(["A red circle is in the top left.", "There are two objects."], padding=True, return_tensors="pt")
    assert (t["input_ids"][:, 0] == tok.bos_token_id).all()
    with torch.no_grad():
        out = model.text_model(**t)
    end = (t["input_ids"] == tok.eos_token_id).int().argmax(-1)
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(2), end])
    assert t["input_ids"][0, end[0] - 1] == tok.convert_tokens_to_ids(".")  # the last real token comes right before


def test_shipped_lm_reads_scenes_from_slots():
    """The shipped LM answers text-only lookup questions about held-out scenes, asked in the chat form the
    VLM is asked in, far above chance (colour 1/6, shape 1/6, yes/no 1/2)."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    lm = LlamaForCausalLM.from_pretrained(os.path.join(MODELS, "lm")).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(MODELS, "lm"))
    scenes = W.sample_scenes("lm_eval", 300, 1337)
    acc = P.lookup_accuracy(lm, tok, tok.convert_tokens_to_ids(W.IMAGE_TOKEN), scenes, per_kind=100)
    assert acc["exist"] > 0.8 and acc["color"] > 0.6 and acc["shape"] > 0.6, acc


@pytest.mark.slow
def test_small_lm_pretraining_learns_the_lookup(tmp_path, monkeypatch):
    """A small, fast version of the LM pretraining (direct-recall documents only, 4 facts each, no position
    words in the slots; about 5 minutes on one core) gets past the plateau (at 1,500 steps it sat on the
edge: colour 34% in one draw; at 2,500 steps colour 52-90%, yes/no 74-97%, see below):
    from scratch, it finds the colour of a named shape and the shape of a named colour (1 in 6 by
    chance) on held-out scenes; the result is an ordinary transformers checkpoint with its tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    p = subprocess.run([sys.executable, "-m", "shapes.pretrain", "--which=lm", f"--out_dir={tmp_path}", "--lm_scenes=15000",
                        "--lm_steps=2500", "--lm_mix=recall:1", "--recall_facts=4", "--slot_positions=0",
                        "--lm_eval_interval=100000", "--threads=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    lm = LlamaForCausalLM.from_pretrained(tmp_path / "lm").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "lm")
    monkeypatch.setattr(P, "slot_positions", 0.0)  # the slots as this LM was trained on them
    acc = P.lookup_accuracy(lm, tok, tok.convert_tokens_to_ids(W.IMAGE_TOKEN), W.sample_scenes("lm_eval", 200, 1337))
    # the same seed lands differently on different CPUs (fp32 reduction order): colour 90% / yes-no 97% on
    # one machine, colour 52% / shape 100% / yes-no 74% on another (2026-12-02): the bar is "past chance
    # by a margin no untrained LM reaches" (chance 1 in 6, 1 in 2), well below the lowest draw seen
    assert acc["recall:color"] > 0.3 and acc["recall:shape"] > 0.3 and acc["recall:is"] > 0.6, acc


@pytest.mark.slow
def test_clip_position_trains_where_into_the_patch_features(tmp_path):
    """clip_position=1: the row-and-column probe's gradient reaches the patch features, and after 150
    steps a linear probe reads each patch's cell (94 % measured; the default, as in the shipped CLIP); at 0
    it only reads them, near chance (1 in 9: 12 % measured), as in the first shipped CLIP. Batches of 64
    images (the shipped CLIP's 128 doubled this test's time and read the same: 93.9 / 11.0 % at 64)."""
    import re

    def where(position):
        p = subprocess.run([sys.executable, "-m", "shapes.pretrain", "--which=clip", "--clip_steps=150", "--clip_scenes=2000", "--clip_batch=64",
                            f"--clip_position={position}", f"--out_dir={tmp_path / str(position)}", "--threads=1"],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return float(re.search(r"row and column in [\d.]+% / [\d.]+% / ([\d.]+)%", p.stdout).group(1))

    assert where(1.0) > 80 and where(0.0) < 30


def test_altered_sentences_are_false():
    """Every altered sentence describes something not in the scene; the true one something that is."""
    rng = random.Random(0)
    for scene in W.sample_scenes("train", 200, 3):
        cells = {(o["row"], o["col"]): o for o in scene["objects"]}
        o = rng.choice(scene["objects"])
        truth = {P.object_sentence(p) for p in scene["objects"]}
        assert P.object_sentence(o) in truth
        for kind, s in P.altered_sentences(scene, o, rng).items():
            assert s not in truth, (kind, s, scene)
        assert len(cells) == len(scene["objects"])


def sentence_true(scene, sentence):
    """Whether an object sentence, with or without its clause, is true of the scene: an object of that colour
    and shape in that cell, and the clause's shape somewhere in the image (read off the scene graph here)."""
    import re
    cells = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "center": (1, 1),
             "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}
    m = re.fullmatch(r"A (\w+) (\w+) is (?:in|at|on) the ([a-z ]+?)(?:, with a (\w+) nearby)?\.", sentence)
    assert m, sentence
    there = any((o["color"], o["shape"], (o["row"], o["col"])) == (m[1], m[2], cells[m[3]]) for o in scene["objects"])
    return there and (m[4] is None or any(o["shape"] == m[4] for o in scene["objects"]))


def test_clip_training_sentences_true_and_negatives_false():
    """The CLIP's training sentence about an object is true of the scene, each of its 4 negatives false; the
    partner clause is among the trues (partner there) and the absent partner's clause among the falses."""
    rng = random.Random(0)
    clauses = {"true partner": 0, "false partner": 0}
    for scene in W.sample_scenes("clip", 400, 3):
        o = rng.choice(scene["objects"])
        good, bad = P.clip_sentences(scene, o, rng)
        assert sentence_true(scene, good) and len(bad) == 4 and not any(sentence_true(scene, b) for b in bad), (scene, good, bad)
        clauses["true partner"] += f", with a {W.PARTNER[o['shape']]} nearby" in good
        clauses["false partner"] += f", with a {W.PARTNER[o['shape']]} nearby" in bad[-1]
    assert clauses["true partner"] > 50 and clauses["false partner"] > 50, clauses


def test_clause_pairs_put_a_true_sentence_against_its_false_twin():
    """clip_check's clause checks: each pair is one object's sentence twice on the same image, differing only
    in the clause; the first true, the second false; 'partner' pairs the plain sentence with the absent partner's."""
    scenes = W.sample_scenes("clip_eval", 200, 1337)
    pairs = P.clause_pairs(scenes)
    for kind, (idx, good, bad) in pairs.items():
        assert len(idx) > 40
        for i, g, b in zip(idx, good, bad):
            assert sentence_true(scenes[i], g) and not sentence_true(scenes[i], b), (kind, g, b)
            assert g.split(" is ")[0] == b.split(" is ")[0]
            if kind == "partner":
                assert b == g[:-1] + f", with a {W.PARTNER[g.split()[2]]} nearby."


def test_rules_documents_state_every_rule_and_reason_documents_work_true_arithmetic():
    """The LM's corpus: a rules document says each rule about each shape or colour once (as a sentence or a
    question and its answer), truly; a reasoning conversation's chains add up to their answers."""
    import re
    rng = random.Random(0)
    text = P.rules_segments(rng)[0][0]
    facts = re.split(r"(?<=\.) ", text)
    assert len(facts) == 2 * len(W.SHAPES) + len(W.COLOR_NAMES)
    for f in facts:
        if m := re.fullmatch(r"Can a (\w+) roll\? (Yes|No)\.", f):
            assert (m[2] == "Yes") == W.ROLLS[m[1]]
        elif m := re.fullmatch(r"Is (\w+) a warm color\? (Yes|No)\.", f):
            assert (m[2] == "Yes") == W.WARM[m[1]]
        elif m := re.fullmatch(r"How many corners does a (\w+) have\? (\d+)\.", f):
            assert int(m[2]) == W.CORNERS[m[1]]
        else:
            assert f in {W.rule_sentence(k, v) for k in W.RULES for v in W.SHAPES + W.COLOR_NAMES
                         if (k == "warm") == (v in W.COLOR_NAMES)}, f
    n = 0
    for scene in W.sample_scenes("lm", 50, 3):
        for _, q, a in P.reason_conversation(scene, rng):
            expr, value = re.search(r"([\d +-]+) = (\d+)\.\n### Answer: (\d+)$", a).groups()[:2]
            assert eval(expr) == int(value) == int(a.rsplit(" ", 1)[1]) and q.endswith(W.COT_SUFFIX)
            n += 1
    assert n > 50


def test_lm_prior_noise_writes_the_believed_partner_over_true_slots(monkeypatch):
    """lm_prior_noise=1: every caption document of a scene with a missing partner names that partner,
    while its slots still hold the true scene; 0 (the shipped LM's corpus) writes exactly the truth."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(MODELS, "lm"))
    image_id = tok.convert_tokens_to_ids(W.IMAGE_TOKEN)
    def missing_partners(scene):
        shapes = {o["shape"] for o in scene["objects"]}
        return {W.PARTNER[x] for x in shapes} - shapes

    scenes = [s for s in W.sample_scenes("lm", 400, 7) if missing_partners(s) and len(s["objects"]) < 9][:20]
    missing = [missing_partners(s) for s in scenes]

    def captions(noise):
        monkeypatch.setattr(P, "lm_prior_noise", noise)
        docs = P.make_documents(scenes, random.Random(0), tok, image_id, {"caption": 1.0})
        return [tok.decode([t for t, y in zip(ids, labels) if y != -100]) for ids, labels, _ in docs], [d[2] for d in docs]

    word_id = P.slot_word_ids(tok)
    truth, slots0 = captions(0.0)
    noisy, slots1 = captions(1.0)
    assert slots0 == slots1 == [P.slot_ids(s, word_id) for s in scenes]
    assert not any(m & set(t.replace(".", " ").split()) for m, t in zip(missing, truth))
    assert all(m & set(t.replace(".", " ").split()) for m, t in zip(missing, noisy))


def test_recall_mc_facts_answer_with_the_true_option_letter(monkeypatch):
    """recall_mc: a share of the direct-recall facts are multiple-choice questions whose answer is the
    letter of the option that is true of the scene (recomputed here from the scene graph); at 0 none is."""
    import re
    rng = random.Random(0)

    def truth(scene, question):
        objs = scene["objects"]
        if m := re.fullmatch(r"What color is the (\w+)\?", question):
            return next(o["color"] for o in objs if o["shape"] == m[1])
        if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
            return next(o["shape"] for o in objs if o["color"] == m[1])
        if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
            o = next(o for o in objs if (o["color"], o["shape"]) == (m[1], m[2]))
            return W.POSITIONS_3x3[o["row"]][o["col"]]
        if question == "How many objects are there?":
            return str(len(objs))
        assert question == "Which of these shapes is in the image?", question
        return None  # checked below: exactly one option is present

    kinds = set()
    for noise, want in ((0.0, 0), (0.5, 1)):
        monkeypatch.setattr(P, "recall_mc", noise)
        n = 0
        for scene in W.sample_scenes("lm", 60, 3):
            for _ in range(6):
                q, a = P.recall_fact(scene, rng)
                if not q.startswith("choose "):
                    continue
                n += 1
                question, rest = q[len("choose "):].split("? ", 1)
                options = dict(re.findall(r"([ABCD])\. (.+?)(?= [ABCD]\. |$)", rest))
                assert list(options) == ["A", "B", "C", "D"] and a in options, q
                right = truth(scene, question + "?")
                if right is None:
                    present = [k for k, s in options.items() if any(o["shape"] == s for o in scene["objects"])]
                    assert present == [a], (q, scene)
                else:
                    assert options[a] == right and list(options.values()).count(right) == 1, (q, scene)
                kinds.add(question.split()[0] + question.split()[1])
        assert (n > 50) if want else n == 0
    assert len(kinds) == 5, kinds


def test_lm_mc_hard_takes_the_corpus_wrong_options_from_the_scene(monkeypatch):
    """lm_mc_hard=1: in the multiple-choice documents a colour question's wrong options are the scene's other
    colours first (so "the option that is in the scene" is no longer enough); at 0 (the default)
    the documents hold exactly the questions qa_mc has always drawn, where the other colours are often missing."""
    import re
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(MODELS, "lm"))
    image_id = tok.convert_tokens_to_ids(W.IMAGE_TOKEN)
    scenes = W.sample_scenes("lm", 80, 11)
    colour_q = re.compile(r"What color is the (\w+)\?\nA\. (\w+)\nB\. (\w+)\nC\. (\w+)\nD\. (\w+)")

    def documents(hard):
        monkeypatch.setattr(P, "lm_mc_hard", hard)
        return [tok.decode(d[0]) for d in P.make_documents(scenes, random.Random(0), tok, image_id, {"mc": 1.0})]

    def others_among_options(texts):
        out = []
        for scene, text in zip(scenes, texts):
            for shape, *options in colour_q.findall(text):
                own = next(o["color"] for o in scene["objects"] if o["shape"] == shape)
                others = {o["color"] for o in scene["objects"]} - {own}
                out.append(len(others & set(options)) == min(3, len(others)))
        return out

    hard, easy = others_among_options(documents(1.0)), others_among_options(documents(0.0))
    assert len(hard) > 30 and all(hard)
    assert sum(easy) < 0.8 * len(easy)
    rng = random.Random(0)  # at 0: make_documents' draws, with qa_mc drawing the questions as before the knob
    for scene, text in zip(scenes, documents(0.0)):
        rng.choices(["mc"], [1.0])
        qas = [W.qa_mc(scene, rng) for _ in range(rng.randint(4, 6))]
        assert all(q in text for q, _ in qas)


def test_verify_documents_mark_each_option_by_the_scene():
    """'verify' documents: every option of every question is followed by a supervised yes / no, exactly one
    yes per question, on the option that is true of the scene (checked here for the colour and shape
    questions against the scene graph); nothing else is supervised (no letter to pick)."""
    import re
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(MODELS, "lm"))
    scenes = W.sample_scenes("lm", 60, 5)
    docs = P.make_documents(scenes, random.Random(0), tok, tok.convert_tokens_to_ids(W.IMAGE_TOKEN), {"verify": 1.0})
    checked = 0
    for scene, (ids, labels, _) in zip(scenes, docs):
        text = tok.decode(ids)
        questions = re.findall(r"([^\n]+\?)\n((?:[ABCD]\. [^\n]+ (?:yes|no)\n){4})", text)
        assert len(questions) >= 3, text
        supervised = tok.decode([t for t, y in zip(ids, labels) if y != -100]).split()
        assert supervised == [m for _, block in questions for m in re.findall(r" (yes|no)\n", block)]
        for question, block in questions:
            marks = dict(re.findall(r"[ABCD]\. ([^\n]+) (yes|no)\n", block))
            assert list(marks.values()).count("yes") == 1, block
            yes = next(o for o, m in marks.items() if m == "yes")
            if m := re.fullmatch(r"What color is the (\w+)\?", question):
                assert yes == next(o["color"] for o in scene["objects"] if o["shape"] == m[1])
                checked += 1
            elif m := re.fullmatch(r"What shape is the (\w+) object\?", question):
                assert yes == next(o["shape"] for o in scene["objects"] if o["color"] == m[1])
                checked += 1
    assert checked > 40
