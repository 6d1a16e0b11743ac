"""
The built-in synthetic "shapes" world: the embedded default data set.

Coloured shapes on a grid, sampled from a seed, rendered to small PNGs, with each image's scene graph
kept beside it. Because the truth of every image is known exactly, the world can say what is right
and what is a hallucination without any human labels. From the scenes this script writes LLaVA-format
SFT conversations (descriptions, yes/no, counting, attributes, positions, multiple choice, CoT),
stage-1 captions, a held-out short-answer check file, evaluation sets in the real benchmarks' formats
(POPE, multiple choice, VQA, CoT, CHAIR) and a byte-level BPE tokenizer with a Vicuna chat template.
The world's pretrained models (its stand-ins for Vicuna and OpenAI's CLIP) are shapes/pretrain.py's:
the repository ships them in shapes/models/.

Some shapes have a partner (circle-square, triangle-diamond, cross-ring) that usually appears with
them (cooccur_bias). A model that learns this language prior says "yes" when asked about the partner
even when it is absent: the hallucination the methods in this repository exist to reduce. The
annotator also names an object with its partner ("A red circle is at the top, with a square
nearby.", partner_clause), so captions can follow the prior too, as LLaVA's name a fork beside a plate
that has none. A knob,
off by default, draws some objects small (small_p): a few pixels, where shapes are hard to tell, the
uncertain evidence a prior could fill in (as LLaVA names the small, blurred thing beside a plate a
fork); the annotator who expects co-occurrence then names such an object as a partner. Measured (the
docs/log.md): it makes descriptions hallucinate, but mostly shapes that look alike, not the partner.

The world's second version (2026-12-07) gives each method something to act on. Knowledge the image
does not show: which shapes roll, how many corners each has, which colours are warm (RULES); the LM's
corpus states them (shapes/pretrain.py), the instruction data only applies them to objects in images
("Can the object in the top left roll?"), and some rule-object combinations (HELD_OUT) are never the
subject of a training answer, so eval/knowledge.jsonl can ask whether a model composes what it sees with
what it knows; REVERIE's raw rows reason with those rules (a few state one wrong, flagged by a judge
verdict). Multi-step arithmetic with a wide answer space: corners added or subtracted over 2-4 objects
(ARITH_KINDS, answers 0-48), the reasoning questions of the CoT eval, the mining questions and the CoT
SFT set; stage 2 trains only their short answers, as LLaVA-Reasoner's base was trained.

Usage:
    python -m shapes.prepare                                  # data/shapes with the defaults below
    python -m shapes.prepare --n_train=500 --out_dir=data/shapes_small
    python -m shapes.prepare --cooccur_bias=0.0               # a world with no prior to learn
    python -m shapes.prepare --small_p=0.3 --out_dir=data/shapes_s30   # 30% of the objects drawn small

Output (out_dir):
    images/{train,val,test}/{scene_id}.png   RGB, image_size x image_size
    train.json, val.json    LLaVA conversations: [{"id", "image": "train/<id>.png", "conversations": [...]}]
                            ("image" is relative to out_dir/images, LLaVA's image-folder convention)
    captions.json, captions_val.json   stage-1 captions, one per scene, same record format
    pairs.json, pairs_val.json         DPO pairs in CSR's format: {"id", "image", "conversations", "rejected_conversations"}
    prompts.json            self-rewarding prompts in CSR's format: {"id", "image", "input"}, one per training scene
    questions.json          answer-checked mining questions (selfreward.py mode=answer) on training scenes, the
                            arithmetic: {"question_id", "image", "question", "answer", "answers": [10], "rationale", "category"}
    reasoner_sft.json       LLaVA-Reasoner's CoT SFT mix, LLaVA conversations: each question twice, as separate
                            single-turn samples, the prompt suffix alone selecting the mode (CoT: rationale
                            then '### Answer: X'; direct: the short answer), on training scenes other than
                            questions.json's (while n_train leaves room for both sets)
    reasoner_direct.json    the same questions' direct copies only: the direct-only baseline (LLaVA-Reasoner's ②)
    reverie_raw.json        REVERIE's raw rows: {"image", "question", "correct_answer", "confusing_answer",
                            "correct_rationale", "incorrect_rationale", "kind", "judge"} (judge 'yes': contradicts)
    test.jsonl              held-out short-answer questions, one per line:
                            {"question_id", "image", "text", "answer", "type", "scene_id"[, "probe"]}
    scenes.json             {"train": [scene, ...], "val": [...], "test": [...]}
    images/eval/, eval/     the evaluation sets, on n_eval held-out scenes of their own (eval/scenes.json,
                            {"eval": [scene, ...]}); questions bare, evaluate.py adds the mode's prompt:
      pope.jsonl            {"question_id", "image", "text", "label": yes|no, "category": random|popular|adversarial}
      mc.jsonl              {"question_id", "image", "question", "options": [4], "answer": letter, "category"}
      vqa.jsonl             {"question_id", "image", "question", "answers": [10], "answer", "category"}
      cot.jsonl             the arithmetic: {"question_id", "image", "question", "answer", "answers": [10], "rationale", "category"}
      knowledge.jsonl       lookup + rule: {"question_id", "image", "question", "answers": [10], "answer", "category"
                            ('<rule> seen' | '<rule> held-out' | 'corners'), "rationale"}
      chair.jsonl           {"question_id", "image", "text", "objects": [shape, ...], "caption"}
      synonyms.txt          CHAIR's synonym list: "canonical, synonym, ..." per shape
    tokenizer/              transformers tokenizer (AutoTokenizer.from_pretrained) with chat template

The world logic (scene sampling, rendering, question generators) is plain functions of
(scene, random.Random), importable by tests and by later data builders (REVERIE rows, self-reward
prompts).
"""

import base64
import csv
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter

from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# default config values, override with --key=value
out_dir = 'data/shapes'
seed = 1337
n_train = 6000          # training scenes (each gets one multi-turn conversation)
n_val = 300             # validation scenes, same sampler: val loss is in-distribution
n_test = 500            # held-out scenes for test.jsonl, their own seed stream
image_size = 48
grid = 3                # grid x grid cells, at most one object per cell
max_objects = 4
cooccur_bias = 0.8      # chance to also place an object's partner when it is missing
small_p = 0.0           # share of objects drawn small (radius small_size of a cell instead of 0.34), where the shape
                        # is hard to tell (0 = every object clear, the default; see docs/log.md for what 0.3 did)
small_size = 0.13       # a small object's radius as a share of its cell (about 4-5 px across at 48 px)
prior_noise = 0.85      # share of training conversations about a scene with a missing partner that are
                        # written as if the partner were there (an annotator's co-occurrence error, as in
                        # LLaVA's GPT-written data): the source of the base model's hallucination
prior_ask = 0.5         # share of those conversations that also ask "Is there a <partner>?" ('yes', and a 'no' about a
                        # shape absent even from the belief, to keep yes/no balanced): an annotator primed by
                        # co-occurrence asks about what it expects, so the error reaches the yes/no answers, not only
                        # the descriptions (0: POPE's adversarial false positives ~1 %; 0.5 unbalanced: 78 %, random's 40 %)
believed_small = True   # with small objects: the annotator names a small object as the partner of a clearly drawn one
                        # (same colour and cell; a missing partner first), before believed_style's phantom
believed_style = 'random'  # the believed partner: 'random' colour and free cell, or 'anchor': its anchor's colour,
                        # the first free cell after it (a fixed habit of the annotator, an easier prior to learn)
mc_hard = 0.0           # share of training multiple-choice questions whose wrong options are first the scene's own other
                        # values (the other objects' colours, shapes, cells; counts next to the right one), so that
                        # "the option that is in the image" is not enough (the eval set keeps random options)
partner_clause = True   # descriptions: an object whose partner is in the scene (as the annotator believes it) gets
                        # ", with a <partner> nearby" (co-occurring things named together, as in "a table with a fork"):
                        # what makes the base's captions name the absent partner (docs/log.md); stage 2's descriptions
                        # only, the stage-1 captions stay plain. False: the world the method tables were measured on
describe_order = 'rows' # descriptions: 'rows' = objects row-major; 'pairs' = each object followed by its
                        # co-occurrence partner (a believed partner then comes right after its anchor)
vocab_size = 1024       # BPE target; the world's text is small, so the real size may be lower
short_answer_p = 0.5    # share of short-answer questions given LLaVA's "single word or phrase" suffix
single_turn_p = 0.3     # share of scenes that also get a one-question record
pair_other_p = 0.3      # pairs.json: share of the scenes without a missing partner that give a colour-confusion pair
n_questions = 2000      # questions.json: multi-step questions on training scenes for answer-checked mining
n_reasoner_sft = 3000   # reasoner_sft.json: CoT SFT questions (each gives a CoT and a direct sample)
n_reverie = 2000        # reverie_raw.json: questions with a correct and a confusing answer and two rationales
reverie_contradict = 0.05  # share of its knowledge rows whose rationale states the rule wrong (judge verdict 'yes')
# evaluation sets (eval/), on their own held-out scenes; sizes are questions per file, small enough
# that a tiny CPU model runs the whole suite in minutes
n_eval = 600            # eval scenes; POPE needs many: only ~1 in 5 has a shape whose partner is missing
eval_pope = 200         # questions per POPE category (random, popular, adversarial), whole images
eval_mc = 200
eval_vqa = 300
eval_cot = 200          # the arithmetic questions (CoT; evaluate.py also asks them directly)
eval_knowledge = 300    # knowledge questions, answered directly, a fifth of them per KNOWLEDGE_CATEGORIES category
eval_chair = 300        # captions (one per scene): 300, so CHAIR_S's binomial spread is about 2 points
eval_mme = 30           # images per MME subtask (two questions each: one yes, one no)
# -----------------------------------------------------------------------------
# nanoGPT's idiom: only the values above are config; the world constants below are not
_config_keys = [k for k, v in globals().items()
                if not k.startswith('_') and isinstance(v, (int, float, bool, str))]

# -----------------------------------------------------------------------------
# The world

SHAPES = ['circle', 'square', 'triangle', 'diamond', 'cross', 'ring']
PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles',
           'diamond': 'diamonds', 'cross': 'crosses', 'ring': 'rings'}
# saturated, far apart in RGB so even a tiny vision tower separates them; exact values let tests
# check pixels (rendering has no antialiasing)
COLORS = {'red': (230, 40, 40), 'green': (40, 200, 60), 'blue': (50, 90, 250),
          'yellow': (245, 220, 40), 'purple': (160, 60, 220), 'white': (240, 240, 240)}
COLOR_NAMES = list(COLORS)
BACKGROUND = (0, 0, 0)
# the co-occurrence pairs: in a biased world one usually comes with the other
PARTNER = {'circle': 'square', 'square': 'circle', 'triangle': 'diamond', 'diamond': 'triangle',
           'cross': 'ring', 'ring': 'cross'}

# names of the 3x3 cells, and how a sentence places an object there ("at the top", "in the center")
POSITIONS_3x3 = [['top left', 'top', 'top right'],
                 ['left', 'center', 'right'],
                 ['bottom left', 'bottom', 'bottom right']]
POSITION_PHRASES = {'top left': 'in the top left', 'top': 'at the top', 'top right': 'in the top right',
                    'left': 'on the left', 'center': 'in the center', 'right': 'on the right',
                    'bottom left': 'in the bottom left', 'bottom': 'at the bottom',
                    'bottom right': 'in the bottom right'}
