"""
The shapes suite: the synthetic world's evaluation sets in the seven benchmarks' real formats (written by
`python -m shapes.prepare` into data/shapes/eval/), scored by the same rules as the real files. The world
knows each image, which adds one split no real benchmark has: multiple choice by how many of a colour or
shape question's options are in the image, where "pick an option that is there" scores 100 % at 1 and
1 in k at k (a prior the base model was found to lean on).
"""
import json
import os
import re

from shapes.prepare import CORNERS, PARTNER, position_phrase
from tasks.cot import read_number
from tasks.prompts import COT_MARKER, DIRECT_SUFFIX

# the suite's files in its directory (MME's per-subtask answer files are in its mme/ folder); an entry is
# scored by the benchmark of its name unless SCORER says otherwise, and asked in that benchmark's mode
# unless SUFFIX gives another: the knowledge questions are short answers (VQA's rule), and the arithmetic
# of cot.jsonl is asked a second time in LLaVA-Reasoner's direct mode
FILES = dict(pope="pope.jsonl", mc="mc.jsonl", vqa="vqa.jsonl", cot="cot.jsonl", chair="chair.jsonl",
             mme="mme.jsonl", mmbench="mmbench.tsv", knowledge="knowledge.jsonl", direct_cot="cot.jsonl")
SCORER = dict(knowledge="vqa", direct_cot="vqa")
SUFFIX = dict(direct_cot=DIRECT_SUFFIX)


def held_out_splits(metrics):
    """The knowledge questions pooled by whether their rule-object combination was held out of training:
    {'seen': ..., 'held-out': ...} from the '<rule> seen' / '<rule> held-out' splits (accuracy weighted by n)."""
    out = {}
    for which in ('seen', 'held-out'):
        parts = [m for split, m in metrics.items() if split.endswith(' ' + which)]
        if parts:
            n = sum(m['n'] for m in parts)
            out[which] = dict(accuracy=sum(m['accuracy'] * m['n'] for m in parts) / n, n=n)
    return out


def options_in_image(scene, category, options):
    """How many of a colour or shape question's options are a colour / shape of some object in the scene
    (None for the other kinds). A model that only asks "is this option in the image" is right every time
    at 1 and 1 in k at k."""
    if category not in ('color', 'shape'):
        return None
    present = {o[category] for o in scene['objects']}
    return sum(o in present for o in options)


def mc_by_options_in_image(mc_rows, scenes, judge):
    """{'<k> opts in image': dict(accuracy, n)} over the mc rows whose image is a scene of `scenes`
    (load_scenes); judge(row) -> the verdict dict with its 'score'."""
    groups = {}
    for r in mc_rows:
        scene = scene_of(scenes, r)
        k = scene and options_in_image(scene, r.get("category"), r["options"])
        if k:
            groups.setdefault(f"{k} opts in image", []).append(judge(r)["score"])
    return {split: dict(accuracy=sum(g) / len(g), n=len(g)) for split, g in sorted(groups.items())}


def pope_by_partner(rows, scenes, judge):
    """POPE's 'no' questions (each image-shape question once, whatever its categories) split by whether
    the absent shape is the co-occurrence partner of a shape in the image: {'partner negatives': dict(
    yes_rate, n), 'other negatives': ...}; yes_rate is the false-positive rate. The world has 6 shapes, so
    POPE's random negatives are often partners too (unlike COCO's 80 objects), which caps adversarial's
    false positives at about 2x random's even for a model that says 'yes' only to partners; this split
    shows the prior directly. {} when an image's scene is unknown."""
    seen, groups = set(), {"partner negatives": [], "other negatives": []}
    for r in rows:
        scene = scene_of(scenes, r)
        m = re.match(r"is there an? (\w+)", str(r.get("prompt", "")).lower())
        if scene is None or m is None:
            return {}
        if r["label"] != "no" or (r["image"], m.group(1)) in seen:
            continue
        seen.add((r["image"], m.group(1)))
        partner = any(PARTNER.get(o["shape"]) == m.group(1) for o in scene["objects"])
        groups["partner negatives" if partner else "other negatives"].append(judge(r)["pred"] == "yes")
    return {k: dict(yes_rate=sum(g) / len(g), n=len(g)) for k, g in groups.items() if g}


# --- the arithmetic chains' facts, checked against the scene graph

_POS = r"(?:in|at|on) the (?:top left|top right|bottom left|bottom right|top|bottom|left|right|center)"
_REF = re.compile(rf"the object ({_POS})|the (\w+) object")
_OBJECT_CLAIM = re.compile(rf"((?:the object {_POS})|(?:the \w+ object)) is an? (\w+)")
_SHAPES_CLAIM = re.compile(r"the shapes are (.+)")
_CORNERS_CLAIM = re.compile(r"an? (\w+) has (\d+) corners?")
_SUM = re.compile(r"(\d+(?: [-+] \d+)+) = (-?\d+)")


def _only_joins(rest):
    """Whether what is left of a sentence once its claims are cut out is only the words joining them."""
    return re.fullmatch(r"(?:,? and |, )*", rest) is not None


def _resolve(ref, scene, position):
    """The one object a reference names ('the object in the top left', 'the red object'), else None."""
    cell, color = ref
    objs = scene['objects']
    hits = [o for o in objs if position(o) == cell] if cell else [o for o in objs if o['color'] == color]
    return hits[0] if len(hits) == 1 else None


