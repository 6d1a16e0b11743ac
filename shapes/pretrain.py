"""
The shapes world's foundation models, the stand-ins for the two models LLaVA starts from:

    lm/     a small Llama-style causal LM pretrained on the world's text      (where Vicuna stands)
    clip/   a small CLIPModel, vision and text towers, contrastive on images  (where OpenAI CLIP stands)
            and their sentences

Both are saved as ordinary transformers checkpoint directories (config.json, model.safetensors,
tokenizer / image processor files), so `sft.py --init_from=parts --lm_path=... --vision_path=...`
takes them exactly as it takes lmsys/vicuna-7b-v1.5 and openai/clip-vit-large-patch14-336. The
repository ships shapes/models/ (as a LLaVA user downloads Vicuna and CLIP), made by this script,
deterministically from the seed (the first shipped pair, made at commit 15459f1 with the corpus bug
below and a CLIP that did not know where a patch is, is in the history at dd1b8d3; docs/log.md measures both):

    python -m shapes.pretrain                       # shapes/models (about 94 min on 2 CPU cores: CLIP 17, LM 77)
    python -m shapes.pretrain --lm_steps=200 --clip_steps=100 --out_dir=/tmp/m   # a quick small version

Why the LM reads images it has never seen. A language model learns nothing about pixels; what it
can learn from text is to *look things up in its context*. So the LM's corpus puts each scene where
the image tokens will be: the 9 image-token positions (one per grid cell, row-major, as the vision
tower's patches) hold the sum of the word embeddings that name the cell's content,
    e(" red") + e(" circle") + e(" top") + e(" left")      or      e(" nothing") + e(" top") + e(" left"),
and the rest of the sequence is the world's text about that scene: LLaVA-format conversations in
the chat template, captions in LLaVA's stage-1 `plain` format, dense "direct recall" documents
("is red circle yes. color square blue. at top left nothing. ...") whose answers come right after
the word they look up, and conversations of multiple-choice questions only (in the chat template: the
first version built them in the `plain` one, which keeps only the answers, so the first shipped LM (made at
commit 15459f1) read a fifth of its documents as bare letters, "B\nD\nC"; a test now checks the
questions are there; docs/log.md compares the two). Picking an option's letter is a second lookup on
top of the first (the answer word, then
the letter in front of it in the list); an LM trained on random wrong options learns a shortcut
instead, "the option that is in the scene", right whenever only one option is (docs/log.md measures
it; the mc_hard probe asks with the scene's own values as the wrong options, where the shortcut
fails). Those dense documents are what gets a from-scratch transformer past its long
plateau quickly: the lookup is one attention hop away from the answer, and every sequence carries
sixteen of them. The row and column words enter the slots at a weight of 0.3 (slot_positions): at
full weight they are half of every slot and drown the colour and shape that lookups match on (the
lookups then stay at chance for thousands of steps; measured). The
LM thus arrives at stage 1 knowing every format and how to read a scene from 9 slots; stage 1
(projector only, captions) only has to teach the projector to write what those slots held.

The world's knowledge (shapes/prepare.py's RULES: which shapes roll, their corners, the warm colours) is
learnt here, as Vicuna arrives knowing that balls roll: 'rules' documents state every rule in text, and
'reason' documents work the world's arithmetic step by step about the scene in the slots. The VLM's
instruction data then only applies the rules to objects in images, never to a HELD_OUT combination.

The CLIP is trained with CLIP's symmetric contrastive loss between images and one sentence per image
in the words of the world's descriptions ("A red circle is in the top left, with a square nearby."), with
the same sentence made false (colour, shape or position changed, or its clause naming a shape not in
the image: for an object whose partner is missing, that partner) added as hard negatives (NegCLIP), so
its score tells a true sentence from an altered one, and a true caption from one that names the absent
partner: what calibrated self-rewarding needs of it (the first CLIPs read one-object sentences only, and
could not tell a clause naming a present partner from one naming an absent one: docs/log.md). Its vision
tower is also what the VLM sees through, so
its penultimate-layer patch features are additionally trained to name each cell's shape and colour
(a linear probe trained with it, dropped afterwards): real CLIP features separate objects in patches;
a 0.4M-parameter one learns that in seconds only with the help. A second probe reads each patch's
row and column; clip_position sets how much of its gradient reaches the features (1, the default
since 2026-12-06: all of it, so the features say where a patch is, as the LM's slots do; at 0 the probe
only measures, the features barely know where a patch is, the VLM's position answers are near chance
and its stage 1 aligns less well: see docs/log.md).
"""

import copy
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data as D
from lucid import checkpoint, optim
from shapes import prepare as W

# -----------------------------------------------------------------------------
# default config values, override with --key=value
out_dir = 'shapes/models'
seed = 1337
threads = 2             # torch threads
which = 'all'           # 'all' | 'lm' | 'clip'
# the world the models are pretrained on: the defaults of shapes/prepare.py, own seed streams ('lm', 'clip')
image_size = 48
cooccur_bias = 0.8
small_p = 0.0           # share of objects drawn small (shapes/prepare.py's small_p and small_size: the CLIP must see the same world)
small_size = 0.13
vocab_size = 1024       # BPE target of the tokenizer (trained here on the LM's corpus, shipped with both models)
# LM: a Llama of the size sft.py builds for the shapes world
lm_n_layer = 4
lm_n_head = 4
lm_n_embd = 128
lm_scenes = 40000       # scenes of the corpus (each gives one document)
lm_mix = 'recall:0.4,chat:0.22,mc:0.18,caption:0.08,rules:0.04,reason:0.08'  # document kinds and their shares: 'rules'
                        # states the world's knowledge in text (rules_segments), 'reason' is arithmetic worked step by
                        # step about the scene (reason_conversation); also 'verify' (multiple-choice questions with each
                        # option marked yes / no and no letter: verify_segments)