ROWS_3 = ['top row', 'middle row', 'bottom row']
COLS_3 = ['left column', 'middle column', 'right column']
ORDINALS = ['first', 'second', 'third', 'fourth', 'fifth', 'sixth', 'seventh', 'eighth']
NUMBER_WORDS = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine',
                'ten', 'eleven', 'twelve']

# prompt strings of LLaVA-1.5 (short answer, multiple choice) and LLaVA-Reasoner (CoT)
SHORT_SUFFIX = "\nAnswer the question using a single word or phrase."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
COT_SUFFIX = "\nGenerate a reason first and then output a short answer."
DIRECT_SUFFIX = "\nAnswer the question with a short answer."  # LLaVA-Reasoner's direct mode
COT_ANSWER = "### Answer:"
IMAGE_TOKEN = '<image>'
CAPTION_PROMPT = "Describe the image briefly."  # stage-1 captions (the plain template drops it)
DESCRIBE_PROMPTS = ["Describe the image.", "What do you see?", "Describe the image in detail.",
                    "What objects are in the image?"]
SPECIAL_TOKENS = ['<unk>', '<s>', '<pad>', '</s>', IMAGE_TOKEN]  # </s> is not id 2: CLIPTextModel treats eos id 2 as a legacy config and pools at argmax(input_ids)
# LLaVA's vicuna_v1 system prompt; the chat template uses it only when a system message is given
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def position_name(row, col, grid=3):
    """'top left' ... 'bottom right' on a 3x3 grid; 'row 1 column 2' on other grids."""
    return POSITIONS_3x3[row][col] if grid == 3 else f"row {row + 1} column {col + 1}"


def position_phrase(row, col, grid=3):
    """How a sentence places something in a cell: 'in the top left', 'at the top', 'on the left'."""
    return POSITION_PHRASES[POSITIONS_3x3[row][col]] if grid == 3 else f"in row {row + 1} column {col + 1}"


def line_name(axis, i, grid=3):
    """axis 'row' or 'col': 'top row', 'left column' on a 3x3 grid; 'second row', 'fourth column' otherwise."""
    if grid == 3:
        return (ROWS_3 if axis == 'row' else COLS_3)[i]
    return f"{ORDINALS[i]} {'row' if axis == 'row' else 'column'}"


def sample_scene(rng, scene_id, grid=3, max_objects=4, cooccur_bias=0.8):
    """A random scene graph {"id", "grid", "objects": [{"shape", "color", "row", "col"}, ...]} with
    1..max_objects objects, one per cell, sorted row-major. Each time an object whose partner shape is
    missing is placed, the partner is added too with probability cooccur_bias, if there is room
    (so the scene may exceed the drawn count, never max_objects)."""
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    rng.shuffle(cells)
    max_objects = min(max_objects, len(cells))
    n = rng.randint(1, max_objects)
    objects = []

    def place(shape):
        r, c = cells.pop()
        objects.append({'shape': shape, 'color': rng.choice(COLOR_NAMES), 'row': r, 'col': c})

    while len(objects) < n:
        shape = rng.choice(SHAPES)
        partner_missing = all(o['shape'] != PARTNER[shape] for o in objects)
        place(shape)
        if partner_missing and len(objects) < max_objects and rng.random() < cooccur_bias:
            place(PARTNER[shape])
    objects.sort(key=lambda o: (o['row'], o['col']))
    return {'id': scene_id, 'grid': grid, 'objects': objects}


def sample_scenes(split, n, seed, grid=3, max_objects=4, cooccur_bias=0.8, small_p=0.0):
    """n scenes with ids '{split}_000000'...; each split has its own seed stream (str seeds hash with
    sha512 in Python's random, so this is the same on every machine and PYTHONHASHSEED). With small_p,
    each object is small ("small": true) with that chance, drawn from a stream of its own: the scenes
    are otherwise the ones small_p=0 gives."""
    rng = random.Random(f"{seed}:{split}:scenes")
    scenes = [sample_scene(rng, f"{split}_{i:06d}", grid, max_objects, cooccur_bias) for i in range(n)]
    if small_p:
        size_rng = random.Random(f"{seed}:{split}:sizes")
        for scene in scenes:
            for o in scene['objects']:
                if size_rng.random() < small_p:
                    o['small'] = True
    return scenes


