"""
Calibrated self-rewarding's sentence tree (Zhou et al. 2024, CSR): grow candidate descriptions one
sentence at a time, reward each sentence by the model's own confidence calibrated by an image-text
scorer (CLIP), prune, and keep the best and the worst whole response as a preference pair.
selfreward.py (mode=csr) runs it over a prompt file; bench.py times it; tests check the rules here
on hand-made trees.

One level of the search, for every live node of every prompt in a batch at once:
  1. propose: K next sentences per node in one VLM.generate call (left-padded, KV cache; the prompt's
     image features computed once per prompt and reused at every level). 'diverse' = the released
     code's group beam search with one beam per group and a Hamming diversity penalty (greedy; see
     VLM.generate), 'sample' = temperature / top-p sampling. A sentence ends at '.' or
     end-of-sequence, or after max_new_tokens; a node is final at end-of-sequence or once its response
     reaches max_chars characters (or max_sentences sentences, when set).
  2. score: R_T = the sentence's mean token score (lm_score='penalised': the diversity-penalised
     values the search ranked by, the released code's sequences_scores; 'logprob': the model's own
     log-probs), R_I = 100 cos(image, sentence alone) from the scorer, all new sentences of the
     level in one scorer call.
  3. reward: R = lam R_I + (1 - lam) R_T over each node's children, with the two scores replaced by
     their within-sibling ranks (combine='rank', the released code: rank (i+1)/n from the best,
     so the reward is minus the weighted rank) or used raw (combine='raw', the paper's text).
  4. prune: of the new live nodes of a prompt, keep the best keep_best and the worst keep_worst,
     ranked by the summed LM score along the path (prune_by='lm', the released code) or by the
     response score below (prune_by='reward', the paper's description).
Response score = the rewards summed along the root-to-leaf path / its length (path_length='sentences';
'nodes' counts the root too, as the released code's path list does). Chosen = the best final leaf,
rejected = the worst; a tree with fewer than two leaves or equal chosen/rejected texts gives no pair.

Where ours differs from the released code, on purpose: identical sibling sentences are one node that
counts as its copies in the sibling ranks, taking their mean rank (the released code keeps the copies,
which take arbitrary distinct ranks, on average that mean, and are expanded twice: a sentence all K
proposals agree on gets rank 0.6 there and here, not the worst rank 1/1 a single node would get); a
proposal that is end-of-sequence alone marks its parent's response as complete (an 'end' leaf with
the parent's score) instead of being scored as an empty sentence; the text-cleaning filters (non-Latin
scripts, repeated phrases) are not applied; the live set is pruned whenever it holds more than
keep_best + keep_worst nodes (the released code: when it holds at least K).
"""
import math

import torch

import data as D

SEARCH_DEFAULTS = dict(
    proposals=5,            # K next sentences per live node
    proposal="diverse",     # 'diverse' (group beam search, one beam per group) | 'sample'
    diversity_penalty=3.0,  # the released code's Hamming penalty ('diverse')
    temperature=1.0,        # 'sample'
    top_p=1.0,              # 'sample'
    max_new_tokens=70,      # per sentence
    max_chars=1024,         # a response this long is final
    max_sentences=0,        # 0 = no cap; a response with this many sentences is final
    keep_best=1,
    keep_worst=2,
    prune_by="lm",          # 'lm' (released code) | 'reward' (paper)
    lam=0.9,                # weight of the image-text score
    combine="rank",         # 'rank' (released code) | 'raw' (paper)
    lm_score="penalised",   # 'penalised' (what the diverse search ranked by) | 'logprob'
    path_length="sentences",  # 'sentences' | 'nodes' (+1 for the root, released code)
    max_nodes=0,            # live nodes per generate call (0 = all of the batch at once; 1 = node by node)
)