recall_facts = 16       # facts per direct-recall document
recall_mc = 0.0         # share of direct-recall facts that are multiple-choice questions answered by the letter
                        # ("choose What color is the cross? A. green B. purple ..." -> "B"): the letter lookup, densely
lm_mc_hard = 0.0        # share of the corpus' multiple-choice questions whose wrong options are the scene's own other
                        # values first (shapes/prepare.py's mc_hard): with random options, "pick the option that is in the
                        # scene" is right most of the time, and that is what an LM trained on them learns (see docs/log.md)
slot_noise = 0.1        # Gaussian noise on the slot embeddings, relative to their RMS: the projector's output is never exact
lm_steps = 6000
lm_init = ''            # '' = a fresh Llama; a directory = continue pretraining that LM (e.g. shapes/models/lm)
lm_batch = 32
lm_lr = 3e-3
lm_rope_theta = 10000.0
lm_eval_interval = 500
slot_positions = 0.3     # the slots also hold their cell's row and column words, at this weight (0 = not)
lm_prior_noise = 0.0    # share of the chat and caption documents about a scene with a missing partner written as if
                        # it were there (shapes/prepare.py's believed_scene; the slots stay true): a language prior, as
                        # Vicuna's text has one; 0 = truthful text (the shipped LM)
# CLIP
clip_steps = 3000
clip_batch = 128
clip_lr = 2e-3
clip_scenes = 20000
clip_embd = 64          # projection (joint embedding) size
clip_position = 1.0     # how much a per-patch row / column probe trains the patch features (0 = it only reads them)
# -----------------------------------------------------------------------------
_config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]

ROW_WORDS = [' top', ' middle', ' bottom']
COL_WORDS = [' left', ' middle', ' right']


# -----------------------------------------------------------------------------
# The LM's corpus

def slot_words(scene, grid=3):
    """The words whose embeddings sum to each cell's slot, row-major: [' red', ' circle', ' top', ' left'] or
    [' nothing', None, ' top', ' left'] per cell; the last two (the cell's row and column) are weighted by slot_positions."""
    cells = {(o['row'], o['col']): o for o in scene['objects']}
    slots = []
    for r in range(grid):
        for c in range(grid):
            o = cells.get((r, c))
            what = [' ' + o['color'], ' ' + o['shape']] if o else [' nothing', None]
            slots.append(what + [ROW_WORDS[r], COL_WORDS[c]])
    return slots


def slot_word_ids(tok):
    """{slot word: its token id}; each must be one token, or its embedding is not a word's."""
    word_id = {}
    for w in [' ' + w for w in W.COLOR_NAMES + W.SHAPES + ['nothing']] + ROW_WORDS + COL_WORDS:
        ids = tok.encode(w, add_special_tokens=False)
        if len(ids) != 1:
            raise SystemExit(f"the slot word {w!r} is not one token in the tokenizer ({ids}); "
                             f"the world's text should make it one (raise vocab_size)")
        word_id[w] = ids[0]
    return word_id


def slot_ids(scene, word_id):
    """(9, 4) word ids of the slots, -1 for none."""
    return [[-1 if w is None else word_id[w] for w in cell] for cell in slot_words(scene)]


def recall_fact(scene, rng):
    """One direct-recall fact as (query, answer). The word to look up comes last, right before the
    answer, and the relation word before it: the answer needs the current token's lookup and the
    previous token's relation, two heads side by side rather than one after the other."""
    objs = scene['objects']
    if recall_mc and rng.random() < recall_mc:  # (no draw at 0: the corpus stays the one without it)
        _, question, options, i = W.mc_question(scene, rng, hard=lm_mc_hard)
        return "choose " + question + " " + " ".join(f"{'ABCD'[k]}. {o}" for k, o in enumerate(options)), 'ABCD'[i]
    kind = rng.choice(['exist', 'exist_color', 'color', 'shape', 'where', 'what_at', 'count'])
    by_shape = W.unique_by(objs, lambda o: o['shape'])
    by_color = W.unique_by(objs, lambda o: o['color'])
    if kind == 'exist':
        shape = rng.choice(objs)['shape'] if rng.random() < 0.5 else rng.choice(W.SHAPES)
        return f"is {shape}", 'yes' if any(o['shape'] == shape for o in objs) else 'no'
    if kind == 'exist_color':
        o = rng.choice(objs)
        color, shape = (o['color'], o['shape']) if rng.random() < 0.5 else (rng.choice(W.COLOR_NAMES), rng.choice(W.SHAPES))
        return f"is {color} {shape}", 'yes' if any((p['color'], p['shape']) == (color, shape) for p in objs) else 'no'
    if kind == 'color' and by_shape:
        o = rng.choice(by_shape)
        return f"color {o['shape']}", o['color']
    if kind == 'shape' and by_color:
        o = rng.choice(by_color)
        return f"shape {o['color']}", o['shape']
    if kind == 'where' and by_shape:
        o = rng.choice(by_shape)
        return f"where {o['shape']}", W.position_name(o['row'], o['col'])
    if kind == 'what_at':
        r, c = (rng.choice(objs)['row'], rng.choice(objs)['col']) if rng.random() < 0.3 else (rng.randrange(3), rng.randrange(3))
        here = [o for o in objs if (o['row'], o['col']) == (r, c)]
        return f"at {W.position_name(r, c)}", f"{here[0]['color']} {here[0]['shape']}" if here else 'nothing'
    what = rng.choice(['all', 'shape', 'color'])
    if what == 'shape':
        shape = rng.choice(objs)['shape'] if rng.random() < 0.7 else rng.choice(W.SHAPES)
        return f"count {W.PLURALS[shape]}", str(sum(o['shape'] == shape for o in objs))
    if what == 'color':
        color = rng.choice(objs)['color'] if rng.random() < 0.7 else rng.choice(W.COLOR_NAMES)
        return f"count {color}", str(sum(o['color'] == color for o in objs))
    return "count objects", str(len(objs))


