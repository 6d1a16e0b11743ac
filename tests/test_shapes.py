"""Tests of the shapes world (shapes/prepare.py): determinism, rendering, answer truth, co-occurrence,
the file formats and the tokenizer. The truth of every answer is recomputed here from the scene graph
by parsing the question text, independently of the generators that wrote it."""

import base64
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from shapes import prepare as ps  # noqa: E402

SHORT = "\nAnswer the question using a single word or phrase."
MC = "\nAnswer with the option's letter from the given choices directly."
COT = "\nGenerate a reason first and then output a short answer."
DIRECT = "\nAnswer the question with a short answer."
# the world's knowledge, written out again: which shapes roll, their corners, the warm colours
ROLLING, WARM_COLORS = {'circle', 'ring'}, {'red', 'yellow'}
CORNER_COUNT = {'circle': 0, 'ring': 0, 'square': 4, 'diamond': 4, 'triangle': 3, 'cross': 12}
# the 3x3 cell names, written out again here so the tests do not trust the module's tables
CELLS = {'top left': (0, 0), 'top': (0, 1), 'top right': (0, 2), 'left': (1, 0), 'center': (1, 1),
         'right': (1, 2), 'bottom left': (2, 0), 'bottom': (2, 1), 'bottom right': (2, 2)}
LINES = {'top row': ('row', 0), 'middle row': ('row', 1), 'bottom row': ('row', 2),
         'left column': ('col', 0), 'middle column': ('col', 1), 'right column': ('col', 2)}
SINGULAR = {'circles': 'circle', 'squares': 'square', 'triangles': 'triangle', 'diamonds': 'diamond',
            'crosses': 'cross', 'rings': 'ring'}
SMALL = ['--n_train=50', '--n_val=10', '--n_test=20', '--prior_noise=0']  # answers checked against the truth
EVAL_FILES = ['pope.jsonl', 'mc.jsonl', 'vqa.jsonl', 'cot.jsonl', 'chair.jsonl', 'synonyms.txt', 'scenes.json',
              'mme.jsonl', 'mmbench.tsv', 'knowledge.jsonl']
NUMBERS = {'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5', 'six': '6', 'seven': '7',
           'eight': '8', 'nine': '9', 'ten': '10', 'eleven': '11', 'twelve': '12'}