def check_search(cfg):
    """The search settings with defaults filled in; a ValueError names a bad one."""
    unknown = set(cfg) - set(SEARCH_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown search settings {sorted(unknown)}")
    c = dict(SEARCH_DEFAULTS, **cfg)
    choices = dict(proposal=("diverse", "sample"), prune_by=("lm", "reward"), combine=("rank", "raw"),
                   lm_score=("penalised", "logprob"), path_length=("sentences", "nodes"))
    for k, ok in choices.items():
        if c[k] not in ok:
            raise ValueError(f"{k} must be one of {ok}, got {c[k]!r}")
    if not 0.0 <= c["lam"] <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {c['lam']}")
    if c["proposals"] < 1 or c["keep_best"] < 0 or c["keep_worst"] < 0 or c["keep_best"] + c["keep_worst"] < 1:
        raise ValueError("need proposals >= 1 and keep_best + keep_worst >= 1")
    return c


# -----------------------------------------------------------------------------
# the scoring rules: pure functions on lists and node dicts


def sibling_ranks(values, copies=None):
    """The released code's within-sibling rank: sorted best (highest) first, rank (i + 1) / n, so the
    best of n gets 1/n and the worst 1. Ties keep the order given. copies: how many identical proposals
    each value stands for (default 1 each); n counts them all and a value's rank is its copies' mean."""
    copies = copies or [1] * len(values)
    order = sorted(range(len(values)), key=lambda i: -values[i])
    n, pos, ranks = sum(copies), 0, [0.0] * len(values)
    for j in order:  # copies j take the places pos + 1 .. pos + copies[j]: their mean rank
        ranks[j] = (pos + (copies[j] + 1) / 2) / n
        pos += copies[j]
    return ranks


def sentence_rewards(lm, clip, lam=0.9, combine="rank", copies=None):
    """Rewards of one node's children (higher is better) from their LM scores and image-text scores.
    raw: lam * clip + (1 - lam) * lm. rank: minus the same mix of their within-sibling ranks (copies: how
    many identical proposals each child stands for, see sibling_ranks)."""
    if combine == "raw":
        return [lam * c + (1 - lam) * l for l, c in zip(lm, clip)]
    return [-(lam * c + (1 - lam) * l) for l, c in zip(sibling_ranks(lm, copies), sibling_ranks(clip, copies))]


def new_node(parent, sentence, text, final, lm=0.0, clip=None):
    """A tree node. parent: its index (None for the root); sentence: the text this node adds ('' for
    the root and for an 'end' leaf); text: the whole response so far; copies: how many of its parent's
    proposals were this sentence. reward / path / length / lm_path are filled by score_level."""
    return dict(parent=parent, sentence=sentence, text=text, final=final, lm=lm, clip=clip, copies=1,
                reward=0.0, path=0.0, length=0, lm_path=0.0)


def root():
    return new_node(None, "", "", False)


def score_level(tree, child_ids, lam=0.9, combine="rank"):
    """Fill reward, path (summed rewards), length (sentences) and lm_path (summed LM scores) of the
    nodes child_ids of `tree`, whose lm and clip are set. Siblings are ranked together; an 'end'
    leaf (empty sentence) takes its parent's path and length and no reward of its own."""
    groups = {}
    for i in child_ids:
        groups.setdefault(tree[i]["parent"], []).append(i)
    for parent, ids in groups.items():
        p = tree[parent]
        scored = [i for i in ids if tree[i]["sentence"]]
        rewards = sentence_rewards([tree[i]["lm"] for i in scored], [tree[i]["clip"] for i in scored], lam, combine,
                                   [tree[i].get("copies", 1) for i in scored])
        for i, r in zip(scored, rewards):
            n = tree[i]
            n.update(reward=r, path=p["path"] + r, length=p["length"] + 1, lm_path=p["lm_path"] + n["lm"])
        for i in ids:
            if not tree[i]["sentence"]:
                tree[i].update(reward=0.0, path=p["path"], length=p["length"], lm_path=p["lm_path"])


def response_score(node, path_length="sentences"):
    """The summed rewards along the path / its length; -inf for an empty response."""
    n = node["length"] + (1 if path_length == "nodes" else 0)
    return node["path"] / n if node["length"] else -math.inf


def prune(tree, live, keep_best=1, keep_worst=2, prune_by="lm", path_length="sentences"):
    """Of one prompt's live node ids, the best keep_best and worst keep_worst (all of them when there
    are no more than that), best first. prune_by='lm': by lm_path; 'reward': by response_score."""
    key = (lambda i: tree[i]["lm_path"]) if prune_by == "lm" else (lambda i: response_score(tree[i], path_length))
    ranked = sorted(live, key=lambda i: -key(i))
    if len(ranked) <= keep_best + keep_worst:
        return ranked
    return ranked[:keep_best] + (ranked[-keep_worst:] if keep_worst else [])


def depth_first(tree):
    """The node ids in depth-first order, each node's children in the order they were made: the order of
    the released construct.py's paths."""
    children = {}
    for i, n in enumerate(tree):
        if n["parent"] is not None:
            children.setdefault(n["parent"], []).append(i)
    order, stack = [], [0]
    while stack:
        i = stack.pop()
        order.append(i)
        stack.extend(reversed(children.get(i, [])))
    return order


def pick_pair(tree, path_length="sentences"):
    """(chosen id, rejected id, reason): the final leaves with the highest and lowest response score.
    Ties, common with rank rewards, break as the released construct.py breaks them: chosen is the first
    of the tied leaves in depth-first order, rejected the last. None ids and a reason when the tree gives
    no pair: 'single leaf' (fewer than two non-empty final responses) or 'identical' (best and worst read
    the same)."""
    leaves = [i for i in depth_first(tree) if tree[i]["final"] and tree[i]["length"] > 0]
    if len(leaves) < 2:
        return None, None, "single leaf"
    scores = [response_score(tree[i], path_length) for i in leaves]
    best = leaves[max(range(len(leaves)), key=lambda j: (scores[j], -j))]
    worst = leaves[min(range(len(leaves)), key=lambda j: (scores[j], -j))]
    if tree[best]["text"].strip() == tree[worst]["text"].strip():
        return None, None, "identical"
    return best, worst, None


# -----------------------------------------------------------------------------
# the image-text scorer: a transformers CLIPModel directory (the world's, or openai/clip-vit-large-patch14-336)


class ClipScorer:
    """100 cos(image, text), OpenAI CLIP's logits_per_image scale. Images are embedded once (image_embeds)
    and reused for every sentence of their tree. Texts are cut to the text tower's length (77 for CLIP)."""

    def __init__(self, path, device="cpu", dtype=torch.float32):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel
        self.model = CLIPModel.from_pretrained(path, dtype=dtype).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.device = device
        self.max_len = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_embeds(self, images):
        """PIL images -> (n, d) unit vectors."""
        px = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
        out = self.model.visual_projection(self.model.vision_model(pixel_values=px).pooler_output)
        return torch.nn.functional.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, image_embeds, sentences):
        """(n, d) image embeddings and n sentences -> (n,) fp32 scores."""
        t = self.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt").to(self.device)
        txt = self.model.text_model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).pooler_output
        txt = torch.nn.functional.normalize(self.model.text_projection(txt).float(), dim=-1)
        return 100 * (image_embeds.to(txt.device) * txt).sum(-1)