def recall_segments(scene, rng, n):
    """A direct-recall document as data.encode_segments segments: the slots, then n facts."""
    segs = [(W.IMAGE_TOKEN + "\n", False)]
    for _ in range(n):
        q, a = recall_fact(scene, rng)
        segs += [(q, False), (" " + a + ".", True), (" ", False)]
    return segs


def verify_segments(scene, rng, n):
    """A document of n multiple-choice questions whose options are each marked true or false right after
    them, without a letter to pick: "What color is the cross?\nA. white no\nB. purple yes\n...". The mark
    is predicted at the option's own word, which is where, causally, the same question in the VLM's
    form ("A. white\nB. purple\n...") can weigh each option against the image before the letter is
    asked for. The wrong options are the scene's own other values first (mc_question's hard), the ones
    a model that only asks "is this option in the scene" gets wrong."""
    segs = [(W.IMAGE_TOKEN + "\n", False)]
    for _ in range(n):
        _, question, options, i = W.mc_question(scene, rng, hard=1.0)
        segs.append((question + "\n", False))
        for k, o in enumerate(options):
            segs += [(f"{'ABCD'[k]}. {o}", False), (" yes" if k == i else " no", True), ("\n", False)]
    return segs


def rules_segments(rng):
    """A text document of the world's knowledge, every rule about every shape or colour once, in a random
    order, each as a statement ("A ring can roll.") or a question and its answer ("Can a ring roll? Yes.").
    Where the rules are learnt is the LM's corpus, as Vicuna arrives knowing that balls roll: the VLM's
    instruction data only applies them to objects in images, and never to a HELD_OUT combination, so
    a held-out question can be answered only by composing the lookup with what the LM read here."""
    facts = [(rule, v) for rule in W.RULES for v in (W.COLOR_NAMES if rule == 'warm' else W.SHAPES)]
    rng.shuffle(facts)
    text = []
    for rule, v in facts:
        if rng.random() < 0.5:
            text.append(W.rule_sentence(rule, v))
        elif rule == 'roll':
            text.append(f"Can a {v} roll? {'Yes' if W.ROLLS[v] else 'No'}.")
        elif rule == 'warm':
            text.append(f"Is {v} a warm color? {'Yes' if W.WARM[v] else 'No'}.")
        else:
            text.append(f"How many corners does a {v} have? {W.CORNERS[v]}.")
    return [(" ".join(text), True)]


def reason_conversation(scene, rng):
    """2-4 arithmetic questions about the scene, each worked step by step (LLaVA-Reasoner's CoT form):
    the LM arrives knowing how to reason over what it reads, as Vicuna does; the VLM's stage 2 then
    trains only the short answers (shapes/prepare.py's qa_arith)."""
    qas = []
    for _ in range(rng.randint(2, 4)):
        a = W.arith_question(scene, rng)
        qa = None if a is None else W.cot_format(a[1], a[2], a[3])
        if qa is not None and all(q != qa[0] for _, q, _ in qas):
            qas.append(('cot', *qa))
    return qas


def make_documents(scenes, rng, tok, image_token_id, mix):
    """One document per scene, its kind drawn by mix: (input_ids, labels, slot word ids (9, 4) padded with -1)."""
    kinds, weights = zip(*mix.items())
    word_id = slot_word_ids(tok)
    docs = []
    for scene in tqdm(scenes, desc="corpus", unit="doc", mininterval=2):
        kind = rng.choices(kinds, weights)[0]
        if kind in ('recall', 'verify', 'rules'):
            segs = [(tok.bos_token_id, False)] + (recall_segments(scene, rng, recall_facts) if kind == 'recall'
                                                  else verify_segments(scene, rng, rng.randint(3, 5)) if kind == 'verify'
                                                  else rules_segments(rng))
            ids, labels, _ = D.encode_segments(segs, tok, image_token_id, 9)
        else:
            told = scene  # the scene the text is about; the slots always hold the true one
            if lm_prior_noise and kind in ('chat', 'caption') and rng.random() < lm_prior_noise:
                told = W.believed_scene(scene, rng) or scene
            if kind == 'chat':
                qas = W.sample_qas(told, rng, rng.randint(4, 8))
            elif kind == 'reason':
                qas = reason_conversation(scene, rng) or [('describe', *W.qa_describe(told, rng))]
            elif kind == 'mc':  # a conversation of multiple-choice questions only (see the docstring)
                mcs = (W.qa_mc(scene, rng, hard=lm_mc_hard) for _ in range(rng.randint(4, 6)))
                qas = list({q: ('mc', q, a) for q, a in mcs}.values())
            else:
                qas = [('describe', *W.qa_describe(told, rng))]
            conv = W.conversation_record(scene['id'], None, qas)['conversations']
            s = D.build_sample(conv, tok, 'plain' if kind == 'caption' else 'chat', image_token_id, 9)
            ids, labels = s['input_ids'], s['labels']
        docs.append((ids, labels, slot_ids(scene, word_id)))
    return docs