def chain_problems(text, question, scene, corners, position):
    """The false or unreadable claims of an arithmetic chain (the text before '### Answer:'), checked
    against the scene graph, not against the gold chain's wording: [] when every claim is true. Claims:
      'The shapes are a ring and a cross.'      the scene's shapes, in any order
      'The object in the top left is a square.' / 'The red object is a square.'  that object's shape;
                                                the objects named must be the ones the question names
      'A square has 4 corners ...'              the world's rule (corners: shape -> count)
      '4 + 3 = 7.'                              the sum is right, its terms are the corners of the
                                                shapes the chain named, in its order, and the answer
                                                after '### Answer:' is its result
    A sentence that is none of these is a problem ('unread: ...'): the check never passes what it
    cannot read. position(o) -> the phrase for o's cell ('in the top left')."""
    body = text.split(COT_MARKER)[0].strip().lower()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", body) if s.strip().strip(".")]
    named, refs, problems, sums = [], [], [], []
    asked = [(m.group(1), m.group(2)) for m in _REF.finditer(question.lower())]
    for s in sentences:
        s = s.rstrip(".")
        if m := _SHAPES_CLAIM.fullmatch(s):
            listed = [w.split(" ", 1)[1] for w in re.split(r", and |, | and ", m.group(1)) if " " in w]
            if sorted(listed) != sorted(o['shape'] for o in scene['objects']):
                problems.append(f"the shapes are {listed}")
            named += listed
        elif claims := list(_OBJECT_CLAIM.finditer(s)):
            if not _only_joins(_OBJECT_CLAIM.sub("", s)):
                problems.append(f"unread: {s!r}")
            for m in claims:
                ref = _REF.fullmatch(m.group(1)).groups()
                o = _resolve(ref, scene, position)
                if o is None or o['shape'] != m.group(2):
                    problems.append(f"{m.group(0)!r}")
                named.append(m.group(2))
                refs.append(ref)
        elif claims := list(_CORNERS_CLAIM.finditer(s)):
            if not _only_joins(_CORNERS_CLAIM.sub("", s)):
                problems.append(f"unread: {s!r}")
            for m in claims:
                if corners.get(m.group(1)) != int(m.group(2)):
                    problems.append(f"{m.group(0)!r}")
        elif m := _SUM.fullmatch(s):
            sums.append(m)
        else:
            problems.append(f"unread: {s!r}")
    if len(sums) != 1:
        problems.append(f"{len(sums)} sums")
    for m in sums:
        terms = [int(t) for t in re.findall(r"\d+", m.group(1))]
        signs = [1] + [1 if op == "+" else -1 for op in re.findall(r" ([-+]) ", m.group(1))]
        if sum(s * t for s, t in zip(signs, terms)) != int(m.group(2)):
            problems.append(f"{m.group(0)!r} is wrong arithmetic")
        if terms != [corners.get(s) for s in named]:
            problems.append(f"{m.group(1)!r} are not the corners of {named}")
    answer = read_number(text.split(COT_MARKER)[-1]) if COT_MARKER in text else None  # '12', 'twelve'
    if sums and (answer is None or answer[0] != int(sums[-1].group(2))):
        problems.append(f"the answer is not the sum's {sums[-1].group(2)}")
    if sorted(refs, key=str) != sorted(asked, key=str):  # the objects the question names (a total names none)
        problems.append(f"the chain looks at {refs}, the question asks about {asked}")
    return problems


def scene_of(scenes, row):
    """The scene graph of a question's image (its file name is the scene id), or None."""
    return scenes.get(os.path.splitext(os.path.basename(row.get("image") or ""))[0])


def load_scenes(eval_dir):
    """{scene id (its image's file name, 'eval_000012'): scene graph} for every scene the world wrote: the
    evaluation's from eval_dir/scenes.json, the training splits' from the scenes.json beside eval_dir."""
    scenes = {}
    for path in (os.path.join(os.path.dirname(os.path.normpath(eval_dir)), "scenes.json"),
                 os.path.join(eval_dir, "scenes.json")):
        if os.path.isfile(path):
            with open(path) as f:
                for split, rows in json.load(f).items():
                    scenes.update({sc['id']: sc for sc in rows})
    return scenes


def chain_facts(rows, scenes, judge):
    """Arithmetic CoT answers (rows with 'text', 'question' or 'prompt', 'image') checked claim by claim
    against their scene graphs (chain_problems): chain_true, the share of all answers whose chain has no
    false or unread claim; right_answer_false_chain, the share of the right answers (judge(row)['score'])
    whose chain has one, the figure issue 37 holds to <= 10 %; n_right. {} when a row's scene is unknown."""
    if not rows or any(scene_of(scenes, r) is None for r in rows):
        return {}

    def problems(r):
        scene = scene_of(scenes, r)
        return chain_problems(r["text"], r.get("question") or r["prompt"], scene, CORNERS,
                              lambda o: position_phrase(o['row'], o['col'], scene.get('grid', 3)))
    ok = [not problems(r) for r in rows]
    right = [judge(r)["score"] > 0 for r in rows]
    n_right = sum(right)
    return dict(chain_true=sum(ok) / len(rows), n_right=n_right,
                right_answer_false_chain=sum(r and not k for r, k in zip(right, ok)) / n_right if n_right else 0.0)