def run_script(out_dir, *args):
    return subprocess.run([sys.executable, '-m', 'shapes.prepare', f'--out_dir={out_dir}', *SMALL, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The script run twice with the same seed and once with another, in parallel (each run is
    mostly transformers' import)."""
    dirs = [tmp_path_factory.mktemp(name) for name in ('shapes_a', 'shapes_b', 'shapes_seed7')]
    args = [(), (), ('--seed=7',)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda d, a: run_script(d, *a), dirs, args))
    for r in results:
        assert r.returncode == 0, r.stdout + r.stderr
    return dirs


@pytest.fixture(scope='module')
def built(runs):
    return runs[:2]


# -----------------------------------------------------------------------------
# truth, recomputed from the scene

def objects_at(scene, cell):
    return [o for o in scene['objects'] if (o['row'], o['col']) == cell]


def the(scene, **attrs):
    """The one object matching attrs (the question promised it is unique)."""
    found = [o for o in scene['objects'] if all(o[k] == v for k, v in attrs.items())]
    assert len(found) == 1, (attrs, scene)
    return found[0]


def referent(scene, ref):
    """The object a knowledge or arithmetic question names: 'the object in the top left', 'the red
    object' (a unique colour) or 'the circle' (a unique shape)."""
    if m := re.fullmatch(r"the object (?:in|at|on) the (.+)", ref):
        here = objects_at(scene, CELLS[m[1]])
        assert len(here) == 1, ref
        return here[0]
    if m := re.fullmatch(r"the (\w+) object", ref):
        return the(scene, color=m[1])
    return the(scene, shape=re.fullmatch(r"the (\w+)", ref)[1])


def truth(scene, q):
    """The bare short answer of a question (suffixes stripped), from the scene graph."""
    objs = scene['objects']
    if m := re.fullmatch(r"Can (.+) roll\?", q):
        return 'yes' if referent(scene, m[1])['shape'] in ROLLING else 'no'
    if m := re.fullmatch(r"Is (.+) a warm color\?", q):
        return 'yes' if referent(scene, m[1])['color'] in WARM_COLORS else 'no'
    if m := re.fullmatch(r"How many corners does (.+) have\?", q):
        return str(CORNER_COUNT[referent(scene, m[1])['shape']])
    if q == "How many corners do all the shapes have in total?":
        return str(sum(CORNER_COUNT[o['shape']] for o in objs))
    if m := re.fullmatch(r"How many corners do (.+) and (.+) have together\?", q):
        return str(sum(CORNER_COUNT[referent(scene, r)['shape']] for r in m.groups()))
    if m := re.fullmatch(r"How many more corners does (.+) have than (.+)\?", q):
        a, b = (CORNER_COUNT[referent(scene, r)['shape']] for r in m.groups())
        assert a >= b, q
        return str(a - b)
    if m := re.fullmatch(r"Is there a (?:(\w+) )?(\w+) in the image\?", q):
        color, shape = m.groups()
        return 'yes' if any(o['shape'] == shape and color in (None, o['color']) for o in objs) else 'no'
    if q == "How many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"How many (\w+) are there\?", q):
        return str(sum(o['shape'] == SINGULAR[m[1]] for o in objs))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", q):
        return str(sum(o['color'] == m[1] for o in objs))
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        return the(scene, shape=m[1])['color']
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        return the(scene, color=m[1])['shape']
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
        o = the(scene, color=m[1], shape=m[2])
        return {v: k for k, v in CELLS.items()}[(o['row'], o['col'])]
    if m := re.fullmatch(r"What is (?:in|at|on) the (.+)\?", q):
        here = objects_at(scene, CELLS[m[1]])
        return f"{here[0]['color']} {here[0]['shape']}" if here else 'nothing'
    if m := re.fullmatch(r"How many (\w+) objects are in the (\w+ (?:row|column))\?", q):
        key, i = LINES[m[2]]
        return str(sum(o[key] == i and o['color'] == m[1] for o in objs))
    if m := re.fullmatch(r"Are there more (\w+) than (\w+)\?", q):
        na, nb = (sum(o['shape'] == SINGULAR[p] for o in objs) for p in m.groups())
        return 'yes' if na > nb else 'no'
    if m := re.fullmatch(r"What color is the object (to the right of|to the left of|above|below) the (\w+) (\w+)\?", q):
        o = the(scene, color=m[2], shape=m[3])
        dr, dc = {'to the right of': (0, 1), 'to the left of': (0, -1), 'above': (-1, 0), 'below': (1, 0)}[m[1]]
        here = objects_at(scene, (o['row'] + dr, o['col'] + dc))
        return here[0]['color'] if here else 'nothing'
    raise AssertionError(f"unknown question {q!r}")


def check_description(scene, text):
    said = []
    shapes = {o['shape'] for o in scene['objects']}
    for s in text.split('. '):
        m = re.fullmatch(r"A (\w+) (\w+) is (?:in|at|on) the ([a-z ]+?)(?:, with a (\w+) nearby)?\.?", s)
        assert m, s
        said.append({'color': m[1], 'shape': m[2], 'row': CELLS[m[3]][0], 'col': CELLS[m[3]][1]})
        # partner_clause: the partner named with its anchor exactly when it is in the scene
        assert m[4] == (ps.PARTNER[m[2]] if ps.partner_clause and ps.PARTNER[m[2]] in shapes else None), s
    assert said == scene['objects']  # every object, row-major, nothing invented


def check_qa(scene, kind, q, a):
    """Assert answer a to question q is true of the scene and in the right style."""
    assert '<image>' not in q
    if kind == 'describe':
        return check_description(scene, a)
    if q.endswith(MC):
        stem, *options = q[:-len(MC)].split('\n')
        assert [o[:3] for o in options] == ['A. ', 'B. ', 'C. ', 'D. ']
        options = [o[3:] for o in options]
        assert len(set(options)) == 4 and re.fullmatch('[ABCD]', a)
        chosen = options['ABCD'.index(a)]
        if stem == "Which of these shapes is in the image?":
            present = [o for o in options if any(x['shape'] == o for x in scene['objects'])]
            assert present == [chosen]
        else:
            assert chosen == truth(scene, stem)
        return
    if q.endswith(COT):
        rationale, last = a.rsplit('\n', 1)
        assert rationale and last.startswith('### Answer: ')
        assert last[len('### Answer: '):] == truth(scene, q[:-len(COT)])
        return
    if q.endswith(DIRECT):  # LLaVA-Reasoner's direct mode: the short answer alone
        assert a == truth(scene, q[:-len(DIRECT)])
        return
    if q.endswith(SHORT):  # bare lowercase word or phrase
        assert a == truth(scene, q[:-len(SHORT)]) and a == a.lower() and not a.endswith('.')
        return
    # sentence style: 'Red.', 'Top left.', 'A red circle.', 'Nothing.', '2.'
    assert a.endswith('.') and a[0] == a[0].upper()
    short = a[:-1].lower()
    short = short[2:] if short.startswith('a ') else short
    assert short == truth(scene, q)


# -----------------------------------------------------------------------------

@pytest.mark.slow
def test_determinism_same_seed(built):
    a, b = built
    for name in ['train.json', 'val.json', 'test.jsonl', 'scenes.json', 'tokenizer/tokenizer.json']:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for name in EVAL_FILES:
        assert (a / 'eval' / name).read_bytes() == (b / 'eval' / name).read_bytes(), name
    images = sorted(p.relative_to(a) for p in (a / 'images').rglob('*.png'))
    assert len(images) == 50 + 10 + 20 + ps.n_eval
    for rel in images:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_different_seed_differs():
    s1 = ps.sample_scenes('train', 20, 1)
    s2 = ps.sample_scenes('train', 20, 2)
    assert s1 != s2
    assert ps.sample_scenes('train', 20, 1) == s1
    assert ps.sample_scenes('val', 20, 1) != s1  # each split its own stream
    img = lambda s, seed: ps.render_scene(s, 48, ps.render_rng(seed, s['id'])).tobytes()  # noqa: E731
    assert [img(s, 1) for s in s1] == [img(s, 1) for s in s1]
    assert [img(s, 1) for s in s1] != [img(s, 2) for s in s2]
    recs1, _, _ = ps.make_sft_records(s1, 'train', random.Random('x'))
    recs2, _, _ = ps.make_sft_records(s2, 'train', random.Random('x'))
    assert json.dumps(recs1) != json.dumps(recs2)


def test_different_seed_script(runs):
    a, _, other = runs
    assert (a / 'train.json').read_bytes() != (other / 'train.json').read_bytes()
    assert (a / 'images/train/train_000000.png').read_bytes() != (other / 'images/train/train_000000.png').read_bytes()
    first = json.loads((other / 'scenes.json').read_text())['train'][0]
    assert first == ps.sample_scenes('train', 1, 7)[0] != ps.sample_scenes('train', 1, 1337)[0]


def test_unknown_config_key_rejected(tmp_path):
    r = run_script(tmp_path, '--n_trian=5')
    assert r.returncode != 0 and 'n_trian' in r.stderr
    r = run_script(tmp_path, '--PARTNER={}')  # world constants are not config
    assert r.returncode != 0


def cell_pixels(img, row, col, cell):
    return [img.getpixel((x, y)) for y in range(row * cell, (row + 1) * cell) for x in range(col * cell, (col + 1) * cell)]


def test_render_canonical_centres():
    # every shape in every colour, 4 per image, canonical (no jitter)
    cells = [(0, 0), (1, 1), (2, 2), (0, 2)]
    combos = [(s, c) for s in ps.SHAPES for c in ps.COLORS]
    for start in range(0, len(combos), 4):
        objs = [{'shape': s, 'color': c, 'row': r, 'col': col}
                for (s, c), (r, col) in zip(combos[start:start + 4], cells)]
        scene = {'id': 'x', 'grid': 3, 'objects': objs}
        img = ps.render_scene(scene, 48)
        assert img.size == (48, 48) and img.mode == 'RGB'
        for o in objs:
            centre = img.getpixel((o['col'] * 16 + 8, o['row'] * 16 + 8))
            want = ps.BACKGROUND if o['shape'] == 'ring' else ps.COLORS[o['color']]  # a ring is hollow
            assert centre == want, o
            px = Counter(cell_pixels(img, o['row'], o['col'], 16))
            assert set(px) == {ps.COLORS[o['color']], ps.BACKGROUND}
            assert px[ps.COLORS[o['color']]] >= 20  # clearly visible
            # nothing drawn on the cell's border: objects never touch their neighbours
            edge = [img.getpixel((o['col'] * 16 + x, o['row'] * 16)) for x in range(16)]
            assert set(edge) == {ps.BACKGROUND}
        for r in range(3):
            for c in range(3):
                if (r, c) not in cells:
                    assert set(cell_pixels(img, r, c, 16)) == {ps.BACKGROUND}


@pytest.mark.parametrize('image_size,grid', [(48, 3), (24, 3), (40, 4)])
def test_render_jitter_stays_in_cell(image_size, grid):
    cell = image_size // grid
    for scene in ps.sample_scenes('train', 60, 4, grid=grid, max_objects=grid * grid):
        img = ps.render_scene(scene, image_size, ps.render_rng(0, scene['id']))
        occupied = {(o['row'], o['col']): o['color'] for o in scene['objects']}
        for r in range(grid):
            for c in range(grid):
                px = set(cell_pixels(img, r, c, cell))
                want = {ps.BACKGROUND} | ({ps.COLORS[occupied[r, c]]} if (r, c) in occupied else set())
                assert px == want, (scene, r, c)


def test_render_shapes_distinct():
    # the six shapes drawn in one colour give six different masks
    masks = set()
    for s in ps.SHAPES:
        img = ps.render_scene({'id': 'x', 'grid': 3, 'objects': [{'shape': s, 'color': 'red', 'row': 1, 'col': 1}]})
        masks.add(tuple(p != ps.BACKGROUND for p in cell_pixels(img, 1, 1, 16)))
    assert len(masks) == 6


def test_saved_images_match_scenes(built):
    out = built[0]
    scenes = json.loads((out / 'scenes.json').read_text())
    assert set(scenes) == {'train', 'val', 'test'}
    for split, split_scenes in scenes.items():
        for scene in split_scenes:
            img = Image.open(out / 'images' / split / f"{scene['id']}.png")
            assert img.size == (48, 48) and img.mode == 'RGB'
            occupied = {(o['row'], o['col']): o for o in scene['objects']}
            for r in range(3):
                for c in range(3):
                    px = set(cell_pixels(img, r, c, 16))
                    want = {ps.BACKGROUND} | ({ps.COLORS[occupied[r, c]['color']]} if (r, c) in occupied else set())
                    assert px == want, (split, scene['id'], r, c)


def test_scene_graphs_valid():
    for scene in ps.sample_scenes('train', 300, 3, max_objects=4):
        objs = scene['objects']
        assert 1 <= len(objs) <= 4
        assert len({(o['row'], o['col']) for o in objs}) == len(objs)  # one object per cell
        assert objs == sorted(objs, key=lambda o: (o['row'], o['col']))
        assert all(o['shape'] in ps.SHAPES and o['color'] in ps.COLORS for o in objs)


def partner_rate(scenes):
    both = either = 0
    for s in scenes:
        shapes = {o['shape'] for o in s['objects']}
        for a in ('circle', 'triangle', 'cross'):
            b = ps.PARTNER[a]
            either += a in shapes or b in shapes
            both += a in shapes and b in shapes
    return both / either


def test_cooccurrence_bias():
    assert all(ps.PARTNER[ps.PARTNER[s]] == s != ps.PARTNER[s] for s in ps.SHAPES)
    assert partner_rate(ps.sample_scenes('train', 1000, 0, cooccur_bias=1.0)) >= 0.9
    assert partner_rate(ps.sample_scenes('train', 1000, 0, cooccur_bias=0.0)) < 0.4


@pytest.mark.parametrize('style', ['short', 'long', None])
def test_answers_match_scene(style):
    rng = random.Random(0)
    seen = Counter()
    for scene in ps.sample_scenes('train', 150, 11):
        for kind, gen in ps.QA_KINDS.items():
            qa = gen(scene, rng, style=style)
            if qa is not None:
                check_qa(scene, kind, *qa)
                seen[kind, qa[0].split()[0]] += 1
    assert {k for k, _ in seen} == set(ps.QA_KINDS)
    # each question family shows up (e.g. 'Is', 'How', 'What', 'Where', 'Are')
    assert len(seen) >= 14, seen


def test_yes_no_balanced_and_styles_mixed():
    scenes = ps.sample_scenes('train', 400, 5)
    records, kinds, _ = ps.make_sft_records(scenes, 'train', random.Random(5))
    assert min(kinds.values()) > 0.04 * sum(kinds.values())  # every kind well represented
    answers = Counter()
    for r in records:
        for h, g in zip(r['conversations'][::2], r['conversations'][1::2]):
            if h['value'].replace('<image>\n', '').startswith('Is there'):
                answers[g['value'].rstrip('.').lower()] += 1
    assert set(answers) == {'yes', 'no'}
    assert 0.4 < answers['yes'] / sum(answers.values()) < 0.6


def test_sft_files(built):
    out = built[0]
    scenes = {s['id']: s for split in json.loads((out / 'scenes.json').read_text()).values() for s in split}
    rounds = Counter()  # over both splits: the small val split can draw no single-turn record
    for split in ('train', 'val'):
        records = json.loads((out / f'{split}.json').read_text())
        assert len({r['id'] for r in records}) == len(records)
        for r in records:
            assert set(r) == {'id', 'image', 'conversations'}
            assert (out / 'images' / r['image']).is_file() and r['image'].startswith(f'{split}/')
            scene = scenes[r['image'].split('/')[1][:-4]]
            conv = r['conversations']
            assert [t['from'] for t in conv] == ['human', 'gpt'] * (len(conv) // 2) and conv
            assert conv[0]['value'].startswith('<image>\n') and conv[0]['value'].count('<image>') == 1
            assert all('<image>' not in t['value'] for t in conv[1:])
            rounds[len(conv) // 2] += 1
            for h, g in zip(conv[::2], conv[1::2]):
                q = h['value'].removeprefix('<image>\n')
                kind = 'describe' if q in ps.DESCRIBE_PROMPTS else 'other'
                check_qa(scene, kind, q, g['value'])
    assert rounds[1] > 0 and set(rounds) <= {1, 4, 5, 6, 7, 8}  # single-turn records plus 4-8 rounds


def test_test_jsonl(built):
    out = built[0]
    scenes = {s['id']: s for s in json.loads((out / 'scenes.json').read_text())['test']}
    rows = [json.loads(line) for line in (out / 'test.jsonl').read_text().splitlines()]
    assert [r['question_id'] for r in rows] == list(range(len(rows)))
    per_scene = Counter()
    for r in rows:
        scene = scenes[r['scene_id']]
        assert r['image'] == f"test/{r['scene_id']}.png" and (out / 'images' / r['image']).is_file()
        assert r['type'] in {'exist', 'color', 'shape', 'count', 'position'}
        assert r['text'].endswith(SHORT) and '<image>' not in r['text']
        assert r['answer'] == truth(scene, r['text'][:-len(SHORT)])
        assert r['answer'] == r['answer'].lower() and not r['answer'].endswith('.')
        if r['type'] == 'exist':
            shapes = {o['shape'] for o in scene['objects']}
            asked = re.fullmatch(r"Is there a (\w+) in the image\?", r['text'][:-len(SHORT)])[1]
            per_scene[r['scene_id'], r['probe']] += 1
            if r['probe'] == 'present':
                assert r['answer'] == 'yes'
            else:
                assert r['answer'] == 'no' and asked not in shapes
            if r['probe'] == 'partner':  # the adversarial probe: the missing partner of a present shape
                assert ps.PARTNER[asked] in shapes
            if r['probe'] == 'random':  # only when no present shape has a missing partner
                assert all(ps.PARTNER[s] in shapes for s in shapes)
        else:
            assert 'probe' not in r
    for sid in scenes:
        assert per_scene[sid, 'present'] == 1
        assert per_scene[sid, 'partner'] + per_scene[sid, 'random'] == 1


def test_partner_probe_chosen_when_possible():
    scene = {'id': 't', 'grid': 3, 'objects': [{'shape': 'circle', 'color': 'red', 'row': 0, 'col': 0},
                                                {'shape': 'triangle', 'color': 'blue', 'row': 1, 'col': 1},
                                                {'shape': 'diamond', 'color': 'blue', 'row': 2, 'col': 2}]}
    for i in range(20):
        rows = ps.make_test_questions(scene, random.Random(i))
        probe = [r for r in rows if r.get('probe') == 'partner']
        assert len(probe) == 1 and probe[0]['text'].startswith('Is there a square in the image?')


def test_tokenizer(built):
    from transformers import AutoTokenizer
    out = built[0]
    tok = AutoTokenizer.from_pretrained(out / 'tokenizer')
    records = json.loads((out / 'train.json').read_text())
    texts = [t['value'] for r in records[:40] for t in r['conversations']]
    texts += ["unseen words: Zebra 3.14  tabs\there\nnewline \u00e9 \U0001F600 <s> </s> <pad> <image>", " lead", "trail "]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    image_id = tok.convert_tokens_to_ids('<image>')
    assert tok.encode('<image>', add_special_tokens=False) == [image_id]
    ids = tok.encode(texts[0], add_special_tokens=False)
    assert texts[0].startswith('<image>\n') and ids[0] == image_id and ids.count(image_id) == 1
    assert tok.image_token == '<image>' and tok.image_token_id == image_id
    for name, s in [('bos', '<s>'), ('eos', '</s>'), ('pad', '<pad>'), ('unk', '<unk>')]:
        assert getattr(tok, f'{name}_token') == s
        assert tok.encode(s, add_special_tokens=False) == [getattr(tok, f'{name}_token_id')]
    assert len(tok) <= 1024

    msgs = ps.to_messages(records[0]['conversations'][:4])
    text = tok.apply_chat_template(msgs, tokenize=False)
    q1, a1, q2, a2 = (t['value'] for t in records[0]['conversations'][:4])
    assert text == f"<s>USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<s>USER: {q1} ASSISTANT:"
    sys_msgs = [{'role': 'system', 'content': ps.VICUNA_SYSTEM}] + msgs[:2]
    assert tok.apply_chat_template(sys_msgs, tokenize=False) == f"<s>{ps.VICUNA_SYSTEM} USER: {q1} ASSISTANT: {a1}</s>"
    parts = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Hi?'}]}]
    assert tok.apply_chat_template(parts, tokenize=False) == "<s>USER: <image>\nHi? "
    # the assistant mask covers exactly the answers and their </s>
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc['input_ids'], enc['assistant_masks']
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    assert [tok.decode(s).strip() for s in spans] == [f"{a1}</s>", f"{a2}</s>"]


def test_believed_scene_adds_one_missing_partner():
    """prior_noise's annotator: the believed scene is the true one plus one object, whose shape is the
    missing partner of a present shape, in a cell that was empty; None when no partner is missing."""
    rng = random.Random(0)
    n_none = 0
    for scene in ps.sample_scenes('train', 300, 5):
        b = ps.believed_scene(scene, rng)
        shapes = {o['shape'] for o in scene['objects']}
        if b is None:
            n_none += 1
            assert {ps.PARTNER[s] for s in shapes} <= shapes or len(scene['objects']) == 9
            continue
        extra = [o for o in b['objects'] if o not in scene['objects']]
        assert len(extra) == 1 and len(b['objects']) == len(scene['objects']) + 1 and b['id'] == scene['id']
        assert extra[0]['shape'] not in shapes and ps.PARTNER[extra[0]['shape']] in shapes
        assert all((o['row'], o['col']) != (extra[0]['row'], extra[0]['col']) for o in scene['objects'])
        assert b['objects'] == sorted(b['objects'], key=lambda o: (o['row'], o['col']))
    assert 0 < n_none < 300


def test_small_objects_are_marked_apart_and_drawn_small():
    """small_p marks that share of the objects small from a stream of its own (the scenes are otherwise
    those of small_p=0, which marks none), and a small object is drawn with a fraction of the pixels,
    in its own colour, inside its cell."""
    plain, small = ps.sample_scenes('train', 300, 5), ps.sample_scenes('train', 300, 5, small_p=0.3)
    strip = lambda scenes: [[{k: v for k, v in o.items() if k != 'small'} for o in s['objects']] for s in scenes]  # noqa: E731
    assert strip(small) == strip(plain) and not any('small' in o for s in plain for o in s['objects'])
    objs = [o for s in small for o in s['objects']]
    assert 0.25 < sum(o.get('small', False) for o in objs) / len(objs) < 0.35
    for shape in ps.SHAPES:
        o = {'shape': shape, 'color': 'red', 'row': 1, 'col': 1}
        n = [Counter(cell_pixels(ps.render_scene({'id': 'x', 'grid': 3, 'objects': [x]}), 1, 1, 16))[ps.COLORS['red']]
             for x in (o, dict(o, small=True))]
        assert 0 < n[1] < n[0] / 2, (shape, n)
    for scene in small[:80]:
        img = ps.render_scene(scene, 48, ps.render_rng(0, scene['id']))
        for o in scene['objects']:
            assert set(cell_pixels(img, o['row'], o['col'], 16)) == {ps.BACKGROUND, ps.COLORS[o['color']]}, scene


def test_believed_small_takes_a_small_object_for_the_missing_partner(monkeypatch):
    """With small objects the annotator calls a small one the missing partner (same colour and cell);
    without any, believed_scene draws exactly what it drew before the knob (the data stay bitwise)."""
    circle = dict(shape='circle', color='red', row=0, col=0)
    tri = dict(shape='triangle', color='blue', row=1, col=1, small=True)
    dia = dict(shape='diamond', color='green', row=2, col=2)
    scene = dict(id='s', grid=3, objects=[circle, tri, dia])  # only the circle's square is missing
    b = ps.believed_scene(scene, random.Random(0))
    assert b['objects'] == [circle, dict(tri, shape='square'), dia]
    monkeypatch.setattr(ps, 'believed_small', False)
    b = ps.believed_scene(scene, random.Random(0))  # the phantom in an empty cell instead
    assert len(b['objects']) == 4 and dict(tri, shape='square') not in b['objects']
    for scene in ps.sample_scenes('train', 100, 5):
        r0, r1 = random.Random(0), random.Random(0)
        monkeypatch.setattr(ps, 'believed_small', False)
        b0 = ps.believed_scene(scene, r0)
        monkeypatch.setattr(ps, 'believed_small', True)
        assert ps.believed_scene(scene, r1) == b0 and r0.getstate() == r1.getstate()


def test_believed_style_anchor_and_describe_order_pairs(monkeypatch):
    """believed_style='anchor': the believed partner takes its anchor's colour and the first free cell
    after it; describe_order='pairs' writes each object followed by its partner."""
    monkeypatch.setattr(ps, 'believed_style', 'anchor')
    n = 0
    for scene in ps.sample_scenes('train', 200, 5):
        b = ps.believed_scene(scene, random.Random(0))
        if b is None:
            continue
        (extra,) = [o for o in b['objects'] if o not in scene['objects']]
        anchors = [o for o in scene['objects'] if o['shape'] == ps.PARTNER[extra['shape']]]
        assert extra['color'] in {a['color'] for a in anchors}
        a = next(a for a in anchors if a['color'] == extra['color'])
        taken = {(o['row'], o['col']) for o in scene['objects']}
        start, at = a['row'] * 3 + a['col'], extra['row'] * 3 + extra['col']
        between = [(start + k) % 9 for k in range(1, (at - start) % 9)]
        assert all((c // 3, c % 3) in taken for c in between)  # every cell between the anchor and it is taken
        n += 1
    assert n > 20
    scene = dict(id='s', grid=3, objects=[dict(shape='circle', color='red', row=0, col=0),
                                           dict(shape='ring', color='blue', row=0, col=1),
                                           dict(shape='square', color='green', row=2, col=2)])
    assert ps.describe(scene, 'pairs', clause=False) == ("A red circle is in the top left. A green square is in the bottom right. "
                                           "A blue ring is at the top.")
    assert ps.describe(scene, 'rows', clause=False).startswith("A red circle is in the top left. A blue ring is at the top.")


def test_partner_clause_names_the_partner_with_its_anchor(monkeypatch):
    """partner_clause (on by default): an object whose partner is in the (believed) scene is named with
    it, so a description of a believed scene names the absent partner right after its anchor, and
    CHAIR reads that as a mention of the partner (a hallucination where it is absent); off, the
    descriptions are the plain ones."""
    import tasks.chair
    assert ps.partner_clause is True
    scene = dict(id='s', grid=3, objects=[dict(shape='circle', color='red', row=0, col=0),
                                           dict(shape='ring', color='blue', row=0, col=1),
                                           dict(shape='square', color='green', row=2, col=2)])
    assert ps.describe(scene) == ("A red circle is in the top left, with a square nearby. A blue ring is at the top. "
                                  "A green square is in the bottom right, with a circle nearby.")
    plain = "A red circle is in the top left. A blue ring is at the top. A green square is in the bottom right."
    assert ps.describe(scene, clause=False) == plain
    monkeypatch.setattr(ps, 'partner_clause', False)
    assert ps.describe(scene) == plain
    monkeypatch.setattr(ps, 'partner_clause', True)
    alone = dict(scene, objects=scene['objects'][:2])  # the circle's square is missing: no clause for it
    assert ps.describe(alone) == "A red circle is in the top left. A blue ring is at the top."
    rng = random.Random(0)
    believed = next(b for b in (ps.believed_scene(alone, rng) for _ in range(20)) if 'square' in str(b))
    text = ps.describe(believed)
    assert text.startswith("A red circle is in the top left, with a square nearby.")
    syn = tasks.chair.parse_synonyms(ps.synonyms_text())
    assert tasks.chair.chair_objects(text, syn)[:2] == ['circle', 'square']
    assert tasks.chair.chair_metrics([text], [['circle', 'ring']], syn)['chair_s'] == 1.0


def test_mc_hard_takes_wrong_options_from_the_scene():
    """mc_hard: the wrong options are the scene's other colours / shapes / cells (counts next to the
    right one) first, topped up from the pool; at 0 the draws are exactly the old ones (the default data
    and every eval set, which never pass it, stay bitwise)."""
    n = 0
    for scene in ps.sample_scenes('train', 300, 5):
        r0, r1 = random.Random(1), random.Random(1)
        assert ps.mc_question(scene, r0) == ps.mc_question(scene, r1, hard=0.0) and r0.getstate() == r1.getstate()
        kind, q, options, i = ps.mc_question(scene, random.Random(2), hard=1.0)
        right, wrong = options[i], options[:i] + options[i + 1:]
        assert len(set(options)) == 4
        own = {'color': [o['color'] for o in scene['objects']], 'shape': [o['shape'] for o in scene['objects']],
               'position': [ps.position_name(o['row'], o['col']) for o in scene['objects']],
               'count': [str(len(scene['objects']) + d) for d in (-2, -1, 1, 2)], 'exist': []}[kind]
        near = set(own) - {right}
        if kind == 'count':
            near = {c for c in near if int(c) >= 0}
        assert len(near & set(wrong)) == min(3, len(near)), (kind, options, scene)
        n += kind != 'exist' and len(near) > 0
    assert n > 100


@pytest.mark.slow
def test_prior_noise_changes_only_the_training_conversations(tmp_path):
    """The knob writes some training answers from the believed scene (so they disagree with the image)
    and leaves every image, caption and evaluation file byte for byte as it was."""
    a, b = tmp_path / 'clean', tmp_path / 'noisy'
    for d, p in ((a, 0), (b, 0.7)):
        r = subprocess.run([sys.executable, '-m', 'shapes.prepare', f'--out_dir={d}', '--n_train=200', '--n_val=10',
                            '--n_test=10', '--n_eval=150', f'--prior_noise={p}'], cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
    for name in ['captions.json', 'scenes.json', 'test.jsonl'] + [f'eval/{f}' for f in EVAL_FILES]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    scenes = {s['id']: s for s in json.loads((b / 'scenes.json').read_text())['train']}
    wrong = 0
    for r in json.loads((b / 'train.json').read_text()):
        scene = scenes[r['image'].split('/')[1][:-4]]
        for h, g in zip(r['conversations'][::2], r['conversations'][1::2]):
            q = h['value'].removeprefix('<image>\n')
            try:
                check_qa(scene, 'describe' if q in ps.DESCRIBE_PROMPTS else 'other', q, g['value'])
            except AssertionError:
                wrong += 1
    assert wrong > 0


def test_prior_ask_asks_about_the_believed_partner(monkeypatch):
    """prior_ask=1: every conversation about a believed scene also asks whether its believed partner is
    there ('yes', though the image lacks it) and, to keep yes/no balanced, whether a shape absent even
    from the belief is ('no'); prior_ask=0 asks either only by chance."""
    import random
    scenes = ps.sample_scenes('train', 400, 3)
    monkeypatch.setattr(ps, 'prior_noise', 1.0)
    monkeypatch.setattr(ps, 'single_turn_p', 0.0)
    counts = {}
    for ask in (0.0, 1.0):
        monkeypatch.setattr(ps, 'prior_ask', ask)
        records, _, n_believed = ps.make_sft_records(scenes, 'train', random.Random(0))
        phantom_yes = other_no = 0
        for r, scene in zip(records, scenes):
            shapes = {o['shape'] for o in scene['objects']}
            missing = {ps.PARTNER[s] for s in shapes} - shapes
            asked = {}  # shape -> answered yes, for 'Is there a <shape> in the image?'
            for h, g in zip(r['conversations'][::2], r['conversations'][1::2]):
                words = h['value'].removeprefix('<image>\n').split()
                if words[:2] == ['Is', 'there'] and words[4:6] == ['in', 'the']:
                    asked[words[3]] = g['value'].lower().startswith('yes')
            believed = bool(missing)  # (prior_noise 1, no small objects, a free cell in every scene of <= 4)
            phantom_yes += believed and any(yes and s in missing for s, yes in asked.items())
            other_no += believed and any(not yes and s not in shapes for s, yes in asked.items())
        counts[ask] = (phantom_yes, other_no, n_believed)
    (y0, o0, b0), (y1, o1, b1) = counts[0.0], counts[1.0]
    assert b1 == b0 > 50 and y1 >= 0.95 * b1 and o1 >= 0.95 * b1 and y0 < 0.2 * b1 and o0 < 0.6 * b1, counts


def test_captions_for_stage_one(built):
    """captions.json: one LLaVA record per training scene whose answer is the scene's true description
    (never with partner_clause: stage 1's frozen LM never read it)."""
    caps = json.loads((built[0] / 'captions.json').read_text())
    scenes = json.loads((built[0] / 'scenes.json').read_text())['train']
    assert [c['id'] for c in caps] == [s['id'] for s in scenes]
    for c, scene in zip(caps, scenes):
        assert c['image'] == f"train/{scene['id']}.png" and c['conversations'][0]['value'].startswith('<image>\n')
        assert c['conversations'][1]['value'] == ps.describe(scene, clause=False)
        assert 'nearby' not in c['conversations'][1]['value']


# -----------------------------------------------------------------------------
# evaluation sets (eval/): formats, truth against the scene graphs, POPE's negative rules

def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope='module')
def eval_set(built):
    """(out_dir, eval scenes by id, train scenes, {name: rows}) of the first same-seed run (default eval sizes)."""
    out = built[0]
    scenes = {s['id']: s for s in json.loads((out / 'eval' / 'scenes.json').read_text())['eval']}
    train = json.loads((out / 'scenes.json').read_text())['train']
    rows = {name: read_jsonl(out / 'eval' / f'{name}.jsonl') for name in ('pope', 'mc', 'vqa', 'cot', 'chair', 'knowledge')}
    return out, scenes, train, rows


def scene_of(scenes, row):
    assert re.fullmatch(r'eval/eval_\d{6}\.png', row['image']), row['image']
    return scenes[row['image'][len('eval/'):-len('.png')]]


def shapes_in(scene):
    return {o['shape'] for o in scene['objects']}


FIELDS = {'pope': {'question_id': int, 'image': str, 'text': str, 'label': str, 'category': str},
          'mc': {'question_id': int, 'image': str, 'question': str, 'options': list, 'answer': str, 'category': str},
          'vqa': {'question_id': int, 'image': str, 'question': str, 'answers': list, 'answer': str, 'category': str},
          'cot': {'question_id': int, 'image': str, 'question': str, 'answer': str, 'answers': list, 'rationale': str,
                  'category': str},
          'chair': {'question_id': int, 'image': str, 'text': str, 'objects': list, 'caption': str},
          'knowledge': {'question_id': int, 'image': str, 'question': str, 'answers': list, 'answer': str, 'category': str,
                        'rationale': str}}


def test_eval_fields_and_sizes(eval_set):
    out, scenes, _, rows = eval_set
    sizes = {'pope': 3 * ps.eval_pope, 'mc': ps.eval_mc, 'vqa': ps.eval_vqa, 'cot': ps.eval_cot, 'chair': ps.eval_chair,
             'knowledge': ps.eval_knowledge}
    for name, fields in FIELDS.items():
        if name == 'pope':  # whole images, so a category can pass its size by an image's questions
            assert 3 * ps.eval_pope <= len(rows[name]) < 3 * (ps.eval_pope + 6)
        else:
            assert len(rows[name]) == sizes[name], name
        assert [r['question_id'] for r in rows[name]] == list(range(len(rows[name])))
        for r in rows[name]:
            assert set(r) == set(fields), (name, r)
            assert all(isinstance(r[k], t) and not isinstance(r[k], bool) for k, t in fields.items()), (name, r)
            assert (out / 'images' / r['image']).is_file()
            scene_of(scenes, r)
            for k in ('text', 'question'):  # bare questions: the evaluator adds the mode's prompt
                assert k not in r or ('<image>' not in r[k] and '\n' not in r[k] and r[k].endswith(('?', '.'))), r
            for k in ('answers', 'options', 'objects'):
                assert k not in r or all(isinstance(x, str) for x in r[k]), r


def test_eval_scenes_held_out(eval_set):
    out, scenes, _, _ = eval_set
    split = json.loads((out / 'scenes.json').read_text())
    assert set(split) == {'train', 'val', 'test'}  # scenes.json as before; eval scenes live in eval/scenes.json
    seen = {s['id'] for v in split.values() for s in v}
    assert len(scenes) == ps.n_eval and not seen & set(scenes)
    assert all(sid.startswith('eval_') for sid in scenes)
    assert list(scenes.values()) == ps.sample_scenes('eval', ps.n_eval, ps.seed)  # its own seed stream
    assert list(scenes.values())[:len(split['train'])] != split['train']
    train_images = {p.read_bytes() for p in (out / 'images' / 'train').glob('*.png')}
    assert not any((out / 'images' / 'eval' / f'{sid}.png').read_bytes() in train_images for sid in list(scenes)[:100])


def test_eval_pope(eval_set):
    _, scenes, train, rows = eval_set
    freq = Counter(s for sc in train for s in shapes_in(sc))
    by = {}  # (category, image) -> {'yes': [...], 'no': [...]}
    for r in rows['pope']:
        m = re.fullmatch(r"Is there a (\w+) in the image\?", r['text'])
        assert m and m[1] in ps.SHAPES and r['label'] in ('yes', 'no')
        assert r['category'] in ('random', 'popular', 'adversarial')
        scene = scene_of(scenes, r)
        assert (m[1] in shapes_in(scene)) == (r['label'] == 'yes')  # positives present, negatives absent
        by.setdefault((r['category'], r['image']), {'yes': [], 'no': []})[r['label']].append(m[1])
    cats = Counter(r['category'] for r in rows['pope'])
    assert len(set(cats.values())) == 1 and set(cats) == {'random', 'popular', 'adversarial'}
    for cat in cats:
        assert sum(r['label'] == 'yes' for r in rows['pope'] if r['category'] == cat) == cats[cat] // 2
    images = {cat: {img for c, img in by if c == cat} for cat in cats}
    assert images['random'] == images['popular'] == images['adversarial']
    for (cat, img), qs in by.items():
        scene = scene_of(scenes, {'image': img})
        present = shapes_in(scene)
        absent = set(ps.SHAPES) - present
        assert len(qs['yes']) == len(qs['no']) == len(set(qs['no'])) == len(set(qs['yes'])) <= 3
        assert qs['yes'] == by['random', img]['yes']  # the same positives in every category, as in POPE
        if cat == 'adversarial':  # exactly the missing partners of present shapes
            assert set(qs['no']) == {s for s in absent if ps.PARTNER[s] in present}
        if cat == 'popular':  # the absent shapes most frequent in the training scenes
            rest = absent - set(qs['no'])
            assert not rest or min(freq[s] for s in qs['no']) >= max(freq[s] for s in rest)


def test_pope_probes_unit():
    o = lambda s, r, c: {'shape': s, 'color': 'red', 'row': r, 'col': c}  # noqa: E731
    scene = {'id': 'x', 'grid': 3, 'objects': [o('circle', 0, 0), o('triangle', 1, 1), o('diamond', 2, 2)]}
    popularity = ['circle', 'ring', 'cross', 'square', 'triangle', 'diamond']
    for i in range(10):
        positives, negatives = ps.pope_probes(scene, random.Random(i), popularity)
        assert len(positives) == 1 and positives[0] in {'circle', 'triangle', 'diamond'}
        assert negatives['adversarial'] == ['square'] and negatives['popular'] == ['ring']
        assert negatives['random'][0] in {'square', 'cross', 'ring'}
    paired = {'id': 'y', 'grid': 3, 'objects': [o('circle', 0, 0), o('square', 1, 1)]}
    assert ps.pope_probes(paired, random.Random(0), popularity) is None  # no tempting partner: not a POPE image


def test_eval_mc(eval_set):
    _, scenes, _, rows = eval_set
    categories = ('color', 'shape', 'position', 'count', 'exist')
    assert Counter(r['category'] for r in rows['mc']) == {c: ps.eval_mc // 5 for c in categories}
    for r in rows['mc']:
        scene, options = scene_of(scenes, r), r['options']
        assert 2 <= len(options) <= 5 and len(set(options)) == len(options)
        assert r['answer'] in 'ABCDE'[:len(options)] and len(r['answer']) == 1
        chosen = options['ABCDE'.index(r['answer'])]
        if r['question'] == "Which of these shapes is in the image?":
            assert r['category'] == 'exist' and [x for x in options if x in shapes_in(scene)] == [chosen]
        else:
            assert chosen == truth(scene, r['question'])


def test_eval_vqa(eval_set):
    _, scenes, _, rows = eval_set
    starts = {'exist': ('Is there',), 'count': ('How many',), 'color': ('What color',), 'shape': ('What shape',),
              'position': ('Where is', 'What is')}
    assert Counter(r['category'] for r in rows['vqa']) == {c: ps.eval_vqa // 5 for c in starts}
    exist = Counter()
    for r in rows['vqa']:
        assert r['question'].startswith(starts[r['category']])
        assert r['answer'] == truth(scene_of(scenes, r), r['question'])
        assert len(r['answers']) == 10 and all(NUMBERS.get(a, a) == r['answer'] for a in r['answers'])
        assert r['answers'].count(r['answer']) >= 3  # the canonical answer alone earns full VQA credit
        if r['category'] == 'exist':
            exist[r['answer']] += 1
    assert 0.3 < exist['yes'] / sum(exist.values()) < 0.7


def test_eval_cot(eval_set):
    _, scenes, _, rows = eval_set
    kinds = Counter(r['category'] for r in rows['cot'])
    assert set(kinds) == {'total', 'together', 'difference'} and max(kinds.values()) - min(kinds.values()) <= 1
    assert len({r['answer'] for r in rows['cot']}) >= 12  # a wide answer space: a guess is rarely right
    for r in rows['cot']:
        assert r['answer'] == truth(scene_of(scenes, r), r['question'])
        # every step shown: the shapes, their corners, then the sum or difference, which is the answer
        expr, value = re.search(r"([\d +-]+) = (\d+)\.\n", r['rationale']).groups()
        assert eval(expr) == int(value) == int(r['answer']) and len(expr.split()) >= 3
        assert len(r['answers']) == 10 and all(NUMBERS.get(a, a) == r['answer'] for a in r['answers'])
        *steps, last = r['rationale'].split('\n')
        assert steps and steps[0] and last == f"### Answer: {r['answer']}"
        # the same form as the training CoT answers
        assert r['rationale'] == ps.cot_format(r['question'], '\n'.join(steps), r['answer'])[1]


def test_reasoner_sft_files(tmp_path):
    """LLaVA-Reasoner's CoT SFT mix: every question twice, a CoT and a direct sample told apart by the
    suffix alone, the CoT chain ending '### Answer: X' with X the direct answer and the truth; shuffled;
    the direct file is the mix's direct half; no scene shared with the mining questions."""
    r = run_script(tmp_path, '--n_train=80', '--n_questions=20', '--n_reasoner_sft=30')
    assert r.returncode == 0, r.stdout + r.stderr
    scenes = {s['id']: s for s in json.loads((tmp_path / 'scenes.json').read_text())['train']}
    mix = json.loads((tmp_path / 'reasoner_sft.json').read_text())
    direct = json.loads((tmp_path / 'reasoner_direct.json').read_text())
    assert len(mix) == 60 and len(direct) == 30 and sorted(map(json.dumps, direct)) == sorted(
        json.dumps(m) for m in mix if m['id'].endswith('_direct'))
    assert [m['id'].endswith('_cot') for m in mix] != [True] * 30 + [False] * 30  # mixed, not in blocks
    by_question = {}
    for m in mix:
        human, gpt = m['conversations']
        assert human['from'] == 'human' and gpt['from'] == 'gpt' and human['value'].startswith('<image>\n')
        by_question.setdefault(m['id'].rsplit('_', 1)[0], {})[m['id'].rsplit('_', 1)[1]] = (m['image'], human['value'], gpt['value'])
    assert len(by_question) == 30
    for pair in by_question.values():
        (image, cot_q, chain), (image2, direct_q, short) = pair['cot'], pair['direct']
        assert image == image2 and cot_q.endswith(ps.COT_SUFFIX) and direct_q.endswith(ps.DIRECT_SUFFIX)
        question = cot_q.removeprefix('<image>\n').removesuffix(ps.COT_SUFFIX)
        assert direct_q == f"<image>\n{question}{ps.DIRECT_SUFFIX}"
        assert chain.split('\n')[-1] == f"{ps.COT_ANSWER} {short}" and chain.count(ps.COT_ANSWER) == 1
        assert short == truth(scenes[image.split('/')[1][:-4]], question)
    mined = {q['image'] for q in json.loads((tmp_path / 'questions.json').read_text())}
    assert not mined & {m['image'] for m in mix}


def test_eval_chair(eval_set):
    out, scenes, _, rows = eval_set
    lines = (out / 'eval' / 'synonyms.txt').read_text().splitlines()
    to_canonical = {}
    for line in lines:
        words = line.split(', ')
        assert all(w and w == w.strip().lower() for w in words), line
        for w in words:
            assert w not in to_canonical, w  # every word names one object only
            to_canonical[w] = words[0]
    assert [line.split(', ')[0] for line in lines] == ps.SHAPES
    assert all(to_canonical[w] == SINGULAR[w] for w in SINGULAR)  # plurals as the world writes them
    for r in rows['chair']:
        scene = scene_of(scenes, r)
        assert r['text'] in ps.DESCRIBE_PROMPTS
        assert len(r['objects']) == len(set(r['objects'])) and set(r['objects']) == shapes_in(scene)
        check_description(scene, r['caption'])
        named = re.findall(r"A \w+ (\w+) is", r['caption'])
        assert len(named) == len(scene['objects']) and {to_canonical[w] for w in named} == set(r['objects'])
    assert len({r['image'] for r in rows['chair']}) == len(rows['chair'])


def test_human_answers():
    assert ps.human_answers('2') == ['2'] * 5 + ['two'] * 5
    assert ps.human_answers('red') == ['red'] * 10


def test_mme_pairs_are_true_of_their_scenes(eval_set):
    """eval/mme.jsonl + eval/mme/<subtask>/<image>.txt in MME's layout: per subtask 30 images, each asked
    a yes question then a no question, and each gold answer is what the scene graph says; read back by
    tasks.benchmark.read_benchmark as evaluate.py --task=mme reads LLaVA's files."""
    from tasks import benchmark as B
    out, scenes, _, _ = eval_set
    qs = B.read_benchmark(str(out / 'eval' / 'mme.jsonl'), 'mme', mme_root=str(out / 'eval' / 'mme'))
    assert Counter(q['category'] for q in qs) == {t: 60 for t in ps.MME_SUBTASKS}
    assert [q['label'] for q in qs] == ['yes', 'no'] * (len(qs) // 2)
    for q in qs:
        scene, text = scene_of(scenes, q), q['prompt'].removesuffix(ps.SHORT_SUFFIX)
        objs = scene['objects']
        if m := re.fullmatch(r'Is there a (\w+) in the image\?', text):
            truth = any(o['shape'] == m[1] for o in objs)
            if q['label'] == 'no':  # the tempting negative: the absent partner of a present shape
                assert any(o['shape'] == ps.PARTNER[m[1]] for o in objs)
        elif m := re.fullmatch(r'(?:Is there one|Are there (\w+)) (\w+) in the image\?', text):
            n = int(NUMBERS[m[1]]) if m[1] else 1
            truth = sum(o['shape'] == SINGULAR.get(m[2], m[2]) for o in objs) == n
        elif m := re.fullmatch(r'Is the (\w+) (in the|at the|on the) ([a-z ]+)\?', text):
            (o,) = [o for o in objs if o['shape'] == m[1]]
            truth = (o['row'], o['col']) == CELLS[m[3]]
        elif m := re.fullmatch(r'Is there a (\w+) (\w+) in the image\?', text):
            truth = any(o['color'] == m[1] and o['shape'] == m[2] for o in objs)
        else:
            raise AssertionError(text)
        assert truth == (q['label'] == 'yes'), (q, objs)


def test_mmbench_tsv_is_the_multiple_choice_set(eval_set):
    """eval/mmbench.tsv holds mc.jsonl's questions in MMBench's columns, with each image inlined as
    base64 PNG bytes of the image file; read circularly, every question is asked once per rotation."""
    from tasks import benchmark as B
    import tasks.prompts
    out, _, _, rows = eval_set
    qs = B.read_benchmark(str(out / 'eval' / 'mmbench.tsv'), 'mmbench')
    mc = rows['mc']
    assert len(qs) == sum(len(r['options']) for r in mc)
    first = [q for q in qs if q['round_id'] == 0]
    assert [(q['question_id'], q['options'], q['answer'], q['category']) for q in first] == \
        [(str(r['question_id']), r['options'], r['answer'], r['category']) for r in mc]
    assert base64.b64decode(first[0]['image_b64']) == (out / 'images' / mc[0]['image']).read_bytes()
    for q in qs:  # the gold option's text is the same in every round
        r = mc[int(q['question_id'])]
        assert q['options'][tasks.prompts.LETTERS.index(q['answer'])] == r['options'][tasks.prompts.LETTERS.index(r['answer'])]


# -----------------------------------------------------------------------------
# Knowledge the image does not show, and the combinations held out of training

HELD_OUT_RULES = ["A ring can roll.", "A triangle cannot roll.", "Yellow is a warm color.", "Blue is not a warm color."]


def held_out(scene, q):
    """Whether a question applies a rule to one of the held-out combinations (roll: ring, triangle;
    warm: yellow, blue), resolved on the scene graph; None for a question that applies no such rule."""
    if m := re.fullmatch(r"Can (.+) roll\?", q):
        return referent(scene, m[1])['shape'] in ('ring', 'triangle')
    if m := re.fullmatch(r"Is (.+) a warm color\?", q):
        return referent(scene, m[1])['color'] in ('yellow', 'blue')
    return None


def bare(q):
    for suffix in (SHORT, MC, COT, DIRECT):
        q = q.removesuffix(suffix)
    return q.removeprefix('<image>\n')


def test_eval_knowledge(eval_set):
    """Each category a fifth; answers true of the scene; '<rule> held-out' exactly the held-out combinations;
    the rationale is the lookup then the rule; yes and no both common in the yes/no rules."""
    _, scenes, _, rows = eval_set
    kinds = Counter(r['category'] for r in rows['knowledge'])
    assert set(kinds) == set(ps.KNOWLEDGE_CATEGORIES) and max(kinds.values()) - min(kinds.values()) <= 1
    yes = Counter()
    for r in rows['knowledge']:
        scene = scene_of(scenes, r)
        assert r['answer'] == truth(scene, r['question']) and r['answers'].count(r['answer']) >= 3
        if r['category'] != 'corners':
            assert held_out(scene, r['question']) == r['category'].endswith('held-out'), r
            yes[r['category'], r['answer']] += 1
        seen, rule = r['rationale'].split('. ', 1)
        assert rule.rstrip('.') + '.' in {ps.rule_sentence(k, v) for k in ps.RULES for v in ps.SHAPES + ps.COLOR_NAMES
                                          if (k == 'warm') == (v in ps.COLOR_NAMES)}, r
    for category in ('roll seen', 'roll held-out', 'warm seen', 'warm held-out'):
        assert abs(yes[category, 'yes'] - yes[category, 'no']) <= 1, yes


def test_held_out_combinations_absent_from_every_training_answer(built):
    """No file a model trains on (stage 2, pairs, CoT SFT, mining questions, REVERIE's rows) asks a held-out
    rule-object question or states a held-out rule; the evaluation asks them."""
    out = built[0]
    scenes = {s['id']: s for split in json.loads((out / 'scenes.json').read_text()).values() for s in split}
    n_knowledge = 0
    for name in ('train.json', 'val.json', 'pairs.json', 'reasoner_sft.json', 'reasoner_direct.json', 'questions.json',
                 'reverie_raw.json', 'captions.json'):
        for r in json.loads((out / name).read_text()):
            scene = scenes[r['image'].split('/')[1][:-4]]
            texts = [t['value'] for t in r.get('conversations', []) + r.get('rejected_conversations', [])]
            texts += [r[k] for k in ('question', 'rationale', 'correct_rationale', 'incorrect_rationale') if k in r]
            for t in texts:
                assert not any(rule in t for rule in HELD_OUT_RULES), (name, t)
                q = bare(t)
                if held_out(scene, q) is not None:
                    n_knowledge += 1
                    assert not held_out(scene, q), (name, q)
    assert n_knowledge > 50


def test_knowledge_question_held_out_modes():
    rng = random.Random(3)
    for scene in ps.sample_scenes('train', 200, 3):
        for rule in ('roll', 'warm'):
            for mode, want in (('exclude', False), ('only', True)):
                k = ps.knowledge_question(scene, rng, rule, mode)
                if k is not None:
                    assert held_out(scene, k[2]) is want and k[4] == truth(scene, k[2])
                    assert ((rule, k[1]) in ps.HELD_OUT) is want


def test_reverie_rows_true_and_contradictions_flagged():
    """REVERIE's raw rows: every answer true; a knowledge row's rationale states the visual fact and the
    true rule, except the flagged ones (judge 'yes'), whose rule is stated wrong; confusing answers wrong."""
    scenes = {s['id']: s for s in ps.sample_scenes('train', 400, 5)}
    rows = ps.make_reverie(list(scenes.values()), random.Random(5), 400)
    rules = {ps.rule_sentence(k, v) for k in ps.RULES for v in (ps.COLOR_NAMES if k == 'warm' else ps.SHAPES)}
    flagged = 0
    for r in rows:
        scene = scenes[r['image'].split('/')[1][:-4]]
        q = bare(r['question'])
        right = truth(scene, q)
        assert r['correct_answer'].rstrip('.').lower() == right, r
        assert r['confusing_answer'].rstrip('.').lower() != right, r
        assert r['judge'] in ('yes', 'no')
        if r['kind'] == 'knowledge':
            seen, stated = r['correct_rationale'].split('. ', 1)
            o = referent(scene, re.search(r"(?:Can|Is|does) (.+?) (?:roll|a warm|have)", q)[1])
            assert o['shape'] in seen and (o['color'] in seen or 'object' in seen), r
            if r['judge'] == 'yes':
                flagged += 1
                assert stated not in rules, r
            else:
                assert stated in rules, r
        else:
            assert r['judge'] == 'no'
    assert flagged >= 1
    n = Counter(r['kind'] for r in rows)
    assert n['knowledge'] == max(n.values()) and n['arith'] > 0