def collate_docs(docs, pad_id):
    """Right-padded (ids, labels, attention mask) as data.collate makes them for sft.py, plus the slots (B, 9, 4)."""
    b = D.collate([dict(input_ids=x, labels=y) for x, y, _ in docs], pad_id)
    return b['input_ids'], b['labels'], b['attention_mask'], torch.tensor([d[2] for d in docs])


def length_batches(lengths, batch_size, n_batches, seed, pool=64):
    """n_batches batches of indices, epoch after epoch of a seeded shuffle; each run of `pool` batches
    is sorted by length before it is cut, so a batch pads to about its own length (documents range
    from 20 to 350 tokens: padding everything to the longest would triple the cost of a step)."""
    if len(lengths) < batch_size:
        raise ValueError(f"{len(lengths)} documents cannot fill a batch of {batch_size}")
    pool = min(pool, len(lengths) // batch_size)  # a small corpus: fewer batches per sorted run
    gen, out = torch.Generator().manual_seed(seed), []
    while len(out) < n_batches:
        order = torch.randperm(len(lengths), generator=gen).tolist()
        for i in range(0, len(order) - batch_size * pool + 1, batch_size * pool):
            chunk = sorted(order[i:i + batch_size * pool], key=lambda j: lengths[j])
            group = [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
            out += [group[k] for k in torch.randperm(len(group), generator=gen).tolist()]
    return out[:n_batches]


def slot_embeds(lm, ids, slots, image_token_id, noise=0.0):
    """Token embeddings with each image-token block replaced by the scene's slot embeddings
    (the sum of the embeddings of its words), plus noise relative to their RMS."""
    emb_table = lm.get_input_embeddings()
    emb = emb_table(ids.masked_fill(ids == image_token_id, 0))
    weight = (slots >= 0).float()
    weight[..., -2:] *= slot_positions   # the row and column words (the last two of a slot)
    s = (emb_table(slots.clamp(min=0)) * weight.unsqueeze(-1)).sum(2)  # (B, 9, d)
    if noise:
        s = s + noise * s.pow(2).mean().sqrt().detach() * torch.randn_like(s)
    return emb.masked_scatter((ids == image_token_id).unsqueeze(-1), s.to(emb.dtype))


def lm_loss(lm, batch, image_token_id, noise=0.0):
    ids, labels, mask, slots = batch
    h = lm.model(inputs_embeds=slot_embeds(lm, ids, slots, image_token_id, noise), attention_mask=mask).last_hidden_state
    y = labels[:, 1:]
    keep = y != D.IGNORE_INDEX
    return F.cross_entropy(lm.lm_head(h[:, :-1][keep]), y[keep])


# held-out text lookup questions, asked as the VLM will be asked them (chat template, short-answer suffix)
PROBES = ['exist', 'exist_color', 'color', 'shape', 'count', 'where', 'what_at', 'mc', 'knowledge', 'held_out', 'arith',
          'arith_cot']


def probe_question(scene, rng, kind):
    objs = scene['objects']
    if kind == 'exist':
        return W.ask_exist(scene, rng.choice(objs)['shape'] if rng.random() < 0.5 else rng.choice(W.SHAPES))
    if kind == 'exist_color':
        o = rng.choice(objs)
        return W.ask_exist(scene, *((o['shape'], o['color']) if rng.random() < 0.5 else (rng.choice(W.SHAPES), rng.choice(W.COLOR_NAMES))))
    if kind == 'color':
        u = W.unique_by(objs, lambda o: o['shape'])
        return W.ask_color(scene, rng.choice(u)['shape']) if u else None
    if kind == 'shape':
        u = W.unique_by(objs, lambda o: o['color'])
        return W.ask_shape(scene, rng.choice(u)['color']) if u else None
    if kind == 'count':
        return W.ask_count(scene, shape=rng.choice(objs)['shape']) if rng.random() < 0.5 else W.ask_count(scene)
    if kind == 'where':
        u = W.unique_by(objs, lambda o: (o['color'], o['shape']))
        return W.ask_where(scene, rng.choice(u)) if u else None
    if kind == 'mc':
        return W.qa_mc(scene, rng)
    if kind in ('knowledge', 'held_out'):  # a rule applied to an object: seen in the corpus, or a HELD_OUT one
        k = W.knowledge_question(scene, rng, None if kind == 'knowledge' else rng.choice(['roll', 'warm']),
                                 'exclude' if kind == 'knowledge' else 'only')
        return None if k is None else W.styled(k[2], k[4], 'short')
    if kind in ('arith', 'arith_cot'):  # the short answer alone; the whole worked chain
        a = W.arith_question(scene, rng)
        return None if a is None else (a[1] + W.DIRECT_SUFFIX, a[3]) if kind == 'arith' else W.cot_format(*a[1:])
    r, c = rng.randrange(3), rng.randrange(3)
    return W.ask_what_at(scene, r, c, 'short')


@torch.no_grad()
def lookup_accuracy(lm, tok, image_token_id, scenes, per_kind=100, seed=0):
    """Teacher-forced exact match of the whole answer on held-out scenes, per question kind: asked as
    the VLM is asked (chat template, short-answer suffix) and, as 'recall:<relation>', in the
    direct-recall form. {kind: accuracy}."""
    rng = random.Random(f"{seed}:probes")
    word_id = slot_word_ids(tok)
    groups = {}
    for kind in PROBES:
        for scene in scenes:
            if len(groups.get(kind, [])) == per_kind:
                break
            qa = probe_question(scene, rng, kind)
            if qa is not None:
                conv = W.conversation_record(scene['id'], None, [(kind, *qa)])['conversations']
                s = D.build_sample(conv, tok, 'chat', image_token_id, 9)
                groups.setdefault(kind, []).append((s['input_ids'], s['labels'], slot_ids(scene, word_id)))
    for scene in scenes[:2 * per_kind]:
        for _ in range(3):
            q, a = recall_fact(scene, rng)
            segs = [(tok.bos_token_id, False), (W.IMAGE_TOKEN + "\n", False), (q, False), (" " + a + ".", True)]
            ids, labels, _ = D.encode_segments(segs, tok, image_token_id, 9)
            groups.setdefault('recall:' + q.split()[0], []).append((ids, labels, slot_ids(scene, word_id)))
    # multiple choice whose wrong options are the scene's own values: an LM that only picks "the option in the
    # scene" falls far below its 'mc' here (own stream, so the probes above stay the ones reported before)
    rng = random.Random(f"{seed}:probes:mc_hard")
    for scene in scenes[:per_kind]:
        conv = W.conversation_record(scene['id'], None, [('mc', *W.qa_mc(scene, rng, hard=1.0))])
        s = D.build_sample(conv['conversations'], tok, 'chat', image_token_id, 9)
        groups.setdefault('mc_hard', []).append((s['input_ids'], s['labels'], slot_ids(scene, word_id)))
    lm.eval()
    out = {}
    for kind, docs in groups.items():
        ids, labels, mask, slots = collate_docs(docs, tok.pad_token_id)
        h = lm.model(inputs_embeds=slot_embeds(lm, ids, slots, image_token_id), attention_mask=mask).last_hidden_state
        pred = lm.lm_head(h[:, :-1]).argmax(-1)
        y = labels[:, 1:]
        out[kind] = ((pred == y) | (y == D.IGNORE_INDEX)).all(1).float().mean().item()
    lm.train()
    return out


def build_tokenizer(scenes, rng):
    """The world's tokenizer, trained on the text the corpus and the SFT data are made of."""
    texts = []
    for scene in scenes:
        texts += [t for _, q, a in W.sample_qas(scene, rng, 6) for t in (q, a)]
        texts.append(" ".join(q + " " + a for q, a in (recall_fact(scene, rng) for _ in range(8))))
        texts += [q + " " + a for _, q, a in reason_conversation(scene, rng)]  # the worked arithmetic
        texts.append(W.describe(scene, clause=True))  # the CLIP reads the partner clause (stage 2's descriptions have it)
        texts.append(rules_segments(rng)[0][0])
    texts += [W.VICUNA_SYSTEM, "USER: ", " ASSISTANT: ", "ASSISTANT:"] + W.DESCRIBE_PROMPTS
    return W.train_tokenizer(texts, vocab_size)


def pretrain_lm(tok, out):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    if lm_init:  # a continued LM keeps the tokenizer it was trained with
        tok = AutoTokenizer.from_pretrained(lm_init)
    image_token_id = tok.convert_tokens_to_ids(W.IMAGE_TOKEN)
    scenes = W.sample_scenes('lm', lm_scenes, seed, 3, W.max_objects, cooccur_bias)
    mix = dict(D.split_ratio(k) for k in lm_mix.split(','))
    t0 = time.time()
    docs = make_documents(scenes, random.Random(f"{seed}:lm:docs"), tok, image_token_id, mix)
    print(f"corpus: {len(docs)} documents, {sum(len(d[0]) for d in docs) / len(docs):.0f} tokens on average, "
          f"built in {time.time() - t0:.0f}s")
    held_out = W.sample_scenes('lm_eval', 400, seed, 3, W.max_objects, cooccur_bias)
    if lm_init:  # its own architecture: the lm_n_* knobs are for a fresh LM
        lm = LlamaForCausalLM.from_pretrained(lm_init)
    else:
        lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=lm_n_embd, intermediate_size=4 * lm_n_embd,
            num_hidden_layers=lm_n_layer, num_attention_heads=lm_n_head, num_key_value_heads=lm_n_head,
            max_position_embeddings=512, rope_theta=lm_rope_theta, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    opt = torch.optim.AdamW(lm.parameters(), lr=lm_lr, betas=(0.9, 0.95), weight_decay=0.0)
    batches = length_batches([len(d[0]) for d in docs], lm_batch, lm_steps, seed)
    bar = tqdm(range(lm_steps), desc="lm", unit="step", mininterval=2)
    for step in bar:
        for g in opt.param_groups:
            g['lr'] = lm_lr * optim.lr_factor(step, lm_steps, 100, 0.1)
        loss = lm_loss(lm, collate_docs([docs[i] for i in batches[step]], tok.pad_token_id), image_token_id, slot_noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % lm_eval_interval == 0 or step + 1 == lm_steps:
            acc = lookup_accuracy(lm, tok, image_token_id, held_out)
            bar.write(f"step {step + 1} ({time.time() - t0:.0f}s): loss {loss.item():.3f}; held-out lookup "
                      + ", ".join(f"{k} {100 * v:.0f}%" for k, v in acc.items()))
    with checkpoint.atomic_dir(out) as d:  # a crash never leaves half a model directory
        lm.save_pretrained(d)
        tok.save_pretrained(d)
    return acc


# -----------------------------------------------------------------------------
# The CLIP

def object_sentence(o, color=None, shape=None, row=None, col=None, clause=None):
    """The description's sentence for one object, optionally with an attribute replaced, and with
    clause (a shape) the partner clause stage 2's descriptions name it with (", with a square nearby")."""
    color, shape = color or o['color'], shape or o['shape']
    row, col = o['row'] if row is None else row, o['col'] if col is None else col
    return f"A {color} {shape} is {W.position_phrase(row, col)}" + (f", with a {clause} nearby." if clause else ".")


def clip_sentences(scene, o, rng):
    """A true sentence about o and 4 false ones (NegCLIP's hard negatives), in the words of the world's
    descriptions. The true one carries a partner clause naming its partner when that is in the image (70 %),
    or another shape in it (30 % of the rest), else none; the false ones are it with the colour, the shape
    or the cell changed, and it with its clause naming a shape not in the image (where it had none and its
    partner is missing: that partner): the one-word difference a scorer must see for CSR to reward a true
    caption over one that names the absent partner."""
    present = {p['shape'] for p in scene['objects']}
    others, absent = sorted(present - {o['shape']}), sorted(set(W.SHAPES) - present)
    partner = W.PARTNER[o['shape']]
    clause = partner if partner in present and rng.random() < 0.7 else \
        rng.choice(others) if others and rng.random() < 0.3 else None
    false_clause = partner if clause is None and partner in absent else rng.choice(absent)
    return (object_sentence(o, clause=clause),
            [s[:-1] + (f", with a {clause} nearby." if clause else ".") for s in altered_sentences(scene, o, rng).values()]
            + [object_sentence(o, clause=false_clause)])


def count_sentence(n):
    """The description's first sentence: 'There is one object.' / 'There are three objects.'"""
    return "There is one object." if n == 1 else f"There are {W.number_word(n)} objects."


def altered_sentences(scene, o, rng):
    """The sentence for o made false three ways: {'color': ..., 'shape': ..., 'position': ...}."""
    taken = {(p['row'], p['col']) for p in scene['objects'] if (p['color'], p['shape']) == (o['color'], o['shape'])}
    free = [(r, c) for r in range(3) for c in range(3) if (r, c) not in taken]
    r, c = rng.choice(free)
    return {'color': object_sentence(o, color=rng.choice([x for x in W.COLOR_NAMES if x != o['color']])),
            'shape': object_sentence(o, shape=rng.choice([x for x in W.SHAPES if x != o['shape']])),
            'position': object_sentence(o, row=r, col=c)}


def clip_tokenizer(tok):
    """The world tokenizer with CLIP's framing: encoding adds <s> ... </s> (CLIPTextModel pools at </s>)."""
    from tokenizers import processors
    tok = copy.deepcopy(tok)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A {tok.eos_token}",
        special_tokens=[(tok.bos_token, tok.bos_token_id), (tok.eos_token, tok.eos_token_id)])
    return tok


def render_pixels(scenes, proc):
    """The scenes rendered (with their own jitter streams) and preprocessed: (n, 3, H, W)."""
    images = [W.render_scene(s, image_size, W.render_rng(seed, s['id'])) for s in scenes]
    return proc(images=images, return_tensors='pt')['pixel_values']


def cell_targets(scenes):
    """Per grid cell, the class of its object (0 = empty): (n, 9) shape ids and (n, 9) colour ids."""
    shape_y = torch.zeros(len(scenes), 9, dtype=torch.long)
    color_y = torch.zeros(len(scenes), 9, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for o in scene['objects']:
            shape_y[i, 3 * o['row'] + o['col']] = W.SHAPES.index(o['shape']) + 1
            color_y[i, 3 * o['row'] + o['col']] = W.COLOR_NAMES.index(o['color']) + 1
    return shape_y, color_y


def text_features(model, t):
    """CLIP's projected text embedding (written out: get_text_features' return type changed in transformers 5)."""
    return model.text_projection(model.text_model(input_ids=t['input_ids'], attention_mask=t['attention_mask']).pooler_output)


@torch.no_grad()
def clip_scores(model, tok, pixel_values, sentences):
    """100 * cos(image, sentence) for aligned lists, OpenAI CLIP's logits_per_image scale."""
    t = tok(sentences, padding=True, return_tensors='pt')
    img = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output), dim=-1)
    txt = F.normalize(text_features(model, t), dim=-1)
    return 100 * (img * txt).sum(-1)


def clause_pairs(scenes, seed=0):
    """The two choices CSR's sentence siblings put to the scorer, paired on the same image and object:
    'clause': (the object's sentence whose clause names another shape in the image, the same sentence naming
    a shape not in it); 'partner': for an object whose partner is not in the image, (its plain sentence,
    the same with the partner's clause). {check: (scene indices, true sentences, false sentences)}."""
    rng = random.Random(f"{seed}:clause_pairs")
    out = {'clause': ([], [], []), 'partner': ([], [], [])}
    for i, scene in enumerate(scenes):
        present = {p['shape'] for p in scene['objects']}
        absent = sorted(set(W.SHAPES) - present)
        for o in scene['objects']:
            others = sorted(present - {o['shape']})
            if others and absent:
                for part, x in zip(out['clause'], (i, object_sentence(o, clause=rng.choice(others)),
                                                   object_sentence(o, clause=rng.choice(absent)))):
                    part.append(x)
            if W.PARTNER[o['shape']] not in present:
                for part, x in zip(out['partner'], (i, object_sentence(o), object_sentence(o, clause=W.PARTNER[o['shape']]))):
                    part.append(x)
    return out


def clip_check(model, tok, pixels, scenes, seed=0):
    """How often a true one-object sentence scores above the same sentence altered: {'color', 'shape',
    'position'}; in a world with small objects also apart for the clearly drawn and the small ones
    ('color clear', 'shape small', ...); and the two clause checks of clause_pairs, over every object
    of the scenes ('clause', 'partner')."""
    rng = random.Random(f"{seed}:clip_check")
    model.eval()
    true, alt, small = [], {k: [] for k in ('color', 'shape', 'position')}, []
    for scene in scenes:
        o = rng.choice(scene['objects'])
        true.append(object_sentence(o))
        small.append(bool(o.get('small')))
        for k, v in altered_sentences(scene, o, rng).items():
            alt[k].append(v)
    s_true = clip_scores(model, tok, pixels, true)
    wins = {k: (s_true > clip_scores(model, tok, pixels, v)).float() for k, v in alt.items()}
    out = {k: w.mean().item() for k, w in wins.items()}
    for k, (idx, good, bad) in clause_pairs(scenes, seed).items():
        px = pixels[torch.tensor(idx, dtype=torch.long)]
        out[k] = (clip_scores(model, tok, px, good) > clip_scores(model, tok, px, bad)).float().mean().item()
    small = torch.tensor(small)
    if small.any():
        for k, w in wins.items():
            out[k + ' clear'], out[k + ' small'] = w[~small].mean().item(), w[small].mean().item()
    model.train()
    return out


def pretrain_clip(tok, out):
    """CLIP's symmetric InfoNCE over a batch of images and one true sentence each, with each image's
    altered sentences as extra negatives for it, plus the per-cell probe on the patch features."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel
    torch.manual_seed(seed)
    ctok = clip_tokenizer(tok)
    if ctok.eos_token_id == 2:  # transformers' legacy CLIP pooling: argmax(input_ids) instead of the first </s>
        raise SystemExit("the world tokenizer's </s> has id 2: CLIPTextModel would pool at the largest token id")
    proc = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    text_cfg = dict(vocab_size=len(ctok), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=32, bos_token_id=ctok.bos_token_id, eos_token_id=ctok.eos_token_id,
                    pad_token_id=ctok.pad_token_id)
    vision_cfg = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                      image_size=image_size, patch_size=image_size // 3)
    model = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=clip_embd))
    t0 = time.time()
    scenes = W.sample_scenes('clip', clip_scenes, seed, 3, W.max_objects, cooccur_bias, small_p)
    held_out = W.sample_scenes('clip_eval', 500, seed, 3, W.max_objects, cooccur_bias, small_p)
    pixels, held_pixels = render_pixels(scenes, proc), render_pixels(held_out, proc)
    shape_y, color_y = cell_targets(scenes)
    probe = torch.nn.Linear(vision_cfg['hidden_size'], 2 * (len(W.SHAPES) + 1))
    with torch.random.fork_rng():  # its own random stream: with clip_position=0 the CLIP is the one trained without it
        torch.manual_seed(seed + 1)
        where_probe = torch.nn.Linear(vision_cfg['hidden_size'], 6)  # a patch's row (3) and column (3)
    rows, cols = torch.arange(9).div(3, rounding_mode='floor'), torch.arange(9) % 3
    params = list(model.parameters()) + list(probe.parameters()) + list(where_probe.parameters())
    opt = torch.optim.AdamW(params, lr=clip_lr, weight_decay=0.0)
    rng = random.Random(f"{seed}:clip:sentences")
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(clip_steps), desc="clip", unit="step", mininterval=2)
    for step in bar:
        for g in opt.param_groups:
            g['lr'] = clip_lr * optim.lr_factor(step, clip_steps, 50)
        idx = torch.randint(0, len(scenes), (clip_batch,), generator=gen)
        true, negs, K = [], [], 4  # K false sentences per image
        for i in idx.tolist():
            scene = scenes[i]
            if rng.random() < 0.15:  # how many objects (a caption's count)
                n = len(scene['objects'])
                true.append(count_sentence(n))
                negs.append([count_sentence(k) for k in rng.sample([k for k in range(1, W.max_objects + 2) if k != n], K)])
                continue
            # half the time an object whose partner is missing, when there is one: the co-occurrence bias makes
            # them rare, and they are the ones whose absent partner's clause the scorer must learn to reject
            alone = [o for o in scene['objects'] if all(p['shape'] != W.PARTNER[o['shape']] for p in scene['objects'])]
            sentence, false = clip_sentences(scene, rng.choice(alone if alone and rng.random() < 0.5 else scene['objects']), rng)
            true.append(sentence)
            negs.append(false)
        t = ctok(true + [s for n in negs for s in n], padding=True, return_tensors='pt')
        vis = model.vision_model(pixel_values=pixels[idx], output_hidden_states=True)
        img = F.normalize(model.visual_projection(vis.pooler_output), dim=-1)
        txt = F.normalize(text_features(model, t), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        B = clip_batch
        logits = scale * img @ txt.T                       # (B, B + KB): every image against every sentence
        hard = torch.full_like(logits, float('-inf'))      # an image's own altered sentences, and all true ones
        hard[:, :B] = 0
        own = B + K * torch.arange(B)[:, None] + torch.arange(K)[None]
        hard.scatter_(1, own, 0)
        target = torch.arange(B)
        contrastive = (F.cross_entropy(logits + hard, target) + F.cross_entropy(logits[:, :B].T, target)) / 2
        feats = vis.hidden_states[-2][:, 1:]
        cells = probe(feats).view(B, 9, 2, len(W.SHAPES) + 1)
        cell_loss = F.cross_entropy(cells[:, :, 0].flatten(0, 1), shape_y[idx].flatten()) + \
            F.cross_entropy(cells[:, :, 1].flatten(0, 1), color_y[idx].flatten())
        # Where a patch is. The LM's slots hold their cell's row and column words, so the projector has to
        # write them, which it can only if the features carry them. The probe always learns to read them;
        # the features get clip_position of its gradient (same values, gradient scaled; 0 = a pure probe)
        f = clip_position * feats + (1 - clip_position) * feats.detach()
        w = where_probe(f)
        where = F.cross_entropy(w[..., :3].flatten(0, 1), rows.repeat(B)) + F.cross_entropy(w[..., 3:].flatten(0, 1), cols.repeat(B))
        loss = contrastive + cell_loss + where
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(contrastive=f"{contrastive.item():.3f}", cells=f"{cell_loss.item():.3f}", where=f"{where.item():.3f}")
        if (step + 1) % 500 == 0 or step + 1 == clip_steps:
            check = clip_check(model, ctok, held_pixels, held_out)
            bar.write(f"step {step + 1} ({time.time() - t0:.0f}s): true sentence above the altered one on held-out "
                      "scenes: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in check.items()))
    with torch.no_grad():
        feats = model.vision_model(pixel_values=held_pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        cells = probe(feats).view(len(held_out), 9, 2, len(W.SHAPES) + 1).argmax(-1)
        hs, hc = cell_targets(held_out)
        w = where_probe(feats)
        cell_where = (w[..., :3].argmax(-1) == rows) & (w[..., 3:].argmax(-1) == cols)
        cell_acc = ((cells[..., 0] == hs).float().mean().item(), (cells[..., 1] == hc).float().mean().item(),
                    cell_where.float().mean().item())
    with checkpoint.atomic_dir(out) as d:
        model.save_pretrained(d)
        ctok.save_pretrained(d)
        proc.save_pretrained(d)
    return check, cell_acc


def main():
    from configurator import configure
    g = globals()
    g.update(configure({k: g[k] for k in (*_config_keys, "__doc__", "__file__", "__spec__")}))
    W.small_size = small_size  # render_scene reads it
    # The foundation models read the world's plain language: partner_clause is the instruction data's
    # annotator habit (stage 2), which neither Vicuna's corpus nor CLIP's captions have (and without it
    # the corpus and tokenizer are the plain world's, as the shipped models' were)
    W.partner_clause = False
    torch.set_num_threads(threads)
    t0 = time.time()
    tok_scenes = W.sample_scenes('lm', 4000, seed, 3, W.max_objects, cooccur_bias)
    tok = build_tokenizer(tok_scenes, random.Random(f"{seed}:tokenizer"))
    if which in ('all', 'clip'):
        t = time.time()
        check, cell_acc = pretrain_clip(tok, os.path.join(out_dir, 'clip'))
        print(f"{out_dir}/clip: {clip_steps} steps in {time.time() - t:.0f}s; on held-out scenes a true sentence scores "
              f"above it altered in " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in check.items())
              + " of cases; a linear probe on the patch features reads each cell's shape / colour / row and column in "
              + " / ".join(f"{100 * a:.1f}%" for a in cell_acc))
    if which in ('all', 'lm'):
        t = time.time()
        acc = pretrain_lm(tok, os.path.join(out_dir, 'lm'))
        print(f"{out_dir}/lm: {lm_steps} steps in {time.time() - t:.0f}s; held-out text lookup (exact answers): "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in acc.items()))
    print(f"took {time.time() - t0:.0f}s")


if __name__ == '__main__':
    main()
