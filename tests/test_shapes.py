"""Tests of the shapes world (prepare_shapes.py): determinism, rendering, answer truth, co-occurrence,
the file formats and the tokenizer. The truth of every answer is recomputed here from the scene graph
by parsing the question text, independently of the generators that wrote it."""

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
import prepare_shapes as ps  # noqa: E402

SHORT = "\nAnswer the question using a single word or phrase."
MC = "\nAnswer with the option's letter from the given choices directly."
COT = "\nGenerate a reason first and then output a short answer."
# the 3x3 cell names, written out again here so the tests do not trust the module's tables
CELLS = {'top left': (0, 0), 'top': (0, 1), 'top right': (0, 2), 'left': (1, 0), 'center': (1, 1),
         'right': (1, 2), 'bottom left': (2, 0), 'bottom': (2, 1), 'bottom right': (2, 2)}
LINES = {'top row': ('row', 0), 'middle row': ('row', 1), 'bottom row': ('row', 2),
         'left column': ('col', 0), 'middle column': ('col', 1), 'right column': ('col', 2)}
SINGULAR = {'circles': 'circle', 'squares': 'square', 'triangles': 'triangle', 'diamonds': 'diamond',
            'crosses': 'cross', 'rings': 'ring'}
SMALL = ['--n_train=50', '--n_val=10', '--n_test=20', '--vision_steps=5']


def run_script(out_dir, *args):
    return subprocess.run([sys.executable, 'prepare_shapes.py', f'--out_dir={out_dir}', *SMALL, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


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


def truth(scene, q):
    """The bare short answer of a question (suffixes stripped), from the scene graph."""
    objs = scene['objects']
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
    sentences = text.split('. ')
    n = len(scene['objects'])
    words = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
    assert sentences[0] == ("There is one object" if n == 1 else f"There are {words[n]} objects")
    said = []
    for s in sentences[1:]:
        m = re.fullmatch(r"A (\w+) (\w+) is (?:in|at|on) the ([a-z ]+?)\.?", s)
        assert m, s
        said.append({'color': m[1], 'shape': m[2], 'row': CELLS[m[3]][0], 'col': CELLS[m[3]][1]})
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
    if q.endswith(SHORT):  # bare lowercase word or phrase
        assert a == truth(scene, q[:-len(SHORT)]) and a == a.lower() and not a.endswith('.')
        return
    # sentence style: 'Red.', 'Top left.', 'A red circle.', 'Nothing.', '2.'
    assert a.endswith('.') and a[0] == a[0].upper()
    short = a[:-1].lower()
    short = short[2:] if short.startswith('a ') else short
    assert short == truth(scene, q)


# -----------------------------------------------------------------------------

def test_determinism_same_seed(built):
    a, b = built
    for name in ['train.json', 'val.json', 'test.jsonl', 'scenes.json', 'tokenizer/tokenizer.json']:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    images = sorted(p.relative_to(a) for p in (a / 'images').rglob('*.png'))
    assert len(images) == 50 + 10 + 20
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
    recs1, _ = ps.make_sft_records(s1, 'train', random.Random('x'))
    recs2, _ = ps.make_sft_records(s2, 'train', random.Random('x'))
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
    records, kinds = ps.make_sft_records(scenes, 'train', random.Random(5))
    assert min(kinds.values()) > 0.05 * sum(kinds.values())  # every kind well represented
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
    for split in ('train', 'val'):
        records = json.loads((out / f'{split}.json').read_text())
        assert len({r['id'] for r in records}) == len(records)
        rounds = Counter()
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


def test_pretrained_vision_tower(built):
    """vision/ is a transformers CLIP vision checkpoint with its image processor, loadable as a VLM's tower."""
    import model as M
    from conftest import make_tokenizer
    from transformers import LlamaConfig
    vision_dir = built[0] / 'vision'
    tok = make_tokenizer()
    vlm = M.VLM.from_parts(lm=LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2), vision=str(vision_dir), tokenizer=tok)
    assert vlm.num_image_tokens == 9 and vlm.image_processor.crop_size['height'] == 48


def test_vision_pretraining_learns_cells(tmp_path):
    """A few seconds of pretraining names each cell's shape and colour on scenes it was trained on."""
    scenes = ps.sample_scenes('train', 64, 0)
    os.makedirs(tmp_path / 'img')
    for sc in scenes:
        ps.render_scene(sc, 48).save(tmp_path / 'img' / f"{sc['id']}.png")
    loss, (shape_acc, color_acc) = ps.pretrain_vision(scenes, str(tmp_path / 'img'), 48, 16, 3, 150, str(tmp_path / 'v'),
                                                     batch_size=64)
    assert shape_acc > 0.9 and color_acc > 0.9, (shape_acc, color_acc)
    assert os.path.isfile(tmp_path / 'v' / 'config.json') and os.path.isfile(tmp_path / 'v' / 'preprocessor_config.json')