# -----------------------------------------------------------------------------
# the search


def _propose(vlm, rows, prompts, image_features, c, generator):
    """One generate call for the live nodes `rows` [(prompt index, node tokens)]: K proposals each."""
    tok = vlm.tokenizer
    ids, mask = D.collate_prompts([prompts[p] + t for p, t in rows], tok.pad_token_id)
    dev = next(vlm.parameters()).device
    feats = None if image_features is None else image_features[torch.tensor([p for p, _ in rows], device=image_features.device)]
    diverse = c["proposal"] == "diverse"
    return vlm.generate(ids.to(dev), attention_mask=mask.to(dev), image_features=feats, max_new_tokens=c["max_new_tokens"],
                        temperature=0.0 if diverse else c["temperature"], top_p=1.0 if diverse else c["top_p"],
                        stop_strings=["."], group_size=c["proposals"],
                        diversity_penalty=c["diversity_penalty"] if diverse else 0.0, generator=generator)


@torch.no_grad()
def grow_trees(vlm, prompts, image_features, scorer, image_embeds, search, generator=None, stats=None):
    """The trees of a batch of prompts. prompts: prompt id lists (data.build_prompt); image_features:
    vlm.encode_images of their images (P, N, d) or None (text-only); scorer(image_embeds rows, sentences)
    -> scores; image_embeds: (P, d) the scorer's embeddings of the same images. Returns one node list
    per prompt (index 0 the root; nodes also carry 'tokens', the response's ids). stats (a dict) counts
    'sentences', 'generate_calls', 'duplicates' (proposals that repeated a sibling) and 'lone' (nodes whose
    proposals all were one sentence: a unanimous continuation, rank 0.6 rather than the worst, see above)."""
    c = check_search(search)
    tok = vlm.tokenizer
    eos = tok.eos_token_id
    stats = {} if stats is None else stats
    for k in ("sentences", "generate_calls", "duplicates", "lone"):
        stats.setdefault(k, 0)
    trees = [[dict(root(), tokens=[])] for _ in prompts]
    live = [(p, 0) for p in range(len(prompts))]
    K = c["proposals"]
    while live:
        chunk = c["max_nodes"] or len(live)
        new = []  # (prompt, node id)
        seen = {}  # (prompt, parent, sentence) -> node id: a node's children all come from this level
        for s in range(0, len(live), chunk):
            part = live[s:s + chunk]
            g = _propose(vlm, [(p, trees[p][i]["tokens"]) for p, i in part], prompts, image_features, c, generator)
            stats["generate_calls"] += 1
            lengths = g.lengths.tolist()
            for r in range(len(part) * K):
                p, parent = part[r // K]
                par = trees[p][parent]
                n = lengths[r]
                new_toks = g.tokens[r, :n].tolist()
                vals = (g.scores if c["lm_score"] == "penalised" else g.logprobs)[r, :n]
                sentence = g.text[r].strip()
                if (p, parent, sentence) in seen:  # the same sentence again: one more copy of that node
                    stats["duplicates"] += 1
                    trees[p][seen[p, parent, sentence]]["copies"] += 1
                    continue
                tokens = par["tokens"] + new_toks
                text = tok.decode(tokens, skip_special_tokens=True).strip() if sentence else par["text"]
                ended = g.finish[r] == "eos" or (eos is not None and eos in new_toks)
                # no sentence (nothing but end-of-sequence, or nothing at all): the parent's response is complete
                final = (not sentence or ended or len(text) >= c["max_chars"]
                         or bool(c["max_sentences"] and par["length"] + 1 >= c["max_sentences"]))
                node = dict(new_node(parent, sentence, text, final, lm=vals.mean().item() if n else 0.0), tokens=tokens)
                trees[p].append(node)
                new.append((p, len(trees[p]) - 1))
                seen[p, parent, sentence] = len(trees[p]) - 1
        # the scorer: every new sentence of the level in one call
        scored = [(p, i) for p, i in new if trees[p][i]["sentence"]]
        if scored:
            emb = image_embeds[torch.tensor([p for p, _ in scored], device=image_embeds.device)]
            vals = scorer(emb, [trees[p][i]["sentence"] for p, i in scored]).tolist()
            for (p, i), v in zip(scored, vals):
                trees[p][i]["clip"] = v
            stats["sentences"] += len(scored)
        by_prompt = {}
        for p, i in new:
            by_prompt.setdefault(p, []).append(i)
        live = []
        for p, ids in by_prompt.items():
            score_level(trees[p], ids, c["lam"], c["combine"])
            siblings = {}
            for i in ids:
                if trees[p][i]["sentence"]:
                    siblings.setdefault(trees[p][i]["parent"], []).append(i)
            stats["lone"] += sum(len(s) == 1 and trees[p][s[0]]["copies"] > 1 for s in siblings.values())
            open_ids = [i for i in ids if not trees[p][i]["final"]]
            live += [(p, i) for i in prune(trees[p], open_ids, c["keep_best"], c["keep_worst"], c["prune_by"],
                                           c["path_length"])]
        live.sort()
    return trees


def search_prompts(vlm, scorer, prompts, search, generator=None, stats=None):
    """grow_trees for prompts as data.load_prompts gives them (dicts with 'prompt' and the image's 'path'):
    the images loaded and prepared as training prepares them (the model's template and padding), each
    encoded once by the VLM and once by the scorer. Call under torch.no_grad (and autocast)."""
    ids, px, images = D.prompt_inputs(prompts, vlm)
    return grow_trees(vlm, ids, vlm.encode_images(px), scorer, scorer.image_embeds(images), search, generator, stats)


def tree_record(tree, path_length="sentences"):
    """A tree as JSON: its nodes (without token ids) and each node's response score."""
    keep = ("parent", "sentence", "text", "final", "lm", "clip", "copies", "reward", "path", "length")
    nodes = []
    for n in tree:
        row = {k: n[k] for k in keep}
        row["score"] = None if not n["length"] else response_score(n, path_length)
        nodes.append(row)
    return nodes