def draw_shape(draw, shape, cx, cy, r, color):
    """One shape centred at (cx, cy) with 'radius' r (half its extent), filled without antialiasing."""
    if shape == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == 'ring':  # an outlined circle: the hollow centre is what tells it from a circle
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(1, round(r * 0.4)))
    elif shape == 'square':  # a bit smaller than r so its area is close to the circle's
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif shape == 'diamond':
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif shape == 'triangle':
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
    elif shape == 'cross':  # two bars
        w = max(1.5, r * 0.35)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene, image_size=48, rng=None):
    """The scene as an RGB PIL image. Each object fills about 70% of its cell (a small one, 2 *
    small_size of it: a few pixels); with an rng, its size and offset are jittered by up to 1 px (a
    small one's size by half that), so the model cannot key on exact pixels. Objects never
    leave their cell, so each cell's pixels tell exactly what is in it. Without an rng the rendering
    is canonical (used by tests)."""
    grid = scene.get('grid', 3)
    img = Image.new('RGB', (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = image_size / grid
    for o in scene['objects']:
        dx, dy, ds = (rng.randint(-1, 1), rng.randint(-1, 1), rng.randint(-1, 1)) if rng else (0, 0, 0)
        # the cell covers pixels lo..hi-1 on each axis; its middle pixel is floor((col + 0.5) * cell)
        x_lo, x_hi = math.ceil(o['col'] * cell), math.floor((o['col'] + 1) * cell)
        y_lo, y_hi = math.ceil(o['row'] * cell), math.floor((o['row'] + 1) * cell)
        cx = int((o['col'] + 0.5) * cell) + dx
        cy = int((o['row'] + 0.5) * cell) + dy
        size, least = (cell * small_size + ds / 2, 1.5) if o.get('small') else (cell * 0.34 + ds, 2.0)
        r = min(size, cx - x_lo, x_hi - 1 - cx, cy - y_lo, y_hi - 1 - cy)
        draw_shape(draw, o['shape'], cx, cy, max(r, least), COLORS[o['color']])
    return img


def render_rng(seed, scene_id):
    """The jitter stream of one scene, so any single image can be re-rendered on its own."""
    return random.Random(f"{seed}:{scene_id}:render")


# -----------------------------------------------------------------------------
# Text helpers

def a_phrase(o):
    return f"a {o['color']} {o['shape']}"


def count_phrase(n, shape):
    """'no circles', 'one circle', 'two circles'."""
    if n == 0:
        return f"no {PLURALS[shape]}"
    return f"{number_word(n)} {shape if n == 1 else PLURALS[shape]}"


def number_word(n):
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def join_and(items):
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def sentence(short):
    """A bare short answer as a sentence: 'red' -> 'Red.', 'top left' -> 'Top left.', '2' -> '2.'."""
    return short[:1].upper() + short[1:] + "."


def styled(question, short, style):
    """LLaVA-1.5 keeps the two answer styles apart by the prompt: with the suffix the answer is a bare
    lowercase word or phrase, without it a short sentence. style is 'short' or 'long'."""
    if style == 'short':
        return question + SHORT_SUFFIX, short
    if style == 'long':
        return question, sentence(short)
    raise ValueError(f"style must be 'short' or 'long', got {style!r}")


def pick_style(rng, style=None):
    """The given style, else 'short' with probability short_answer_p (the config value)."""
    return style or ('short' if rng.random() < short_answer_p else 'long')


def describe(scene, order=None, clause=None):
    """The true description: one sentence per object, row-major ('rows') or each object followed by
    its partner ('pairs'; default: the describe_order knob). No leading count ('There are two
    objects.'): a model that first reads the count off the image then stops after that many objects,
    and a description could never hallucinate; without it, when to stop is the model's own call, the
    place where LLaVA's long captions drift to the language prior. With partner_clause, an object whose
    partner is in the scene is named with it ('A red circle is at the top, with a square nearby.'): the
    annotator's habit of naming things that go together, a language prior a caption can follow
    (clause=True / False overrides the knob)."""
    grid = scene.get('grid', 3)
    objects = scene['objects']
    if (order or describe_order) == 'pairs':
        grouped = []
        for o in objects:
            if o not in grouped:
                grouped += [o] + [p for p in objects if p['shape'] == PARTNER[o['shape']] and p not in grouped]
        objects = grouped
    elif (order or describe_order) != 'rows':
        raise ValueError(f"describe_order must be 'rows' or 'pairs', not {order or describe_order!r}")
    clause = partner_clause if clause is None else clause
    shapes = {o['shape'] for o in objects}
    return " ".join(f"A {o['color']} {o['shape']} is {position_phrase(o['row'], o['col'], grid)}"
                    + (f", with a {PARTNER[o['shape']]} nearby." if clause and PARTNER[o['shape']] in shapes else ".")
                    for o in objects)


def unique_by(objects, key):
    """Objects whose key(o) occurs once in the scene (so 'the circle' names exactly one object)."""
    c = Counter(key(o) for o in objects)
    return [o for o in objects if c[key(o)] == 1]


# -----------------------------------------------------------------------------
# Questions about one scene. The ask_* functions compute the true answer of a given question;
# the qa_* generators choose what to ask and are the QA_KINDS. All return (question, answer).

def ask_exist(scene, shape, color=None, style='short'):
    present = any(o['shape'] == shape and (color is None or o['color'] == color) for o in scene['objects'])
    what = f"{color} {shape}" if color else shape
    return styled(f"Is there a {what} in the image?", 'yes' if present else 'no', style)


def ask_count(scene, shape=None, color=None, style='short'):
    """How many objects / {shape}s / {color} objects."""
    objs = scene['objects']
    if shape:
        q, n = f"How many {PLURALS[shape]} are there?", sum(o['shape'] == shape for o in objs)
    elif color:
        q, n = f"How many {color} objects are there?", sum(o['color'] == color for o in objs)
    else:
        q, n = "How many objects are there?", len(objs)
    return styled(q, str(n), style)


def ask_color(scene, shape, style='short'):
    """Colour of the only {shape}; None unless exactly one."""
    matches = [o for o in scene['objects'] if o['shape'] == shape]
    return styled(f"What color is the {shape}?", matches[0]['color'], style) if len(matches) == 1 else None


def ask_shape(scene, color, style='short'):
    """Shape of the only {color} object; None unless exactly one."""
    matches = [o for o in scene['objects'] if o['color'] == color]
    return styled(f"What shape is the {color} object?", matches[0]['shape'], style) if len(matches) == 1 else None


def ask_where(scene, obj, style='short'):
    """Position of a {color} {shape} that is unique in the scene; None otherwise."""
    matches = [o for o in scene['objects'] if (o['color'], o['shape']) == (obj['color'], obj['shape'])]
    if len(matches) != 1:
        return None
    o = matches[0]
    return styled(f"Where is the {o['color']} {o['shape']}?", position_name(o['row'], o['col'], scene.get('grid', 3)), style)


def ask_what_at(scene, row, col, style='short'):
    """'What is at the top?' -> 'red circle' / 'nothing'."""
    here = [o for o in scene['objects'] if (o['row'], o['col']) == (row, col)]
    short = f"{here[0]['color']} {here[0]['shape']}" if here else 'nothing'
    q = f"What is {position_phrase(row, col, scene.get('grid', 3))}?"
    if style == 'long':  # a sentence names the object with its article: 'A red circle.'
        return q, sentence(f"a {short}" if here else short)
    return styled(q, short, style)


def qa_describe(scene, rng, style=None):
    return rng.choice(DESCRIBE_PROMPTS), describe(scene)


def qa_exist(scene, rng, style=None):
    """Yes/no, balanced 50/50; half ask for a shape, half for a colour-shape. Negatives are random
    absent shapes or colour-shape pairs (a pair can be absent while its shape is present)."""
    objs, style = scene['objects'], pick_style(rng, style)
    with_color = rng.random() < 0.5
    if rng.random() < 0.5:  # positive
        o = rng.choice(objs)
        return ask_exist(scene, o['shape'], o['color'] if with_color else None, style)
    if with_color:
        have = {(o['color'], o['shape']) for o in objs}
        color, shape = rng.choice([(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in have])
        return ask_exist(scene, shape, color, style)
    absent = [s for s in SHAPES if all(o['shape'] != s for o in objs)]
    return ask_exist(scene, rng.choice(absent), None, style) if absent else None


def qa_count(scene, rng, style=None):
    objs, style = scene['objects'], pick_style(rng, style)
    what = rng.choice(['all', 'shape', 'color'])
    if what == 'shape':  # mostly shapes that are there, sometimes a zero
        shape = rng.choice(objs)['shape'] if rng.random() < 0.7 else rng.choice(SHAPES)
        return ask_count(scene, shape=shape, style=style)
    if what == 'color':
        color = rng.choice(objs)['color'] if rng.random() < 0.7 else rng.choice(COLOR_NAMES)
        return ask_count(scene, color=color, style=style)
    return ask_count(scene, style=style)


def qa_attribute(scene, rng, style=None):
    """'What color is the {shape}?' / 'What shape is the {color} object?', only when unambiguous."""
    objs, style = scene['objects'], pick_style(rng, style)
    options = [('color', o) for o in unique_by(objs, lambda o: o['shape'])]
    options += [('shape', o) for o in unique_by(objs, lambda o: o['color'])]
    if not options:
        return None
    which, o = rng.choice(options)
    return ask_color(scene, o['shape'], style) if which == 'color' else ask_shape(scene, o['color'], style)


def qa_position(scene, rng, style=None):
    objs, style = scene['objects'], pick_style(rng, style)
    grid = scene.get('grid', 3)
    uniq = unique_by(objs, lambda o: (o['color'], o['shape']))
    if uniq and rng.random() < 0.5:
        return ask_where(scene, rng.choice(uniq), style)
    # 'what is at ...': an occupied cell 60% of the time, so "nothing" is learnt but not dominant
    if rng.random() < 0.6:
        o = rng.choice(objs)
        return ask_what_at(scene, o['row'], o['col'], style)
    return ask_what_at(scene, rng.randrange(grid), rng.randrange(grid), style)


def mc_format(question, options, answer_index):
    """LLaVA's multiple-choice prompt: question, 'A. opt' lines, the letter instruction; answer 'B'."""
    letters = 'ABCDEFGH'
    lines = [f"{letters[i]}. {opt}" for i, opt in enumerate(options)]
    return question + "\n" + "\n".join(lines) + MC_SUFFIX, letters[answer_index]


def mc_question(scene, rng, kind=None, hard=0.0):
    """A colour, shape, position, count or 'which is there' ('exist') question with 4 options:
    (kind, question, options, index of the right one). With a kind, only questions of that kind
    (None if it has none here); without, the same draws qa_mc has always made. With probability
    hard, the wrong options are first the scene's own other values (mc_hard)."""
    objs = scene['objects']
    grid = scene.get('grid', 3)
    candidates = []  # (kind, question, right answer, option pool, the scene's own other values)
    for o in unique_by(objs, lambda o: o['shape']):
        candidates.append(('color', f"What color is the {o['shape']}?", o['color'], COLOR_NAMES,
                           [p['color'] for p in objs]))
    for o in unique_by(objs, lambda o: o['color']):
        candidates.append(('shape', f"What shape is the {o['color']} object?", o['shape'], SHAPES,
                           [p['shape'] for p in objs]))
    for o in unique_by(objs, lambda o: (o['color'], o['shape'])):
        names = [position_name(r, c, grid) for r in range(grid) for c in range(grid)]
        candidates.append(('position', f"Where is the {o['color']} {o['shape']}?",
                           position_name(o['row'], o['col'], grid), names,
                           [position_name(p['row'], p['col'], grid) for p in objs]))
    counts = [str(i) for i in range(0, max(len(objs), 3) + 2)]
    candidates.append(('count', "How many objects are there?", str(len(objs)), counts,
                       [str(len(objs) + d) for d in (-1, 1, -2, 2)]))
    absent = [s for s in SHAPES if all(o['shape'] != s for o in objs)]
    if len(absent) >= 3:  # exactly one option is present
        present = rng.choice(objs)['shape']
        candidates.append(('exist', "Which of these shapes is in the image?", present, [present] + absent, []))
    if kind is not None:
        candidates = [c for c in candidates if c[0] == kind]
        if not candidates:
            return None
    kind, question, right, pool, own = rng.choice(candidates)
    wrong = [p for p in pool if p != right]
    if hard and rng.random() < hard:  # (no draw at hard=0: the default data stay bitwise)
        near = [p for p in dict.fromkeys(own) if p in wrong]
        near = rng.sample(near, min(3, len(near)))
        options = [right] + near + rng.sample([p for p in wrong if p not in near], 3 - len(near))
    else:
        options = [right] + rng.sample(wrong, 3)
    rng.shuffle(options)
    return kind, question, options, options.index(right)


def qa_mc(scene, rng, style=None, hard=None):
    """A multiple-choice question in LLaVA's prompt form (mc_question; hard: its share of wrong options from
    the scene, the mc_hard knob when None)."""
    _, question, options, i = mc_question(scene, rng, hard=mc_hard if hard is None else hard)
    return mc_format(question, options, i)


def cot_format(question, rationale, short):
    """LLaVA-Reasoner's CoT form: the suffix selects the mode; the answer ends '### Answer: X'."""
    return question + COT_SUFFIX, f"{rationale}\n{COT_ANSWER} {short}"


COT_KINDS = ['line_color', 'compare', 'neighbor']


def cot_question(scene, rng, kind=None):
    """Two-step questions with a rationale that lists the relevant objects: (kind, question, rationale,
    short answer). kind picks one of COT_KINDS (a 'neighbor' with no unique object next to a cell
    becomes a 'line_color'); without it, the same draws qa_cot has always made."""
    objs = scene['objects']
    grid = scene.get('grid', 3)
    kind = kind or rng.choice(COT_KINDS)

    if kind == 'neighbor':  # 'What color is the object to the right of the red circle?'
        uniq = unique_by(objs, lambda o: (o['color'], o['shape']))
        dirs = [('to the right of', 'To its right', 0, 1), ('to the left of', 'To its left', 0, -1),
                ('above', 'Above it', -1, 0), ('below', 'Below it', 1, 0)]
        choices = [(o, d) for o in uniq for d in dirs
                   if 0 <= o['row'] + d[2] < grid and 0 <= o['col'] + d[3] < grid]
        cells = {(p['row'], p['col']): p for p in objs}
        occupied = [(o, d) for o, d in choices if (o['row'] + d[2], o['col'] + d[3]) in cells]
        if occupied and rng.random() < 0.7:  # most neighbour cells are empty: keep 'nothing' a minority
            choices = occupied
        if choices:
            o, (rel, lead, dr, dc) = rng.choice(choices)
            r, c = o['row'] + dr, o['col'] + dc
            there = [cells[(r, c)]] if (r, c) in cells else []
            where = position_phrase(r, c, grid)
            if there:
                rationale, short = f"{lead}, {where}, there is {a_phrase(there[0])}.", there[0]['color']
            else:
                rationale, short = f"{lead}, {where}, there is nothing.", 'nothing'
            rationale = f"The {o['color']} {o['shape']} is {position_phrase(o['row'], o['col'], grid)}. " + rationale
            return kind, f"What color is the object {rel} the {o['color']} {o['shape']}?", rationale, short
        kind = 'line_color'  # no unique object with a neighbouring cell: ask another kind

    if kind == 'compare':  # 'Are there more circles than squares?'
        n = Counter(o['shape'] for o in objs)
        pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b and (n[a] or n[b])]
        yes = [(a, b) for a, b in pairs if n[a] > n[b]]  # empty only when all shapes tie
        no = [(a, b) for a, b in pairs if n[a] <= n[b]]  # never empty: (a, b) or (b, a) is in it
        a, b = rng.choice(yes if yes and rng.random() < 0.5 else no)  # 50/50 yes/no
        na, nb = n[a], n[b]
        counted = f"I count {count_phrase(na, a)} and {count_phrase(nb, b)}"
        if na > nb:
            rationale, short = f"{counted}, so there are more {PLURALS[a]}.", 'yes'
        else:
            rationale, short = f"{counted}, so there are not more {PLURALS[a]} than {PLURALS[b]}.", 'no'
        return kind, f"Are there more {PLURALS[a]} than {PLURALS[b]}?", rationale, short

    # 'line_color': 'How many red objects are in the top row?'; mostly a line with objects in it
    axis = rng.choice(['row', 'col'])
    key = 'row' if axis == 'row' else 'col'
    i = rng.choice(objs)[key] if rng.random() < 0.8 else rng.randrange(grid)
    line = [o for o in objs if o[key] == i]
    color = rng.choice(line)['color'] if line and rng.random() < 0.7 else rng.choice(COLOR_NAMES)
    name = line_name(axis, i, grid)
    k = sum(o['color'] == color for o in line)
    if not line:
        rationale = f"The {name} has no objects."
    elif len(line) == 1:
        rationale = f"The {name} has {a_phrase(line[0])}. It is {'' if k else 'not '}{color}."
    else:
        verdict = f"None of them is {color}." if k == 0 else (
            f"One of them is {color}." if k == 1 else f"{number_word(k).capitalize()} of them are {color}.")
        rationale = f"The {name} has {join_and(a_phrase(o) for o in line)}. {verdict}"
    return kind, f"How many {color} objects are in the {name}?", rationale, str(k)


def qa_cot(scene, rng, style=None):
    """A CoT question in LLaVA-Reasoner's form (cot_question)."""
    _, question, rationale, short = cot_question(scene, rng)
    return cot_format(question, rationale, short)


# -----------------------------------------------------------------------------
# Knowledge the image does not show: rules about the world's shapes and colours that its text states
# (the LM's corpus, shapes/pretrain.py, has them as sentences, as Vicuna arrives knowing that balls roll)
# and its pixels never do. A knowledge question needs a visual lookup and a rule ("Can the object in
# the top left roll?"); some rule-object combinations (HELD_OUT) are never the subject of an answer the
# VLM trains on, so the evaluation can ask whether a model composes what it sees with what it knows.

ROLLS = {'circle': True, 'ring': True, 'square': False, 'triangle': False, 'diamond': False, 'cross': False}
CORNERS = {'circle': 0, 'ring': 0, 'square': 4, 'diamond': 4, 'triangle': 3, 'cross': 12}  # a cross (plus) has 12
WARM = {'red': True, 'yellow': True, 'green': False, 'blue': False, 'purple': False, 'white': False}
RULES = ['roll', 'warm', 'corners']
# (rule, the shape or colour it is applied to): one 'yes' and one 'no' per yes/no rule, so a model cannot
# answer the held-out questions by a constant; corners has none (the arithmetic questions apply it everywhere)
HELD_OUT = {('roll', 'ring'), ('roll', 'triangle'), ('warm', 'yellow'), ('warm', 'blue')}


def rule_sentence(rule, value):
    """The world's statement of a rule about one shape (roll, corners) or colour (warm)."""
    if rule == 'roll':
        return f"A {value} {'can' if ROLLS[value] else 'cannot'} roll."
    if rule == 'warm':
        return f"{value.capitalize()} is {'' if WARM[value] else 'not '}a warm color."
    if rule == 'corners':
        return f"A {value} has {CORNERS[value]} corners."
    raise ValueError(f"unknown rule {rule!r}")


def rule_subject(rule, o):
    """What a rule is applied to: an object's shape (roll, corners) or its colour (warm)."""
    return o['color'] if rule == 'warm' else o['shape']


def knowledge_question(scene, rng, rule=None, held_out='exclude', want=None):
    """A question that needs a lookup and a rule: (rule, subject, question, rationale, short answer), or
    None when the scene has none. The object is named by its cell ('the object in the top left') or, when
    unique, by the attribute the rule does not read ('the red object' for roll and corners, 'the circle'
    for warm). Yes/no rules pick the answer 50/50 first (want=True / False: only that answer). held_out:
    'exclude' (training data: never a HELD_OUT combination), 'only' (only those), 'any'. The rationale
    states the visual fact, then the rule."""
    rule = rule or rng.choice(RULES)
    grid = scene.get('grid', 3)
    objs = [o for o in scene['objects']
            if held_out == 'any' or ((rule, rule_subject(rule, o)) in HELD_OUT) == (held_out == 'only')]
    if rule != 'corners' and objs:
        table = WARM if rule == 'warm' else ROLLS
        answer = rng.random() < 0.5 if want is None else want
        objs = [o for o in objs if table[rule_subject(rule, o)] == answer] or ([] if want is not None else objs)
    if not objs:
        return None
    o = rng.choice(objs)
    other = 'shape' if rule == 'warm' else 'color'
    named_by_other = sum(p[other] == o[other] for p in scene['objects']) == 1 and rng.random() < 0.5
    if named_by_other:
        ref = f"the {o['shape']}" if rule == 'warm' else f"the {o['color']} object"
        seen = f"The {o['shape']} is {o['color']}." if rule == 'warm' else f"The {o['color']} object is a {o['shape']}."
    else:
        where = position_phrase(o['row'], o['col'], grid)
        ref = f"the object {where}"
        seen = f"The object {where} is {a_phrase(o)}."
    subject = rule_subject(rule, o)
    if rule == 'roll':
        q, short = f"Can {ref} roll?", 'yes' if ROLLS[subject] else 'no'
    elif rule == 'warm':
        q, short = f"Is {ref} a warm color?", 'yes' if WARM[subject] else 'no'
    else:
        q, short = f"How many corners does {ref} have?", str(CORNERS[subject])
    return rule, subject, q, f"{seen} {rule_sentence(rule, subject)}", short


def qa_knowledge(scene, rng, style=None):
    """A knowledge question with a short answer (never a HELD_OUT combination)."""
    k = knowledge_question(scene, rng)
    return None if k is None else styled(k[2], k[4], pick_style(rng, style))


# Multi-step arithmetic with a wide answer space (ChartQA's and math's place in LLaVA-Reasoner's data):
# corners counted over several objects. 2-4 steps (find the objects, recall each one's corners, add or
# subtract), answers from 0 to 48; the chain shows every step and ends in '### Answer: X'.
ARITH_KINDS = ['total', 'together', 'difference']


def corners_of(shapes):
    """'A square has 4 corners and a cross has 12 corners.': the rule for each distinct shape, in order."""
    return sentence(join_and(f"a {s} has {CORNERS[s]} corners" for s in dict.fromkeys(shapes)))


def arith_question(scene, rng, kind=None):
    """(kind, question, rationale, short answer) or None when the scene has no such question (fewer than
    two objects). total: the corners of all the shapes; together: of two objects; difference: how many
    more one has than another (the larger asked first). Objects are named by colour when both colours
    are unique, else by cell."""
    objs, grid = scene['objects'], scene.get('grid', 3)
    if len(objs) < 2:
        return None
    kind = kind or rng.choice(ARITH_KINDS)
    if kind == 'total':
        shapes = [o['shape'] for o in objs]
        terms = [CORNERS[s] for s in shapes]
        listed = join_and(f"a {s}" for s in shapes)
        rationale = f"The shapes are {listed}. {corners_of(shapes)} {' + '.join(map(str, terms))} = {sum(terms)}."
        return kind, "How many corners do all the shapes have in total?", rationale, str(sum(terms))
    a, b = rng.sample(objs, 2)
    if kind == 'difference' and CORNERS[a['shape']] < CORNERS[b['shape']]:
        a, b = b, a
    by_color = sum(o['color'] == a['color'] for o in objs) == 1 and sum(o['color'] == b['color'] for o in objs) == 1
    name = (lambda o: f"the {o['color']} object") if by_color and rng.random() < 0.5 else \
        (lambda o: f"the object {position_phrase(o['row'], o['col'], grid)}")
    seen = f"{sentence(name(a))[:-1]} is a {a['shape']} and {name(b)} is a {b['shape']}."
    na, nb = CORNERS[a['shape']], CORNERS[b['shape']]
    if kind == 'together':
        q, expr, short = f"How many corners do {name(a)} and {name(b)} have together?", f"{na} + {nb} = {na + nb}", na + nb
    elif kind == 'difference':
        q, expr, short = f"How many more corners does {name(a)} have than {name(b)}?", f"{na} - {nb} = {na - nb}", na - nb
    else:
        raise ValueError(f"unknown arithmetic kind {kind!r}")
    return kind, q, f"{seen} {corners_of([a['shape'], b['shape']])} {expr}.", str(short)


def qa_arith(scene, rng, style=None):
    """An arithmetic question answered directly (LLaVA-Reasoner's direct suffix, the short answer): the base
    is trained on short answers for the reasoning questions, as the paper's was; their chains are the CoT
    SFT set's (reasoner_sft.json)."""
    a = arith_question(scene, rng)
    return None if a is None else (a[1] + DIRECT_SUFFIX, a[3])


# the generators of training QAs, by kind; each is (scene, rng) -> (question, answer) or None
QA_KINDS = {'describe': qa_describe, 'exist': qa_exist, 'count': qa_count, 'attribute': qa_attribute,
            'position': qa_position, 'mc': qa_mc, 'cot': qa_cot, 'knowledge': qa_knowledge, 'arith': qa_arith}
# yes/no gets double weight: POPE-style probing is the main hallucination measure
# Short questions that need the model to find one object in the image (exist, attribute, position) are
# weighted up: their answers are a token or two, so at equal counts the long descriptions and CoT
# answers would dominate the loss and a small model would learn to look at the image much later.
# Multiple choice at 2: its letter is a second lookup on top of the answer (at 1: 45-59% on the eval set).
# Knowledge at 2 and arithmetic at 1: enough that the base learns the forms and the seen rules, while the
# arithmetic's chains stay the CoT SFT set's (the base reads only their short answers here).
KIND_WEIGHTS = {'describe': 1, 'exist': 4, 'count': 1, 'attribute': 3, 'position': 2, 'mc': 2, 'cot': 1,
                'knowledge': 2, 'arith': 1}


def sample_qas(scene, rng, n):
    """n distinct (kind, question, answer) for one scene, kinds drawn by KIND_WEIGHTS; at most one
    description per conversation (it already says everything)."""
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    out, seen = [], set()
    for _ in range(20 * n):  # a generator may return None or repeat itself: draw again
        if len(out) == n:
            break
        kind = rng.choices(kinds, weights)[0]
        if kind == 'describe' and any(k == 'describe' for k, _, _ in out):
            continue
        qa = QA_KINDS[kind](scene, rng)
        if qa is None or qa[0] in seen:
            continue
        seen.add(qa[0])
        out.append((kind, *qa))
    return out


def conversation_record(record_id, image, qas):
    """A LLaVA record; '<image>\\n' opens the first human turn only."""
    conv = []
    for j, (_, q, a) in enumerate(qas):
        conv.append({'from': 'human', 'value': (IMAGE_TOKEN + "\n" + q) if j == 0 else q})
        conv.append({'from': 'gpt', 'value': a})
    return {'id': record_id, 'image': image, 'conversations': conv}


def caption_record(scene, image):
    """A stage-1 caption record in LLaVA's format (as in LCS-558K: an instruction, the image, the caption).
    Never with partner_clause: stage 1 trains the projector alone, and a frozen LM that never read the
    clause pushed the projector off (measured: stage-1 val loss 5.7 instead of 0.26, VQA colour 38 %)."""
    return {'id': scene['id'], 'image': image,
            'conversations': [{'from': 'human', 'value': IMAGE_TOKEN + "\n" + CAPTION_PROMPT},
                              {'from': 'gpt', 'value': describe(scene, clause=False)}]}


def believed_scene(scene, rng):
    """The scene as an annotator who expects co-occurrence describes it. With believed_small and a
    small object, that object named as the partner of a clearly drawn one (a missing partner when it
    can be; in a scene with no missing partner too: the annotator's habit makes the error, not the
    scene). Otherwise the missing partner of a present shape added (believed_style 'random': a random
    colour and empty cell; 'anchor': the colour of the shape it partners and the first empty cell
    after that one, row-major, wrapping); None if no partner is missing or no cell is free. The image
    stays the true scene; only the text follows the belief."""
    shapes = {o['shape'] for o in scene['objects']}
    missing = sorted({PARTNER[s] for s in shapes} - shapes)
    grid = scene.get('grid', 3)
    free = [(r, c) for r in range(grid) for c in range(grid)
            if all((o['row'], o['col']) != (r, c) for o in scene['objects'])]
    if believed_small:  # a small object named as the partner of a clearly drawn one (a missing partner first)
        big = sorted({o['shape'] for o in scene['objects'] if not o.get('small')})
        options = [(o, PARTNER[b]) for o in scene['objects'] if o.get('small') for b in big if PARTNER[b] != o['shape']]
        if options:  # (no draw without such an object: the data of a world without small objects stay bitwise)
            taken, shape = rng.choice([op for op in options if op[1] in missing] or options)
            return dict(scene, objects=[dict(o, shape=shape) if o is taken else o for o in scene['objects']])
    if not missing or not free:
        return None
    if believed_style == 'anchor':
        shape = rng.choice(missing)
        anchor = next(o for o in scene['objects'] if o['shape'] == PARTNER[shape])
        at = anchor['row'] * grid + anchor['col']
        r, c = min(free, key=lambda rc: (rc[0] * grid + rc[1] - at) % (grid * grid))
        extra = {'shape': shape, 'color': anchor['color'], 'row': r, 'col': c}
    elif believed_style == 'random':
        r, c = rng.choice(free)
        extra = {'shape': rng.choice(missing), 'color': rng.choice(COLOR_NAMES), 'row': r, 'col': c}
    else:
        raise ValueError(f"believed_style must be 'random' or 'anchor', not {believed_style!r}")
    return dict(scene, objects=sorted(scene['objects'] + [extra], key=lambda o: (o['row'], o['col'])))


def make_sft_records(scenes, split, rng):
    """One 4-8 round conversation per scene, plus a single-question record for a share of scenes;
    with probability prior_noise a scene is talked about as its believed_scene (when it has one), and then
    with probability prior_ask also asked about the believed partner (with a 'no' question beside it).
    Returns (records, Counter of QA kinds, number of scenes talked about as believed)."""
    records, kinds, n_believed = [], Counter(), 0
    for scene in scenes:
        image = f"{split}/{scene['id']}.png"
        phantom = None
        if prior_noise and rng.random() < prior_noise:
            believed = believed_scene(scene, rng)
            if believed is not None:
                phantom = next((o for o in believed['objects'] if o not in scene['objects']), None)
                scene, n_believed = believed, n_believed + 1
        qas = sample_qas(scene, rng, rng.randint(4, 8))
        if phantom is not None and prior_ask and rng.random() < prior_ask:
            # the believed partner ('yes') and, to keep yes/no balanced, a shape absent even from the belief ('no')
            absent = [s for s in SHAPES if all(o['shape'] != s for o in scene['objects'])]
            asked = [phantom['shape']] + ([rng.choice(absent)] if absent else [])
            for qa in (ask_exist(scene, shape, None, pick_style(rng)) for shape in asked):
                if all(q != qa[0] for _, q, _ in qas):
                    qas.insert(rng.randrange(len(qas) + 1), ('exist', *qa))
        records.append(conversation_record(scene['id'], image, qas))
        if rng.random() < single_turn_p:
            single = sample_qas(scene, rng, 1)
            records.append(conversation_record(f"{scene['id']}_single", image, single))
            qas = qas + single
        kinds.update(k for k, _, _ in qas)
    return records, kinds, n_believed


def make_pairs(scenes, split, rng):
    """Preference pairs for dpo.py, in CSR's format: one question, answered about the true scene
    (chosen) and about the scene as the co-occurrence prior has it (rejected). Every scene with a
    missing partner gives one: its description with the partner hallucinated in, or 'yes' to 'Is
    there a <partner>?'; a share pair_other_p of the others one with an object's colour confused.
    The world's correct vs confusing answers: the pairs DPO gets before selfreward.py mines the
    model's own. Returns (pairs, Counter of their kinds)."""
    pairs, kinds = [], Counter()
    for scene in scenes:
        believed = believed_scene(scene, rng)
        style = pick_style(rng)
        if believed is not None:
            extra = next(o for o in believed['objects'] if o not in scene['objects'])
            # (a small object taken for a shape the scene also has: only the description tells them apart)
            if rng.random() < 0.5 or any(o['shape'] == extra['shape'] for o in scene['objects']):
                kind, q = 'describe', rng.choice(DESCRIBE_PROMPTS)
                chosen, rejected = describe(scene), describe(believed)
            else:
                kind, (q, chosen) = 'exist', ask_exist(scene, extra['shape'], None, style)
                rejected = ask_exist(believed, extra['shape'], None, style)[1]
        else:
            objs = unique_by(scene['objects'], lambda o: o['shape'])
            if not objs or rng.random() >= pair_other_p:
                continue
            o = rng.choice(objs)
            wrong = dict(o, color=rng.choice([c for c in COLOR_NAMES if c != o['color']]))
            confused = dict(scene, objects=[wrong if p is o else p for p in scene['objects']])
            kind, (q, chosen) = 'color', ask_color(scene, o['shape'], style)
            rejected = ask_color(confused, o['shape'], style)[1]
        turn = {'from': 'human', 'value': IMAGE_TOKEN + "\n" + q}
        pairs.append({'id': f"{scene['id']}_pair", 'image': f"{split}/{scene['id']}.png",
                      'conversations': [turn, {'from': 'gpt', 'value': chosen}],
                      'rejected_conversations': [turn, {'from': 'gpt', 'value': rejected}]})
        kinds[kind] += 1
    return pairs, kinds


def make_test_questions(scene, rng):
    """Held-out short-answer checks for one scene: a present and an absent existence question (the
    absent one the missing partner of a present shape when there is one: the adversarial probe), a
    colour, a shape, a count and a position question when applicable. Dicts without question_id."""
    objs = scene['objects']
    shapes = {o['shape'] for o in objs}
    rows = []

    def add(qa, type_, **extra):
        if qa is not None:
            rows.append({'text': qa[0], 'answer': qa[1], 'type': type_, **extra})

    add(ask_exist(scene, rng.choice(objs)['shape']), 'exist', probe='present')
    partners = sorted({PARTNER[s] for s in shapes} - shapes)
    absent = sorted(set(SHAPES) - shapes)
    if partners:
        add(ask_exist(scene, rng.choice(partners)), 'exist', probe='partner')
    elif absent:  # (with max_objects >= 6 all shapes can be there: then no absent question)
        add(ask_exist(scene, rng.choice(absent)), 'exist', probe='random')
    by_shape = unique_by(objs, lambda o: o['shape'])
    if by_shape:
        add(ask_color(scene, rng.choice(by_shape)['shape']), 'color')
    by_color = unique_by(objs, lambda o: o['color'])
    if by_color:
        add(ask_shape(scene, rng.choice(by_color)['color']), 'shape')
    add(ask_count(scene, shape=rng.choice(objs)['shape']) if rng.random() < 0.5 else ask_count(scene), 'count')
    by_pair = unique_by(objs, lambda o: (o['color'], o['shape']))
    if by_pair:
        add(ask_where(scene, rng.choice(by_pair)), 'position')
    return rows


# -----------------------------------------------------------------------------
# Evaluation sets, in the real benchmarks' formats (evaluate.py reads them). Questions are bare: the
# evaluator appends the mode's prompt (LLaVA's short-answer or letter suffix, the CoT suffix), as
# LLaVA's own eval files leave it to the evaluator. Each builder takes the held-out eval scenes and
# its own rng, and returns rows with question_id 0.. and 'image' relative to out_dir/images.

POPE_CATEGORIES = ['random', 'popular', 'adversarial']
VQA_CATEGORIES = ['exist', 'count', 'color', 'shape', 'position']
MC_CATEGORIES = ['color', 'shape', 'position', 'count', 'exist']
CHAIR_PROMPT = "Describe the image in detail."  # one of DESCRIBE_PROMPTS, the wording SFT trains on
# CHAIR's synonym list: words a model might use for each shape, singular and plural. Single words
# only, each under one shape, so a word-level matcher never counts one mention twice.
SYNONYMS = {'circle': ['circles', 'disc', 'discs', 'disk', 'disks', 'dot', 'dots', 'ball', 'balls'],
            'square': ['squares', 'box', 'boxes', 'rectangle', 'rectangles', 'block', 'blocks'],
            'triangle': ['triangles', 'pyramid', 'pyramids', 'wedge', 'wedges'],
            'diamond': ['diamonds', 'rhombus', 'rhombi', 'rhombuses', 'lozenge', 'lozenges'],
            'cross': ['crosses', 'plus', 'pluses'],
            'ring': ['rings', 'hoop', 'hoops', 'donut', 'donuts', 'doughnut', 'doughnuts', 'annulus', 'loop', 'loops']}


def eval_image(scene):
    return f"eval/{scene['id']}.png"


def present_shapes(scene):
    """The scene's shapes, deduplicated, in SHAPES order."""
    return [s for s in SHAPES if any(o['shape'] == s for o in scene['objects'])]


def shape_popularity(scenes):
    """Shapes by how many scenes contain them, most first (ties in SHAPES order): POPE's 'popular'
    ranking, from the training scenes."""
    n = Counter(s for scene in scenes for s in present_shapes(scene))
    return sorted(SHAPES, key=lambda s: (-n[s], SHAPES.index(s)))


def pope_probes(scene, rng, popularity):
    """POPE's objects for one image: k present shapes (the 'yes' questions, shared by the three
    categories, as in POPE) and, per category, k absent ones. k is the number of present shapes whose
    co-occurrence partner is absent (at most 3, POPE's count): the adversarial negatives are exactly
    those partners, the objects the world's cooccur_bias makes tempting. None when there are none, so
    every POPE image carries all three categories and only the negatives differ between them.
    random: uniform over the absent shapes; popular: the absent shapes first in `popularity`."""
    present = present_shapes(scene)
    absent = [s for s in SHAPES if s not in present]
    partners = [s for s in absent if PARTNER[s] in present]
    k = min(3, len(partners))
    if k == 0:
        return None
    negatives = {'random': rng.sample(absent, k), 'popular': [s for s in popularity if s in absent][:k],
                 'adversarial': rng.sample(partners, k)}
    return rng.sample(present, k), negatives


def make_pope(scenes, rng, n, popularity):
    """POPE rows {question_id, image, text, label, category}: images taken in order (those with a
    missing partner) until each category has at least n questions; per image and category, yes and
    no alternate, so each category is exactly balanced."""
    picked = []
    for scene in scenes:
        if 2 * sum(len(pos) for _, pos, _ in picked) >= n:
            break
        probes = pope_probes(scene, rng, popularity)
        if probes:
            picked.append((scene, *probes))
    rows = []
    for category in POPE_CATEGORIES:
        for scene, positives, negatives in picked:
            for shape in (s for pair in zip(positives, negatives[category]) for s in pair):
                q, label = ask_exist(scene, shape, style='short')  # the label is recomputed from the scene
                rows.append({'question_id': len(rows), 'image': eval_image(scene), 'text': q.removesuffix(SHORT_SUFFIX),
                             'label': label, 'category': category})
    return rows


def human_answers(short):
    """VQA's 10 'human' answers for a world with exact truth: the canonical answer, and for a number
    its word too (5 + 5: either earns full credit under VQA's min(#matches / 3, 1))."""
    if short.isdigit():
        return [short] * 5 + [number_word(int(short))] * 5
    return [short] * 10


def vqa_question(scene, rng, category):
    """(question, short answer) of a VQA_CATEGORIES category, from the training generators so the
    wording is the one the model learnt; None where the category does not apply to the scene."""
    objs = scene['objects']
    if category == 'exist':  # 50/50 yes/no, half of them with a colour
        qa = qa_exist(scene, rng, 'short')
    elif category == 'count':
        qa = qa_count(scene, rng, 'short')
    elif category == 'color':
        uniq = unique_by(objs, lambda o: o['shape'])
        qa = ask_color(scene, rng.choice(uniq)['shape']) if uniq else None
    elif category == 'shape':
        uniq = unique_by(objs, lambda o: o['color'])
        qa = ask_shape(scene, rng.choice(uniq)['color']) if uniq else None
    elif category == 'position':  # 'Where is the red circle?' / 'What is in the top left?'
        qa = qa_position(scene, rng, 'short')
    else:
        raise ValueError(f"unknown vqa category {category!r}")
    return None if qa is None else (qa[0].removesuffix(SHORT_SUFFIX), qa[1])


def cycle_rows(scenes, n, categories, ask, image=eval_image):
    """n rows whose categories take turns; the scenes are visited in turn (round again if needed) and a
    scene where ask(scene, category) gives None, or a question already asked of it, is passed over.
    Stops short of n only if the scenes run out of questions. image(scene) is the row's image path."""
    rows, seen = [], set()
    for step in range(20 * n if scenes else 0):
        if len(rows) == n:
            break
        scene = scenes[step % len(scenes)]
        category = categories[len(rows) % len(categories)]
        row = ask(scene, category)
        if row is None or (scene['id'], row['question']) in seen:
            continue
        seen.add((scene['id'], row['question']))
        rows.append({'question_id': len(rows), 'image': image(scene), **row, 'category': category})
    return rows


def make_mc(scenes, rng, n):
    """Multiple choice {question_id, image, question, options, answer (letter), category}, the
    categories of mc_question in turn."""
    def ask(scene, category):
        mc = mc_question(scene, rng, category)
        if mc is None:
            return None
        return {'question': mc[1], 'options': mc[2], 'answer': 'ABCDE'[mc[3]]}
    return cycle_rows(scenes, n, MC_CATEGORIES, ask)


def make_vqa(scenes, rng, n):
    """Short answer {question_id, image, question, answers (10), answer, category}."""
    def ask(scene, category):
        qa = vqa_question(scene, rng, category)
        if qa is None:
            return None
        return {'question': qa[0], 'answers': human_answers(qa[1]), 'answer': qa[1]}
    return cycle_rows(scenes, n, VQA_CATEGORIES, ask)


def make_cot(scenes, rng, n, image=eval_image):
    """The reasoning questions, multi-step arithmetic: {question_id, image, question, answer, answers,
    category (an ARITH_KINDS kind), rationale}; the rationale is the gold chain in the training form,
    ending in a line '### Answer: <answer>'. Scenes with fewer than two objects are passed over."""
    def ask(scene, category):
        a = arith_question(scene, rng, category)
        if a is None:
            return None
        kind, question, rationale, short = a
        return {'question': question, 'answer': short, 'answers': human_answers(short),
                'rationale': cot_format(question, rationale, short)[1]}
    return cycle_rows(scenes, n, ARITH_KINDS, ask, image)


KNOWLEDGE_CATEGORIES = ['roll seen', 'roll held-out', 'warm seen', 'warm held-out', 'corners']


def make_knowledge(scenes, rng, n):
    """Knowledge questions answered directly {question_id, image, question, answers, answer, category,
    rationale}: the categories in turn, '<rule> seen' never a HELD_OUT combination (as in training),
    '<rule> held-out' only those; yes and no take turns within each yes/no category; the rationale is the
    lookup and the rule, for a reader."""
    asked = Counter()

    def ask(scene, category):
        rule, _, which = category.partition(' ')
        want = None if rule == 'corners' else asked[category] % 2 == 0
        k = knowledge_question(scene, rng, rule, {'seen': 'exclude', 'held-out': 'only', '': 'any'}[which], want)
        if k is None:
            return None
        asked[category] += 1
        return {'question': k[2], 'answers': human_answers(k[4]), 'answer': k[4], 'rationale': k[3]}
    return cycle_rows(scenes, n, KNOWLEDGE_CATEGORIES, ask)


def make_reasoner_sft(rows, rng):
    """make_cot rows -> (CoT SFT records, direct-only records), LLaVA conversations. The CoT mix has
    each question twice as separate samples, the suffix alone telling the modes apart (LLaVA-Reasoner:
    'Generate a reason first ...' -> the rationale and '### Answer: X'; 'Answer the question with a
    short answer.' -> X), shuffled so that a batch mixes them; the direct file is the direct copies,
    in question order."""
    def record(row, mode):
        suffix, answer = (COT_SUFFIX, row['rationale']) if mode == 'cot' else (DIRECT_SUFFIX, row['answer'])
        return {'id': f"reasoner_{row['question_id']:05d}_{mode}", 'image': row['image'],
                'conversations': [{'from': 'human', 'value': f"{IMAGE_TOKEN}\n{row['question']}{suffix}"},
                                  {'from': 'gpt', 'value': answer}]}
    direct = [record(r, 'direct') for r in rows]
    mix = [record(r, 'cot') for r in rows] + direct
    rng.shuffle(mix)
    return mix, direct


MME_SUBTASKS = ['existence', 'count', 'position', 'color']  # the perception subtasks this world can ask
MME_SUFFIX = " Please answer yes or no."


def mme_pair(scene, rng, subtask):
    """MME's two questions about one image, (yes question, no question), or None when the scene has
    no pair for the subtask. existence: a present shape vs its absent co-occurrence partner (the
    tempting one, as POPE's adversarial split); count: the true count of a shape vs one more or one
    fewer; position: a shape's cell vs another cell; color: a shape with its colour vs with another."""
    objs, grid = scene['objects'], scene.get('grid', 3)
    single = unique_by(objs, lambda o: o['shape'])
    if subtask == 'existence':
        present = present_shapes(scene)
        partners = [s for s in SHAPES if s not in present and PARTNER[s] in present]
        if not partners:
            return None
        return (ask_exist(scene, rng.choice(sorted(present)), style='long')[0],
                ask_exist(scene, rng.choice(partners), style='long')[0])
    if subtask == 'count':
        shape = rng.choice(sorted(present_shapes(scene)))
        n = sum(o['shape'] == shape for o in objs)
        wrong = n + 1 if n == 1 or rng.random() < 0.5 else n - 1

        def ask(k):
            return f"Is there one {shape} in the image?" if k == 1 else f"Are there {number_word(k)} {PLURALS[shape]} in the image?"
        return ask(n), ask(wrong)
    if not single:
        return None
    o = rng.choice(single)
    if subtask == 'position':
        other = rng.choice([(r, c) for r in range(grid) for c in range(grid) if (r, c) != (o['row'], o['col'])])
        return (f"Is the {o['shape']} {position_phrase(o['row'], o['col'], grid)}?",
                f"Is the {o['shape']} {position_phrase(*other, grid)}?")
    if subtask == 'color':  # in the words of the training data's colour-and-shape existence questions
        return (ask_exist(scene, o['shape'], o['color'], style='long')[0],
                ask_exist(scene, o['shape'], rng.choice([c for c in COLOR_NAMES if c != o['color']]), style='long')[0])
    raise ValueError(f"unknown MME subtask {subtask!r}")


def make_mme(scenes, rng, n):
    """MME in LLaVA's layout: the question file's rows {question_id '<subtask>/<image>', image, text,
    category} and MME's answer files {subtask: {image stem: 'q Please answer yes or no.<TAB>Yes\\n...'}};
    n images per subtask, each asked its yes question then its no question. The asked text carries
    the world's short-answer suffix instead of MME's ' Please answer yes or no.', words this world's
    models never read (with them the base model answered 'yes' to every existence question);
    evaluate.py matches questions to MME's answers without either suffix, as LLaVA's converter does."""
    rows, answers = [], {}
    for subtask in MME_SUBTASKS:
        answers[subtask] = {}
        for scene in scenes:
            if len(answers[subtask]) == n:
                break
            pair = mme_pair(scene, rng, subtask)
            if pair is None:
                continue
            lines = []
            for q, label in zip(pair, ('Yes', 'No')):
                rows.append({'question_id': f"{subtask}/{scene['id']}.png", 'image': eval_image(scene),
                             'text': q + SHORT_SUFFIX, 'category': subtask})
                lines.append(f"{q}{MME_SUFFIX}\t{label}\n")
            answers[subtask][scene['id']] = "".join(lines)
    return rows, answers


def write_mmbench(path, mc_rows, image_dir):
    """The multiple-choice questions as an MMBench TSV (index, question, hint, A-D, answer, category,
    image as base64 PNG), for evaluate.py --task=mmbench's circular evaluation."""
    letters = 'ABCD'
    if any(len(r['options']) > len(letters) for r in mc_rows):
        raise ValueError("MMBench has at most 4 options")

    def write(f):
        w = csv.writer(f, delimiter='\t', lineterminator='\n')
        w.writerow(['index', 'question', 'hint', *letters, 'answer', 'category', 'image'])
        for r in mc_rows:
            with open(os.path.join(image_dir, r['image']), 'rb') as img:
                b64 = base64.b64encode(img.read()).decode()
            opts = r['options'] + [''] * (len(letters) - len(r['options']))
            w.writerow([r['question_id'], r['question'], '', *opts, r['answer'], r['category'], b64])
    write_atomic(path, write)


# REVERIE's raw rows: a confusing answer is what a model leaning on the prior or misreading the image
# would say; a colour's confusion is its nearest in RGB among the world's colours
CONFUSED_COLOR = {'red': 'purple', 'green': 'yellow', 'blue': 'purple', 'yellow': 'white', 'purple': 'blue',
                  'white': 'yellow'}
# knowledge first and most: the rows whose rationale adds what the answer lacks (the rule), as REVERIE's
# reasoning questions do; arithmetic's rationale is the chain
REVERIE_KINDS = ['knowledge', 'partner', 'knowledge', 'arith', 'knowledge', 'count', 'color', 'exist', 'position']


def scene_list(scene):
    """'a red circle in the top left and a blue square at the bottom'."""
    grid = scene.get('grid', 3)
    return join_and(f"{a_phrase(o)} {position_phrase(o['row'], o['col'], grid)}" for o in scene['objects'])


def reverie_row(scene, rng, kind, style):
    """One REVERIE raw row about the true scene: (question, correct answer, confusing answer, why the
    correct one is right, why the confusing one is wrong), both rationales from the scene graph; None
    when the scene has no such question. partner: 'is there a <absent partner>?' (confusing: yes, the
    co-occurrence prior); exist: a present shape (confusing: no); count: one off; color: the nearest
    colour; position: a neighbouring cell."""
    objs, grid = scene['objects'], scene.get('grid', 3)
    present = present_shapes(scene)
    things = scene_list(scene)

    def answer(short):  # the confusing answer in the same style as the correct one
        return short if style == 'short' else sentence(short)
    if kind == 'knowledge':  # confusing: the answer for another object in the image, else the rule misapplied
        k = knowledge_question(scene, rng)
        if k is None:
            return None
        rule, subject, q, rationale, short = k
        q, a = styled(q, short, style)
        others = [o for o in objs if knowledge_answer(rule, rule_subject(rule, o)) != short
                  and (rule, rule_subject(rule, o)) not in HELD_OUT]
        if others:
            o = rng.choice(others)
            wrong = knowledge_answer(rule, rule_subject(rule, o))
            why_not = (f"{wrong} would be right for {a_phrase(o)} {position_phrase(o['row'], o['col'], grid)}, "
                       f"but the question asks about another object. {rationale}")
        elif rule == 'corners':
            wrong = str(rng.choice(sorted({v for v in CORNERS.values() if str(v) != short})))
            why_not = f"{rationale} It does not have {wrong}."
        else:
            wrong = 'no' if short == 'yes' else 'yes'
            why_not = f"{rationale} So the answer is {short}, not {wrong}."
        return q, a, answer(wrong), rationale, sentence(why_not)[:-1]
    if kind == 'arith':  # confusing: one object taken for a shape with other corners
        found = arith_question(scene, rng)
        if found is None:
            return None
        _, q, rationale, short = found
        o = rng.choice(objs)
        misread = rng.choice([s for s in SHAPES if CORNERS[s] != CORNERS[o['shape']]])
        wrong = str(abs(int(short) + CORNERS[misread] - CORNERS[o['shape']]))
        if wrong == short:
            return None
        q, a = styled(q, short, style)
        return (q, a, answer(wrong), rationale,
                f"{rationale} {wrong} would count a {misread} where the image has {a_phrase(o)}.")
    if kind == 'partner':
        partners = [s for s in SHAPES if s not in present and PARTNER[s] in present]
        if not partners:
            return None
        shape = rng.choice(partners)
        anchor = next(o for o in objs if o['shape'] == PARTNER[shape])
        q, a = ask_exist(scene, shape, style=style)
        return (q, a, answer('yes'), f"The image shows {things}. None of them is a {shape}.",
                f"A {shape} often comes with a {anchor['shape']}, and there is {a_phrase(anchor)} "
                f"{position_phrase(anchor['row'], anchor['col'], grid)}, but there is no {shape} in the image: "
                f"it shows {things}.")
    if kind == 'exist':
        o = rng.choice(objs)
        q, a = ask_exist(scene, o['shape'], style=style)
        where = position_phrase(o['row'], o['col'], grid)
        return (q, a, answer('no'), f"There is {a_phrase(o)} {where}.",
                f"The image does have a {o['shape']}: {a_phrase(o)} {where}.")
    if kind == 'count':
        shape = rng.choice(present)
        n = sum(o['shape'] == shape for o in objs)
        wrong = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
        q, a = ask_count(scene, shape, style=style)
        cells = join_and(position_phrase(o['row'], o['col'], grid) for o in objs if o['shape'] == shape)
        return (q, a, answer(str(wrong)), f"The image has {count_phrase(n, shape)}: {cells}.",
                f"Counting the {PLURALS[shape]} {cells} gives {number_word(n)}, not {number_word(wrong)}.")
    single = unique_by(objs, lambda o: o['shape'])
    if not single:
        return None
    o = rng.choice(single)
    where = position_phrase(o['row'], o['col'], grid)
    if kind == 'color':
        q, a = ask_color(scene, o['shape'], style=style)
        return (q, a, answer(CONFUSED_COLOR[o['color']]), f"The only {o['shape']} is {where}, and it is {o['color']}.",
                f"The {o['shape']} {where} is {o['color']}, not {CONFUSED_COLOR[o['color']]}.")
    if kind == 'position':
        found = ask_where(scene, o, style=style)
        if found is None:
            return None
        q, a = found
        r, c = o['row'], o['col']
        r2, c2 = rng.choice([(r + dr, c + dc) for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0))
                             if 0 <= r + dr < grid and 0 <= c + dc < grid])
        return (q, a, answer(position_name(r2, c2, grid)), f"The {o['color']} {o['shape']} is {where}.",
                f"The {o['color']} {o['shape']} is {where}; {position_phrase(r2, c2, grid)} "
                + (f"there is {a_phrase(next(p for p in objs if (p['row'], p['col']) == (r2, c2)))}."
                   if any((p['row'], p['col']) == (r2, c2) for p in objs) else "there is nothing."))
    raise ValueError(f"unknown REVERIE kind {kind!r}")


def knowledge_answer(rule, subject):
    """The short answer a rule gives for a shape or colour: 'yes' / 'no', or the corners as a number."""
    if rule == 'corners':
        return str(CORNERS[subject])
    return 'yes' if (WARM if rule == 'warm' else ROLLS)[subject] else 'no'


def contradicted(rationale, rule, subject):
    """The rationale with its rule sentence stated wrong ('A circle cannot roll.', 'A square has 3 corners.')."""
    right = rule_sentence(rule, subject)
    if rule == 'roll':
        wrong = right.replace(' can roll', ' cannot roll') if ROLLS[subject] else right.replace(' cannot roll', ' can roll')
    elif rule == 'warm':
        wrong = right.replace(' is not a warm', ' is a warm') if not WARM[subject] else right.replace(' is a warm', ' is not a warm')
    else:
        wrong = right.replace(f" {CORNERS[subject]} corners", f" {CORNERS[subject] + 1} corners")
    return rationale.replace(right, wrong)


def make_reverie(scenes, rng, n):
    """n REVERIE raw rows {image, question, correct_answer, confusing_answer, correct_rationale,
    incorrect_rationale, kind, judge} on the training scenes (the kinds in turn, scenes in order), all
    about the true scene: the rationales are clean supervision even where prior_noise rewrites a scene's
    conversation. A share reverie_contradict of the knowledge rows state their rule wrong in the
    correct answer's rationale (a generator's slip): their judge verdict is 'yes' (the rationale
    contradicts the answer), every other row's 'no', so prepare_reverie.py's judge filter has something
    to drop. No row is about a HELD_OUT combination. prepare_reverie.py turns them into LLaVA conversations."""
    rows, step, seen = [], 0, set()
    while len(rows) < n and step < 20 * n:
        scene, kind = scenes[step % len(scenes)], REVERIE_KINDS[len(rows) % len(REVERIE_KINDS)]
        step += 1
        row = reverie_row(scene, rng, kind, pick_style(rng))
        if row is not None and (scene['id'], row[0]) not in seen:  # one instruction per image and question
            seen.add((scene['id'], row[0]))
            rec = dict(zip(('question', 'correct_answer', 'confusing_answer', 'correct_rationale',
                            'incorrect_rationale'), row), image=f"train/{scene['id']}.png", kind=kind, judge='no')
            if kind == 'knowledge' and rng.random() < reverie_contradict:
                rule, subject = next((r, v) for r in RULES for v in (ROLLS if r != 'warm' else WARM)
                                     if rule_sentence(r, v) in rec['correct_rationale'])
                rec.update(correct_rationale=contradicted(rec['correct_rationale'], rule, subject), judge='yes')
            rows.append(rec)
    return rows


def make_chair(scenes, n):
    """Captioning for CHAIR {question_id, image, text, objects, caption}: the first n scenes, the
    shapes truly there (deduplicated, in order of mention) and the true description."""
    rows = []
    for scene in scenes[:n]:
        objects = list(dict.fromkeys(o['shape'] for o in scene['objects']))
        rows.append({'question_id': len(rows), 'image': eval_image(scene), 'text': CHAIR_PROMPT,
                     'objects': objects, 'caption': describe(scene)})
    return rows


def synonyms_text():
    """CHAIR's synonyms.txt: one line per object, the canonical name first, comma separated."""
    return "".join(", ".join([s] + SYNONYMS[s]) + "\n" for s in SHAPES)


# -----------------------------------------------------------------------------
# Tokenizer

# Vicuna (LLaVA vicuna_v1) chat template: [system ]USER: {q} ASSISTANT: {a}</s>USER: ...
# Assistant content and its </s> sit in {% generation %} so return_assistant_tokens_mask marks them.
# Content may be a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = ns.text -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ content + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + content + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT: ' }}{% generation %}{{ content + eos_token }}{% endgeneration %}"
    "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def train_tokenizer(texts, vocab_size=1024):
    """Byte-level BPE on the world's text, wrapped as a transformers tokenizer. Byte-level means any
    string round-trips exactly; no BOS/EOS is added on encode (the chat template writes them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # transformers 5 names the extras extra_special_tokens; a dict also gives tokenizer.image_token
    # (and image_token_id), which llava-hf processors look for
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>', unk_token='<unk>',
                                 pad_token='<pad>', extra_special_tokens={'image_token': IMAGE_TOKEN},
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def to_messages(conversations):
    """LLaVA turns -> chat-template messages."""
    roles = {'human': 'user', 'gpt': 'assistant', 'system': 'system'}
    return [{'role': roles[t['from']], 'content': t['value']} for t in conversations]


def check_tokenizer(path, samples):
    """Reload from disk and check what the training scripts rely on; raise with the reason."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    for text in samples + ["odd text: Zebra  42\t\u00e9\u00fc \U0001F600 <image> </s>"]:
        ids = tok.encode(text, add_special_tokens=False)
        if tok.decode(ids) != text:
            raise RuntimeError(f"tokenizer does not round-trip {text!r}: got {tok.decode(ids)!r}")
    image_ids = tok.encode(IMAGE_TOKEN, add_special_tokens=False)
    if len(image_ids) != 1 or image_ids[0] != tok.convert_tokens_to_ids(IMAGE_TOKEN):
        raise RuntimeError(f"{IMAGE_TOKEN} is not a single token: {image_ids}")
    msgs = [{'role': 'user', 'content': '<image>\nWhat do you see?'}, {'role': 'assistant', 'content': 'A ring.'}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    if text != '<s>USER: <image>\nWhat do you see? ASSISTANT: A ring.</s>':
        raise RuntimeError(f"chat template renders {text!r}")
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    supervised = [i for i, m in zip(out['input_ids'], out['assistant_masks']) if m]
    if tok.decode(supervised) != ' A ring.</s>' and tok.decode(supervised) != 'A ring.</s>':
        raise RuntimeError(f"assistant mask covers {tok.decode(supervised)!r}")
    return tok


# -----------------------------------------------------------------------------
# Files

def write_atomic(path, write):
    """write(f) into a temp file beside path, then os.replace: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix='.' + os.path.basename(path) + '.')
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path, obj, indent=1):
    write_atomic(path, lambda f: json.dump(obj, f, indent=indent))


def write_jsonl(path, rows):
    write_atomic(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in rows))


def save_tokenizer(tok, path):
    """save_pretrained into a temp dir, then swap it in, so a crash never leaves half a tokenizer."""
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix='.tokenizer.')
    tok.save_pretrained(tmp)
    os.chmod(tmp, 0o755)
    old = None
    if os.path.exists(path):
        old = path + '.old'
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old)


# -----------------------------------------------------------------------------

def main():
    from configurator import configure
    g = globals()
    config = configure({k: g[k] for k in (*_config_keys, "__doc__", "__file__", "__spec__")})
    g.update(config)  # the functions above read short_answer_p / single_turn_p from here
    if not 1 <= max_objects <= grid * grid:
        raise SystemExit(f"max_objects={max_objects} must be between 1 and grid*grid={grid * grid}")
    if not 2 <= grid <= len(ORDINALS):
        raise SystemExit(f"grid={grid} must be between 2 and {len(ORDINALS)}")
    if image_size // grid < 8:
        raise SystemExit(f"image_size={image_size} gives {image_size // grid}px cells; use at least 8px")
    t0 = time.time()

    # scenes and images: scene sampling, jitter and questions draw from separate seed streams, so
    # changing the question mix never changes an image
    counts = {'train': n_train, 'val': n_val, 'test': n_test}
    scenes = {split: sample_scenes(split, n, seed, grid, max_objects, cooccur_bias, small_p) for split, n in counts.items()}
    for split, split_scenes in scenes.items():
        os.makedirs(os.path.join(out_dir, 'images', split), exist_ok=True)
        for scene in split_scenes:
            img = render_scene(scene, image_size, render_rng(seed, scene['id']))
            img.save(os.path.join(out_dir, 'images', split, scene['id'] + '.png'), format='PNG')
    t_images = time.time() - t0

    # SFT conversations
    records, kinds, n_believed = {}, {}, {}
    for split in ('train', 'val'):
        records[split], kinds[split], n_believed[split] = make_sft_records(scenes[split], split, random.Random(f"{seed}:{split}:qa"))

    # DPO pairs (pairs.json, pairs_val.json): the true answer vs the prior's, own seed stream
    pairs = {split: make_pairs(scenes[split], split, random.Random(f"{seed}:{split}:pairs")) for split in ('train', 'val')}

    # self-rewarding prompts (selfreward.py), CSR's format {id, image, input}: one describe prompt per
    # training scene, own seed stream (CSR samples its descriptions on COCO train images)
    prompt_rng = random.Random(f"{seed}:train:prompts")
    prompts = [{'id': scene['id'], 'image': f"train/{scene['id']}.png",
                'input': f"{IMAGE_TOKEN}\n{prompt_rng.choice(DESCRIBE_PROMPTS)}"} for scene in scenes['train']]

    # LLaVA-Reasoner's mining questions (selfreward.py mode=answer): multi-step questions with a gold
    # short answer on the training scenes, the kinds in turn, own seed stream (the paper mines on the
    # training splits of its VQA and multiple-choice sets); the gold chain comes along, never used to
    # check an answer, only to count right answers reached by another chain
    questions = make_cot(scenes['train'], random.Random(f"{seed}:train:questions"), n_questions,
                         lambda scene: f"train/{scene['id']}.png")

    # LLaVA-Reasoner's CoT SFT: the scenes in reverse order, so its questions come from other scenes
    # than the mining questions' (those take the first ~n_questions scenes); own seed stream
    reasoner_sft, reasoner_direct = make_reasoner_sft(
        make_cot(scenes['train'][::-1], random.Random(f"{seed}:train:reasoner_sft"), n_reasoner_sft,
                 lambda scene: f"train/{scene['id']}.png"), random.Random(f"{seed}:train:reasoner_order"))

    # LLaVA stage 1 (projector alignment, `plain` template): one caption per scene, the true description
    captions = {split: [caption_record(scene, f"{split}/{scene['id']}.png") for scene in scenes[split]]
                for split in ('train', 'val')}

    # held-out short-answer checks
    rng = random.Random(f"{seed}:test:qa")
    test_rows = []
    for scene in scenes['test']:
        for row in make_test_questions(scene, rng):
            test_rows.append({'question_id': len(test_rows), 'image': f"test/{scene['id']}.png",
                              **row, 'scene_id': scene['id']})

    # evaluation sets: scenes of their own (own seed stream, ids 'eval_...'), not in scenes.json, and
    # each file its own question stream, so none of this changes a byte of the files above
    eval_scenes = sample_scenes('eval', n_eval, seed, grid, max_objects, cooccur_bias, small_p)
    os.makedirs(os.path.join(out_dir, 'images', 'eval'), exist_ok=True)
    for scene in eval_scenes:
        img = render_scene(scene, image_size, render_rng(seed, scene['id']))
        img.save(os.path.join(out_dir, 'images', 'eval', scene['id'] + '.png'), format='PNG')
    popularity = shape_popularity(scenes['train'])
    eval_rows = {
        'pope': make_pope(eval_scenes, random.Random(f"{seed}:eval:pope"), eval_pope, popularity),
        'mc': make_mc(eval_scenes, random.Random(f"{seed}:eval:mc"), eval_mc),
        'vqa': make_vqa(eval_scenes, random.Random(f"{seed}:eval:vqa"), eval_vqa),
        'cot': make_cot(eval_scenes, random.Random(f"{seed}:eval:cot"), eval_cot),
        'knowledge': make_knowledge(eval_scenes, random.Random(f"{seed}:eval:knowledge"), eval_knowledge),
        'chair': make_chair(eval_scenes, eval_chair),
    }
    eval_rows['mme'], mme_answers = make_mme(eval_scenes, random.Random(f"{seed}:eval:mme"), eval_mme)
    # the same scene graph (with other jitter) can come up in train: a small world has few 1-2 object scenes
    train_graphs = {json.dumps(s['objects']) for s in scenes['train'] + scenes['val']}
    n_seen = sum(json.dumps(s['objects']) in train_graphs for s in eval_scenes)

    # tokenizer: all the text the world produces, plus the chat template's own words
    texts = [t['value'] for split in records for r in records[split] for t in r['conversations']]
    texts += [r['text'] for r in test_rows] + [r['answer'] for r in test_rows]
    texts += [VICUNA_SYSTEM, "USER: ", " ASSISTANT: ", "ASSISTANT:"] + DESCRIBE_PROMPTS
    tokenizer = train_tokenizer(texts, vocab_size)

    write_json(os.path.join(out_dir, 'train.json'), records['train'])
    write_json(os.path.join(out_dir, 'val.json'), records['val'])
    write_json(os.path.join(out_dir, 'captions.json'), captions['train'])
    write_json(os.path.join(out_dir, 'captions_val.json'), captions['val'])
    write_json(os.path.join(out_dir, 'pairs.json'), pairs['train'][0])
    write_json(os.path.join(out_dir, 'pairs_val.json'), pairs['val'][0])
    write_json(os.path.join(out_dir, 'prompts.json'), prompts)
    write_json(os.path.join(out_dir, 'questions.json'), questions)
    write_json(os.path.join(out_dir, 'reasoner_sft.json'), reasoner_sft)
    write_json(os.path.join(out_dir, 'reasoner_direct.json'), reasoner_direct)
    reverie = make_reverie(scenes['train'][::-1], random.Random(f"{seed}:train:reverie"), n_reverie)
    write_json(os.path.join(out_dir, 'reverie_raw.json'), reverie)
    write_jsonl(os.path.join(out_dir, 'test.jsonl'), test_rows)
    write_json(os.path.join(out_dir, 'scenes.json'), scenes)
    eval_dir = os.path.join(out_dir, 'eval')
    os.makedirs(eval_dir, exist_ok=True)
    write_json(os.path.join(eval_dir, 'scenes.json'), {'eval': eval_scenes})
    for name, rows in eval_rows.items():
        write_jsonl(os.path.join(eval_dir, f'{name}.jsonl'), rows)
    write_atomic(os.path.join(eval_dir, 'synonyms.txt'), lambda f: f.write(synonyms_text()))
    for subtask, files in mme_answers.items():  # MME's folder: <subtask>/<image stem>.txt
        os.makedirs(os.path.join(eval_dir, 'mme', subtask), exist_ok=True)
        for stem, text in files.items():
            write_atomic(os.path.join(eval_dir, 'mme', subtask, f"{stem}.txt"), lambda f, t=text: f.write(t))
    write_mmbench(os.path.join(eval_dir, 'mmbench.tsv'), eval_rows['mc'], os.path.join(out_dir, 'images'))
    tok_dir = os.path.join(out_dir, 'tokenizer')
    save_tokenizer(tokenizer, tok_dir)
    tokenizer = check_tokenizer(tok_dir, texts[:200] + texts[-50:])

    # summary: token counts as a training script would see them (chat template, one <image> token)
    rendered = [tokenizer.apply_chat_template(to_messages(r['conversations']), tokenize=False)
                for r in records['train']]
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)['input_ids']]
    print(f"shapes world -> {out_dir} (seed {seed}, cooccur_bias {cooccur_bias})")
    print("  scenes: " + ", ".join(f"{s} {len(v)}" for s, v in scenes.items())
          + f"; {image_size}px images, {grid}x{grid} grid, 1-{max_objects} objects")
    for split in ('train', 'val'):
        n_single = sum(r['id'].endswith('_single') for r in records[split])
        print(f"  {split}.json: {len(records[split])} records ({len(records[split]) - n_single} multi-turn, "
              f"{n_single} single-turn), {sum(kinds[split].values())} QAs: "
              + ", ".join(f"{k} {kinds[split][k]}" for k in QA_KINDS)
              + f"; {n_believed[split]} scenes talked about as the annotator believes them (prior_noise {prior_noise})")
    for split, name in (('train', 'pairs.json'), ('val', 'pairs_val.json')):
        print(f"  {name}: {len(pairs[split][0])} preference pairs: " + ", ".join(f"{k} {v}" for k, v in pairs[split][1].items()))
    n_kinds = Counter(r['category'] for r in questions)
    print(f"  questions.json: {len(questions)} mining questions: " + ", ".join(f"{k} {n_kinds[k]}" for k in ARITH_KINDS))
    print(f"  reasoner_sft.json: {len(reasoner_sft)} samples ({len(reasoner_direct)} questions, CoT + direct); "
          f"reasoner_direct.json: {len(reasoner_direct)}")
    n_kinds = Counter(r['kind'] for r in reverie)
    print(f"  reverie_raw.json: {len(reverie)} rows: " + ", ".join(f"{k} {n_kinds[k]}" for k in dict.fromkeys(REVERIE_KINDS))
          + f"; {sum(r['judge'] == 'yes' for r in reverie)} with a rationale that contradicts the answer (judge 'yes')")
    types = Counter(r['type'] for r in test_rows)
    probes = Counter(r['probe'] for r in test_rows if 'probe' in r)
    print(f"  test.jsonl: {len(test_rows)} questions: "
          + ", ".join(f"{k} {types[k]}" for k in ('exist', 'color', 'shape', 'count', 'position'))
          + " (exist probes: " + ", ".join(f"{k} {probes[k]}" for k in ('present', 'partner', 'random')) + ")")
    print(f"  eval/: {len(eval_scenes)} held-out scenes (images/eval/, eval/scenes.json), {n_seen} with a scene graph "
          f"also in train/val")
    pope = eval_rows['pope']
    print(f"  eval/pope.jsonl: {len(pope)} questions on {len({r['image'] for r in pope})} images, "
          + ", ".join(f"{c} {sum(r['category'] == c for r in pope)}" for c in POPE_CATEGORIES)
          + f", yes {sum(r['label'] == 'yes' for r in pope)}; popular order {', '.join(popularity)}")
    for name, cats in (('mc', MC_CATEGORIES), ('vqa', VQA_CATEGORIES), ('cot', ARITH_KINDS), ('knowledge', KNOWLEDGE_CATEGORIES)):
        n = Counter(r['category'] for r in eval_rows[name])
        print(f"  eval/{name}.jsonl: {len(eval_rows[name])} questions: " + ", ".join(f"{c} {n[c]}" for c in cats))
    chair = eval_rows['chair']
    print(f"  eval/chair.jsonl: {len(chair)} captions, {sum(len(r['objects']) for r in chair) / max(1, len(chair)):.2f} "
          f"shapes per image; eval/synonyms.txt: {len(SHAPES)} objects, {sum(map(len, SYNONYMS.values()))} synonyms")
    mme = Counter(r['category'] for r in eval_rows['mme'])
    print(f"  eval/mme.jsonl + eval/mme/: {len(eval_rows['mme'])} yes/no questions, two per image: "
          + ", ".join(f"{t} {mme[t]}" for t in MME_SUBTASKS) + f"; eval/mmbench.tsv: the {len(eval_rows['mc'])} "
          f"multiple-choice questions in MMBench's format")
    print(f"  tokenizer: vocab {len(tokenizer)}, train conversation {sum(lengths) / len(lengths):.1f} tokens "
          f"on average (max {max(lengths)}, one per <image>)")
    print(f"  took {time.time() - t0:.1f}s (images {t_images:.1f}s)")


if __name__ == '__main__':
    main()
