"""
A LLaVA-style vision-language model, written to be read top to bottom.

    image -> vision tower (transformers CLIP / SigLIP) -> Projector (ours) -> written into the
    positions of the image token -> causal LM (transformers) -> our fused linear + cross-entropy

Contents:
  1. Projector and the VLM itself: forward, token log-probs, KV-cache generation, its save / load methods
  2. loading and saving: our checkpoint directory, llava-hf directories, building from parts
  3. fused_linear_cross_entropy: the LM head + loss without ever materialising tokens x vocab logits,
     with our Triton kernel on CUDA and a chunked PyTorch path everywhere else
The training machinery around it (distributed setup, optimizer, checkpoints and resume, LoRA, the
DPO loss) lives in lucid/.
"""

import json
import os
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lucid.checkpoint import atomic_dir

IGNORE_INDEX = -100
PARTS = ("vision", "projector", "lm")  # the three trainable parts; learning rates and freezing are per part
CHECKPOINT_TYPE = "lucid_vlm"          # config.json's model_type for our own checkpoint directories

# -----------------------------------------------------------------------------
# 1. the projector and the VLM (forward, generation, saving and loading)

class Projector(nn.Module):
    """LLaVA's connector. mlp2x_gelu: Linear(vision -> d) -> GELU -> Linear(d -> d); linear: one Linear.
    Module names match llava-hf's `multi_modal_projector` so weights map one to one."""

    def __init__(self, vision_dim, text_dim, kind="mlp2x_gelu", bias=True):
        super().__init__()
        if kind not in ("mlp2x_gelu", "linear"):
            raise ValueError(f"projector_type must be 'mlp2x_gelu' or 'linear', got {kind!r}")
        self.kind = kind
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        if kind == "mlp2x_gelu":
            self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x):
        x = self.linear_1(x)
        if self.kind == "mlp2x_gelu":
            x = self.linear_2(F.gelu(x))
        return x


def _vision_class(cfg):
    from transformers.models.auto.modeling_auto import MODEL_MAPPING
    return MODEL_MAPPING[type(cfg)]  # clip_vision_model -> CLIPVisionModel, siglip_vision_model -> SiglipVisionModel


def _lm_class(cfg):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]


def _as_config(c):
    from transformers import AutoConfig, PretrainedConfig
    if isinstance(c, PretrainedConfig):
        return c
    c = dict(c)
    return AutoConfig.for_model(c.pop("model_type"), **c)


# what VLM.generate returns (see its docstring)
Generation = namedtuple("Generation", "tokens logprobs scores lengths finish text")


def stop_string_in_tail(tokenizer, ids, stop_strings):
    """Whether a stop string ends in the text of the newest token of `ids` (non-special ids, oldest first),
    given that generation checks after every token (so none ended earlier). Only the tail that can hold
    such a string is decoded, not the whole row every step: a character is at most 4 tokens (byte-level
    BPE and byte fallback split UTF-8 into bytes), plus one token whose leading space a decoder may drop."""
    window = 4 * max(map(len, stop_strings)) + 1
    tail = tokenizer.decode(ids[-window:], skip_special_tokens=True)
    return any(s in tail for s in stop_strings)


class VLM(nn.Module):
    """vision (transformers vision model) + projector (ours) + lm (transformers causal LM).

    config keys: vision_config, text_config (transformers config dicts), projector_type,
    projector_bias, vision_feature_layer (default -2, LLaVA's penultimate), vision_feature_select_strategy
    ("default" drops CLIP's CLS token, "full" keeps every token), image_token_id, template (the chat
    template data.py uses for this model), pad_to_square. `tokenizer` and `image_processor` ride along
    as plain attributes so one from_pretrained call gives everything needed to run the model.
    """

    def __init__(self, config, vision=None, lm=None, attn_implementation="sdpa"):
        super().__init__()
        vcfg, tcfg = _as_config(config["vision_config"]), _as_config(config["text_config"])
        self.config = dict(config, vision_config=vcfg.to_dict(), text_config=tcfg.to_dict())
        self.config.setdefault("projector_type", "mlp2x_gelu")
        self.config.setdefault("projector_bias", True)
        self.config.setdefault("vision_feature_layer", -2)
        self.config.setdefault("vision_feature_select_strategy", "default" if "clip" in vcfg.model_type else "full")
        self.config.setdefault("template", "vicuna_v1")
        self.config.setdefault("pad_to_square", True)
        if vision is None:
            vcfg._attn_implementation = attn_implementation
            vision = _vision_class(vcfg)(vcfg)
        if lm is None:
            tcfg._attn_implementation = attn_implementation
            lm = _lm_class(tcfg)(tcfg)
        if getattr(lm.config, "final_logit_softcapping", None) or getattr(lm.get_output_embeddings(), "bias", None) is not None:
            raise ValueError("LMs with logit soft-capping or an output bias are not supported by the fused loss")
        self.vision, self.lm = vision, lm
        self.projector = Projector(vcfg.hidden_size, tcfg.hidden_size, self.config["projector_type"], self.config["projector_bias"])
        self.image_token_id = int(config["image_token_id"])
        self.sharded = False  # set by lucid.common.shard_fsdp: every rank must then run the same collectives
        self.tokenizer = None
        self.image_processor = None

    @property
    def num_image_tokens(self):
        """Image-token copies per image: patches (+ CLS when the strategy keeps it)."""
        v = self.vision.config
        n = (v.image_size // v.patch_size) ** 2
        has_cls = "clip" in v.model_type
        return n + 1 if (has_cls and self.config["vision_feature_select_strategy"] == "full") else n

    def encode_images(self, pixel_values):
        """(n_img, 3, H, W) -> (n_img, num_image_tokens, d_text)."""
        out = self.vision(pixel_values.to(self.projector.linear_1.weight.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.config["vision_feature_layer"]]
        if self.config["vision_feature_select_strategy"] == "default" and "clip" in self.vision.config.model_type:
            feats = feats[:, 1:]  # drop CLS, as LLaVA does
        return self.projector(feats)

    def embed(self, input_ids, pixel_values=None, image_repeat=1, image_features=None):
        """Token embeddings with the image features written into the image-token positions.
        image_repeat=k: the rows are k groups that share their images (DPO's chosen rows, then the
        rejected ones): the images are encoded once and their features used by each group in turn.
        image_features: encode_images' output computed by the caller, used instead of pixel_values
        (self-rewarding encodes each prompt's image once and reuses it at every level of its tree)."""
        image_mask = input_ids == self.image_token_id
        emb = self.lm.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        if image_features is not None or (pixel_values is not None and len(pixel_values)):
            feats = self.encode_images(pixel_values) if image_features is None else image_features
            if image_repeat > 1:
                feats = feats.repeat(image_repeat, 1, 1)
            if image_mask.sum().item() != feats.shape[0] * feats.shape[1]:
                raise ValueError(f"{int(image_mask.sum())} image tokens in input_ids but {feats.shape[0]} images x "
                                 f"{feats.shape[1]} features; data.py must expand each <image> to {self.num_image_tokens} tokens")
            # one masked assignment; images fill the positions in row-major order
            emb = emb.masked_scatter(image_mask[..., None], feats.to(emb.dtype))
        elif image_mask.any():
            raise ValueError("input_ids contain image tokens but no pixel_values were given")
        elif self.sharded or (self.training and any(p.requires_grad for p in
                                                    [*self.vision.parameters(), *self.projector.parameters()])):
            # a text-only batch: touch the vision path with zero weight so DDP sees every trainable
            # parameter used on every rank (otherwise its gradient all-reduce hangs or errors); under
            # FSDP2, trained or not, in eval too: the other ranks all-gather the vision blocks and wait for this one
            v = self.vision.config
            dummy = torch.zeros(1, 3, v.image_size, v.image_size, device=emb.device)
            emb = emb + 0.0 * self.encode_images(dummy).sum()
        return emb

    def hidden_states(self, input_ids, pixel_values=None, attention_mask=None, image_repeat=1):
        emb = self.embed(input_ids, pixel_values, image_repeat)
        return self.lm.base_model(inputs_embeds=emb, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None, reduction="mean", image_repeat=1):
        """labels None -> logits (B, T, V). Otherwise the next-token loss over positions whose label is
        not IGNORE_INDEX (labels are aligned with input_ids and shifted here, the llava-hf convention),
        computed by the fused loss from the final hidden states: only supervised rows are projected.
        reduction='none': one loss per supervised position, in row-major order; 'row': each row's summed
        loss (B,) fp32, i.e. minus its sequence log-prob (DPO)."""
        h = self.hidden_states(input_ids, pixel_values, attention_mask, image_repeat)
        w = self.lm.get_output_embeddings().weight
        if labels is None:
            return h @ w.T
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if reduction == "row":
            per = fused_linear_cross_entropy(h[:, :-1][keep], w, targets[keep], reduction="none")
            rows = torch.zeros(keep.shape[0], dtype=torch.float32, device=h.device)
            return rows.index_add(0, keep.nonzero()[:, 0], per.float())
        return fused_linear_cross_entropy(h[:, :-1][keep], w, targets[keep], reduction=reduction)

    def token_logprobs(self, input_ids, pixel_values=None, attention_mask=None, labels=None, image_repeat=1):
        """log p(labels[:, t + 1] | tokens <= t) at every supervised position: (B, T - 1) fp32, 0 where
        the label is IGNORE_INDEX, differentiable. DPO sums them per sequence, self-rewarding averages
        them per sentence. The fused loss with reduction='none' does the work: only supervised rows
        are projected, and backward recomputes their logits from a saved logsumexp per row."""
        h = self.hidden_states(input_ids, pixel_values, attention_mask, image_repeat)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        lp = -fused_linear_cross_entropy(h[:, :-1][keep], self.lm.get_output_embeddings().weight, targets[keep],
                                         reduction="none")
        return torch.zeros(targets.shape, dtype=torch.float32, device=h.device).masked_scatter(keep, lp)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=32, temperature=0.0,
                 top_p=1.0, eos_token_id=None, stop_token_ids=(), stop_strings=(), tokenizer=None, generator=None,
                 group_size=1, diversity_penalty=0.0, image_features=None):
        """Batched generation from LEFT-padded prompts, with the LM's own KV cache: one prefill forward
        over the prompt embeddings (image features written in), then one token per forward.

        Greedy when temperature is 0, else sampling from softmax(logits / temperature), restricted to the
        nucleus of mass top_p when top_p < 1. A row ends at an end-of-sequence id (eos_token_id: an id or
        a list of them; None = the tokenizer's), at one of stop_token_ids, when its new text contains one
        of stop_strings (self-rewarding stops at the end of each sentence), or after max_new_tokens. The
        token that ends a row is kept, so a caller can continue from exactly these tokens.

        Returns a Generation: tokens (B, n) new ids (after a row's length: padding), logprobs (B, n) fp32
        log p(token) under the model's own distribution (temperature 1, no nucleus; 0 after a row's
        length), lengths (B,), finish per row ('eos' | 'stop' | 'length'), and text per row (the row's
        tokens decoded without special tokens; None when no tokenizer is given or attached).

        group_size=K: each prompt row gives K consecutive output rows (B*K in all); the prompt is
        prefilled once and its KV cache copied K times. diversity_penalty=d > 0 (greedy only) makes
        the K rows diverse as group beam search with one beam per group and a Hamming diversity
        penalty does (transformers' num_beam_groups=num_beams=K): at each step row k takes the argmax
        of log p(token) - d * (how many of rows 0..k-1 of its group, still running, took that token at
        this step). scores (B*K, n) are those penalised values of the chosen tokens (== logprobs when
        d = 0): what that search ranks by. image_features: see embed."""
        from transformers import DynamicCache
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        eos_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        stop_ids = list(stop_token_ids)
        stop_strings = [stop_strings] if isinstance(stop_strings, str) else [s for s in stop_strings if s]
        if stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer (pass tokenizer= or attach one to the model)")
        special = set(getattr(tokenizer, "all_special_ids", ()))
        B, dev = input_ids.shape[0], input_ids.device
        end_ids = torch.tensor(eos_ids + stop_ids, dtype=torch.long, device=dev)
        fill = (eos_ids + stop_ids + [0])[0]

        K = int(group_size)
        diverse = bool(diversity_penalty) and K > 1
        if K < 1 or (diversity_penalty and temperature > 0):
            raise ValueError("group_size must be >= 1, and diversity_penalty needs greedy decoding (temperature 0)")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: every row's first real token is position 0
        cache = DynamicCache(config=self.lm.config)
        base, w = self.lm.base_model, self.lm.get_output_embeddings().weight
        h = base(inputs_embeds=self.embed(input_ids, pixel_values, image_features=image_features), attention_mask=mask,
                 position_ids=pos, cache=cache, use_cache=True).last_hidden_state[:, -1:]
        pos = pos[:, -1:]
        if K > 1:  # one prefill per prompt, then K copies of its cache
            cache.batch_repeat_interleave(K)
            h, pos, mask = h.repeat_interleave(K, 0), pos.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)
            B *= K
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        finish = ["length"] * B
        toks, lps, scs, seen = [], [], [], [[] for _ in range(B)]  # seen: each row's ids, kept only for stop strings
        T = mask.shape[1]
        mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1)  # the new tokens' columns, used one by one
        for step in range(max_new_tokens):
            logits = (h[:, -1] @ w.T).float()
            lse = logits.logsumexp(-1)  # log p(token) = logit - lse: no (B, vocab) log-softmax tensor per step
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_p < 1.0:  # nucleus: the smallest set of most likely tokens whose mass reaches top_p
                    sp, si = probs.sort(dim=-1, descending=True)
                    drop = sp.cumsum(-1) - sp > top_p
                    probs = torch.zeros_like(probs).scatter_(-1, si, sp.masked_fill(drop, 0.0))
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            elif diverse:
                nxt, sc = self._diverse_step(logits - lse[:, None], done, K, diversity_penalty)
            else:
                nxt = logits.argmax(-1)
            lp = logits.gather(1, nxt[:, None]).squeeze(1) - lse
            if not diverse:
                sc = lp
            nxt, lp, sc = nxt.masked_fill(done, fill), lp.masked_fill(done, 0.0), sc.masked_fill(done, 0.0)
            toks.append(nxt); lps.append(lp); scs.append(sc)
            lengths += ~done
            hit = (nxt[:, None] == end_ids).any(-1) & ~done
            if stop_strings or (len(end_ids) and hit.any()):  # per-row work only when a row may have ended
                new, hit_l, done_l = nxt.tolist(), hit.tolist(), done.tolist()
                for b in range(B):
                    if done_l[b]:
                        continue
                    if hit_l[b]:
                        finish[b] = "eos" if new[b] in eos_ids else "stop"
                    elif stop_strings and new[b] not in special:
                        seen[b].append(new[b])
                        if stop_string_in_tail(tokenizer, seen[b], stop_strings):
                            finish[b], hit[b] = "stop", True
                done |= hit
            if self._all_done(done):
                break
            pos = pos + 1
            h = base(inputs_embeds=self.lm.get_input_embeddings()(nxt[:, None]), attention_mask=mask[:, :T + step + 1],
                     position_ids=pos, cache=cache, use_cache=True).last_hidden_state
        n = int(lengths.max()) if B else 0  # under FSDP2 a finished rank steps on with the others: drop those columns
        tokens = torch.stack(toks, 1)[:, :n] if toks else input_ids.new_zeros(B, 0)
        logprobs = torch.stack(lps, 1)[:, :n] if lps else torch.zeros(B, 0, device=dev)
        scores = torch.stack(scs, 1)[:, :n] if scs else torch.zeros(B, 0, device=dev)
        text = None
        if tokenizer is not None:
            text = [tokenizer.decode(r[:n], skip_special_tokens=True) for r, n in zip(tokens.tolist(), lengths.tolist())]
        return Generation(tokens, logprobs, scores, lengths, finish, text)

    def _all_done(self, done):
        """Every row has ended; under FSDP2, on every rank: each decode step all-gathers the LM's blocks,
        so a rank that stopped early would leave the others waiting."""
        if not self.sharded:
            return bool(done.all())
        left = (~done).sum().float()
        torch.distributed.all_reduce(left)
        return left.item() == 0

    @staticmethod
    def _diverse_step(logprobs, done, K, penalty):
        """One step of group beam search with one beam per group: rows are groups of K; row k of a group
        takes the argmax of its log-probs minus penalty x the count of that token among the choices of
        rows 0..k-1 of its group at this step (rows that already ended do not count). Returns the
        tokens and their penalised scores, (B,) each."""
        lp = logprobs.view(-1, K, logprobs.shape[-1])
        live = (~done).view(-1, K).float()
        counts = torch.zeros_like(lp[:, 0])
        toks, scores = [], []
        for k in range(K):
            s = lp[:, k] - penalty * counts
            t = s.argmax(-1)
            toks.append(t); scores.append(s.gather(1, t[:, None]).squeeze(1))
            counts.scatter_add_(1, t[:, None], live[:, k:k + 1])
        return torch.stack(toks, 1).view(-1), torch.stack(scores, 1).view(-1)

    # --- saving and loading (the directory formats' helpers: section 2)

    def save_pretrained(self, path):
        """Our checkpoint directory: config.json, model.safetensors, tokenizer and image-processor files.
        Written into a temporary directory next to `path`, then swapped in, so a crash never leaves a
        half-written checkpoint under the real name."""
        with atomic_dir(path) as tmp:
            self._write(tmp)

    def _write(self, d, state_dict=None):
        """config.json, model.safetensors, tokenizer and image processor into directory d."""
        from safetensors.torch import save_file
        save_file(_state_dict_for_saving(self, state_dict), os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(d, "config.json"), dict(self.config, model_type=CHECKPOINT_TYPE))
        self._save_processors(d)

    def save_llava_hf(self, path):
        """Export to the `LlavaForConditionalGeneration` layout (llava-hf/llava-1.5-7b-hf), so the model
        runs in the wider ecosystem. Needs the mlp2x_gelu projector (llava-hf has no linear one)."""
        from safetensors.torch import save_file
        if self.config["projector_type"] != "mlp2x_gelu":
            raise ValueError("llava-hf has only the mlp2x_gelu projector; this model uses " + self.config["projector_type"])
        sd = {_to_llava_key(k): v for k, v in _state_dict_for_saving(self).items()}
        cfg = {
            "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
            "vision_config": self.config["vision_config"], "text_config": self.config["text_config"],
            "image_token_id": self.image_token_id, "image_token_index": self.image_token_id,
            "image_seq_length": self.num_image_tokens, "projector_hidden_act": "gelu",
            "multimodal_projector_bias": self.config["projector_bias"],
            "vision_feature_layer": self.config["vision_feature_layer"],
            "vision_feature_select_strategy": self.config["vision_feature_select_strategy"],
            "tie_word_embeddings": bool(self.lm.config.tie_word_embeddings),
        }
        with atomic_dir(path) as tmp:
            save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            _write_json(os.path.join(tmp, "config.json"), cfg)
            self._save_processors(tmp)

    def _save_processors(self, d):
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(d)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(d)

    @classmethod
    def from_pretrained(cls, path, dtype=None, attn_implementation="sdpa"):
        """Loads our checkpoint directory or a llava-hf (LlavaForConditionalGeneration) directory, with
        its tokenizer and image processor; a hub id (llava-hf/llava-1.5-7b-hf) is fetched into, or found
        in, the Hugging Face cache first. Weights come from safetensors only: pickled .bin weights can
        run arbitrary code when loaded, so they are refused (and never fetched)."""
        path = _checkpoint_dir(path)
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path}: no config.json (not a checkpoint directory)")
        with open(cfg_path) as f:
            raw = json.load(f)
        kind = raw.get("model_type")
        sd = _load_safetensors_dir(path)
        if kind == CHECKPOINT_TYPE:
            config = {k: v for k, v in raw.items() if k != "model_type"}
        elif kind == "llava":
            config = _config_from_llava(raw)
            sd = {_from_llava_key(k): v for k, v in sd.items()}
        else:
            raise ValueError(f"{cfg_path}: model_type {kind!r} is neither {CHECKPOINT_TYPE!r} nor 'llava'")
        vlm = cls._assemble(config, sd, dtype, attn_implementation)
        vlm.tokenizer, vlm.image_processor = _load_processors(path, vlm.config["vision_config"])
        if kind == "llava" and vlm.tokenizer is not None:
            _check_image_token(vlm.tokenizer, vlm.image_token_id, path)
        return vlm

    @classmethod
    def _assemble(cls, config, sd, dtype=None, attn_implementation="sdpa"):
        """Build from a flat state dict with our key names. The vision tower and LM go through
        transformers' own from_pretrained(state_dict=...) so they are created without a random init
        (fast for 7B) and their non-persistent buffers (rotary tables, position ids) are built right."""
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        vcfg, tcfg = _as_config(config["vision_config"]), _as_config(config["text_config"])
        part = lambda p: {k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")}
        unknown = [k for k in sd if k.split(".")[0] not in PARTS]
        if unknown:
            raise ValueError(f"unexpected weights {unknown[:5]}")
        load_dtype = next(iter(sd.values())).dtype
        kw = dict(dtype=load_dtype, attn_implementation=attn_implementation)
        vision = _vision_class(vcfg).from_pretrained(None, config=vcfg, state_dict=part("vision"), **kw)
        lm = _lm_class(tcfg).from_pretrained(None, config=tcfg, state_dict=part("lm"), **kw)
        vlm = cls(config, vision=vision, lm=lm)
        vlm.projector.to(load_dtype).load_state_dict(part("projector"))
        return vlm

    @classmethod
    def from_parts(cls, lm, vision, tokenizer=None, projector_type="mlp2x_gelu", vision_feature_layer=-2,
                   vision_feature_select_strategy=None, template="vicuna_v1", dtype=None, attn_implementation="sdpa",
                   image_processor=None):
        """LLaVA stage 1 start: a pretrained LM and vision tower (local paths or hub ids, or transformers
        config objects/dicts for from-scratch tiny models) + a fresh projector. Adds the <image> token
        (and a pad token) to the tokenizer if missing and grows the embeddings to match."""
        from transformers import AutoImageProcessor, AutoTokenizer, PretrainedConfig
        kw = dict(dtype=dtype, attn_implementation=attn_implementation)
        if isinstance(vision, (dict, PretrainedConfig)):
            vcfg = _as_config(vision); vcfg._attn_implementation = attn_implementation
            vision_model = _vision_class(vcfg)(vcfg)
            image_processor = image_processor or build_image_processor(vcfg)
        else:
            from transformers import AutoConfig
            vcfg = AutoConfig.from_pretrained(vision)
            vcfg = getattr(vcfg, "vision_config", vcfg)  # a full CLIP/SigLIP checkpoint holds a vision_config
            vision_model = _vision_class(vcfg).from_pretrained(vision, config=vcfg, **kw)
            image_processor = image_processor or AutoImageProcessor.from_pretrained(vision)
        if isinstance(lm, (dict, PretrainedConfig)):
            tcfg = _as_config(lm); tcfg._attn_implementation = attn_implementation
            lm_model = _lm_class(tcfg)(tcfg)
        else:
            from transformers import AutoModelForCausalLM
            lm_model = AutoModelForCausalLM.from_pretrained(lm, **kw)
            tokenizer = tokenizer or lm
        if isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if tokenizer is None:
            raise ValueError("from_parts needs a tokenizer (path or object) when the LM is built from a config")
        if "<image>" not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        if tokenizer.pad_token is None:  # LLaVA pads Vicuna with unk
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        if len(tokenizer) > lm_model.get_input_embeddings().num_embeddings:
            lm_model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
        if dtype is not None:
            vision_model.to(dtype); lm_model.to(dtype)
        config = dict(vision_config=vision_model.config.to_dict(), text_config=lm_model.config.to_dict(),
                      projector_type=projector_type, vision_feature_layer=vision_feature_layer,
                      image_token_id=tokenizer.convert_tokens_to_ids("<image>"), template=template)
        if vision_feature_select_strategy:
            config["vision_feature_select_strategy"] = vision_feature_select_strategy
        vlm = cls(config, vision=vision_model, lm=lm_model)
        if dtype is not None:
            vlm.projector.to(dtype)
        vlm.tokenizer, vlm.image_processor = tokenizer, image_processor
        return vlm


# -----------------------------------------------------------------------------
# 2. loading and saving: our checkpoint directory, llava-hf directories, building from parts


def build_image_processor(vision_config):
    """A CLIP image processor sized for a from-scratch tiny vision tower (the shapes world)."""
    from transformers import CLIPImageProcessorPil  # the PIL backend: no torchvision dependency
    s = vision_config.image_size
    return CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})


def _state_dict_for_saving(vlm, sd=None):
    sd = {k: v.detach().contiguous() for k, v in (sd if sd is not None else vlm.state_dict()).items()}
    if vlm.lm.config.tie_word_embeddings:  # tied head: stored once, re-tied on load (safetensors refuses shared storage)
        sd.pop("lm.lm_head.weight", None)
    return sd


def _to_llava_key(k):
    # the classic llava-hf layout (llava-hf/llava-1.5-7b-hf on the hub): every transformers version reads it
    for ours, theirs in (("vision.", "vision_tower.vision_model."), ("projector.", "multi_modal_projector."),
                         ("lm.model.", "language_model.model."), ("lm.lm_head.", "language_model.lm_head.")):
        if k.startswith(ours):
            return theirs + k[len(ours):]
    raise KeyError(k)


def _from_llava_key(k):
    # the classic hub layout and the one transformers >= 4.52 writes; vision towers with or without
    # the `vision_model.` level (transformers 5 dropped it from CLIPVisionModel / SiglipVisionModel)
    for theirs, ours in (("model.vision_tower.", "vision."), ("model.multi_modal_projector.", "projector."),
                         ("model.language_model.", "lm.model."), ("lm_head.", "lm.lm_head."),
                         ("vision_tower.", "vision."), ("multi_modal_projector.", "projector."),
                         ("language_model.model.", "lm.model."), ("language_model.lm_head.", "lm.lm_head.")):
        if k.startswith(theirs):
            k = ours + k[len(theirs):]
            return "vision." + k[len("vision.vision_model."):] if k.startswith("vision.vision_model.") else k
    raise ValueError(f"llava-hf checkpoint has an unexpected weight {k!r}")


def _config_from_llava(raw):
    from transformers import LlavaConfig
    c = LlavaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    if c.projector_hidden_act != "gelu" or not isinstance(c.vision_feature_layer, int):
        raise ValueError("only llava-hf checkpoints with a gelu projector and one vision feature layer are supported")
    return dict(vision_config=c.vision_config.to_dict(), text_config=c.text_config.to_dict(),
                projector_type="mlp2x_gelu", projector_bias=c.multimodal_projector_bias,
                vision_feature_layer=c.vision_feature_layer,
                vision_feature_select_strategy=c.vision_feature_select_strategy,
                image_token_id=c.image_token_id, template="vicuna_v1", pad_to_square=True)


def _checkpoint_dir(path):
    """A directory as it is; 'org/name' that is not one on disk is a hub id: its config, safetensors,
    tokenizer and processor files from the Hugging Face cache, downloaded if they are not there yet."""
    if not os.path.exists(path) and os.path.isdir(path + ".new"):
        return path + ".new"  # a kill between the two renames of a checkpoint swap: the new one is complete
    if os.path.exists(path) or path.count("/") != 1 or path.startswith((".", "/")):
        return path
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:  # offline, no such repo, no access: say which and keep the path in the message
        raise FileNotFoundError(f"{path}: not a directory, and not fetched as a hub model id: "
                                f"{type(e).__name__}: {e}") from None


def _load_safetensors_dir(path):
    from safetensors.torch import load_file
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found pickled {bins[:3]}: convert them to safetensors first)" if bins else ""
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(path, f)))
    return sd


def _load_processors(path, vision_config):
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import logging as hf_logging
    has_tok = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    has_proc = os.path.isfile(os.path.join(path, "preprocessor_config.json"))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the Auto* loaders peek at config.json and warn they don't know `lucid_vlm`: harmless
    try:
        tok = AutoTokenizer.from_pretrained(path) if has_tok else None
        proc = AutoImageProcessor.from_pretrained(path) if has_proc else build_image_processor(_as_config(vision_config))
    finally:
        hf_logging.set_verbosity(verbosity)
    return tok, proc


def _check_image_token(tokenizer, image_token_id, path):
    if tokenizer.convert_ids_to_tokens(image_token_id) != "<image>":
        raise ValueError(f"{path}: config image_token_id {image_token_id} is "
                         f"{tokenizer.convert_ids_to_tokens(image_token_id)!r} in the tokenizer, not '<image>'")


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


# -----------------------------------------------------------------------------
# 3. fused linear + cross-entropy
#
# loss_i = logsumexp_v(h_i . W_v) - h_i . W_{t_i}. The naive way builds logits (N, V) in fp32, then
# softmax, then its gradient: for 8k tokens and a 32k vocabulary that is 1 GiB each. Here rows are
# processed a chunk at a time: the chunk's logits live only inside the loop, and the gradient
# (softmax - onehot) is turned into dL/dh and dL/dW immediately. Ignored rows (prompt and image
# positions, the large majority in a LLaVA batch) are dropped *before* the matmul, so their logits
# are never computed at all.
#
# Two strategies, picked by `reduction`:
#   "mean"/"sum": the loss is a scalar, so its gradient is known up to one number: compute dL/dh and
#                 dL/dW during the forward (as Liger-Kernel does) and scale them in backward.
#   "none":       per-row losses may get any upstream gradient (DPO, per-sentence rewards), which
#                 cannot be folded in after the fact: save only the per-row logsumexp and recompute
#                 each chunk's logits in backward.
#
# Two implementations of the per-chunk row work, same math:
#   "torch":  logits upcast to fp32, logsumexp, gather, exp: several passes over the chunk.
#   "triton": our kernel below reads the chunk's logits in their own dtype (bf16 on a GPU), runs an
#             online (running max, running sum) logsumexp in fp32 and overwrites the logits with their
#             gradient in place: two reads and one write, no fp32 copy. The chunk's matmuls stay
#             cuBLAS, which is already at peak for >= 1024-row chunks.

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS / no triton: the torch path serves every call
    triton = None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # kernels on CPU tensors (tests); read at import, as triton does

if triton is not None:
    @triton.jit
    def _ce_rows_kernel(logits_ptr, stride, targets_ptr, lse_ptr, loss_ptr, row_scale_ptr, V,
                        BLOCK_V: tl.constexpr, HAS_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
                        HAS_ROW_SCALE: tl.constexpr):
        """One program per row of a (n, V) logits chunk. Writes the row's logsumexp (unless given) and
        loss = lse - logit[target]; if WRITE_GRAD, overwrites the row with (softmax - onehot), times
        row_scale[row] if given. Every load is upcast to fp32 before any arithmetic."""
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride
        t = tl.load(targets_ptr + row)
        if HAS_LSE:
            lse = tl.load(lse_ptr + row)
        else:  # online logsumexp: a running max m and the sum d of exp(x - m), rescaled when m grows
            m = float("-inf")
            d = 0.0
            for off in range(0, V, BLOCK_V):
                cols = off + tl.arange(0, BLOCK_V)
                x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
            lse = m + tl.log(d)
            tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, lse - tl.load(ptr + t).to(tl.float32))
        if WRITE_GRAD:
            s = 1.0
            if HAS_ROW_SCALE:
                s = tl.load(row_scale_ptr + row).to(tl.float32)
            for off in range(0, V, BLOCK_V):
                cols = off + tl.arange(0, BLOCK_V)
                x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) * s
                g = tl.where(cols == t, g - s, g)  # p - 1 at the target, formed in fp32 (in bf16 it is 0 as p -> 1)
                tl.store(ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


def _auto_chunk(n_rows, vocab, device):
    # Bound a chunk's fp32 logits to ~64 MB on CPU (low peak memory), but keep >= 256 rows. On a GPU keep
    # >= 512 rows so each chunk's matmul stays compute-bound instead of re-reading W per tiny chunk.
    rows = max(256, (1 << 24) // vocab)  # fewer than ~256 rows re-read grad_W per chunk (measured: 2x slower at 32 rows)
    if device.type == "cuda":
        rows = max(rows, 1024)
    return max(1, min(n_rows, rows))


def _ce_rows_triton(logits, t, lse=None, row_scale=None, grad=True):
    """Launch the kernel on a contiguous (n, V) chunk. Returns (loss, lse) in fp32; with grad, the
    chunk now holds its gradient."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    has_lse = lse is not None
    lse = lse if has_lse else torch.empty_like(loss)
    block = min(triton.next_power_of_2(V), 8192 if logits.is_cuda else 1 << 16)  # the interpreter likes big blocks
    _ce_rows_kernel[(n,)](logits, logits.stride(0), t, lse, loss, row_scale if row_scale is not None else loss,
                          V, BLOCK_V=block, HAS_LSE=has_lse, WRITE_GRAD=grad,
                          HAS_ROW_SCALE=row_scale is not None, num_warps=16 if logits.is_cuda else 1)
    return loss, lse


def _ce_chunk(h, weight, t, impl, lse=None, row_scale=None, grad=True):
    """One chunk of rows: logits = h @ weight.T, then per-row loss and logsumexp (fp32) and, with grad,
    the logits' gradient (softmax - onehot) [* row_scale]. Returns (loss, lse, grad_logits or None)."""
    if impl == "triton":
        logits = h @ weight.T  # the input dtype; the kernel reads it in fp32
        loss, lse = _ce_rows_triton(logits, t, lse, row_scale, grad)
        return loss, lse, logits if grad else None
    logits = (h @ weight.T).float()
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    loss = lse - logits.gather(1, t[:, None]).squeeze(1)
    if not grad:
        return loss, lse, None
    p = logits.sub_(lse[:, None]).exp_()  # in place: the chunk's fp32 logits become its gradient
    p[torch.arange(len(t), device=t.device), t] -= 1.0  # in fp32: forming p - 1 in bf16 loses everything as p -> 1
    return loss, lse, p.mul_(row_scale[:, None]) if row_scale is not None else p


def _backprop_chunk(g, h, weight, rows, grad_h, grad_w):
    """The chunk's logit gradient g through logits = h @ weight.T: write dL/dh for `rows`, add dL/dW
    (grad_w is fp32; the bf16 product is added into it without an fp32 copy of its own)."""
    if grad_h is not None:
        grad_h[rows] = (g.to(weight.dtype) @ weight).to(grad_h.dtype)
    if grad_w is not None:
        grad_w += g.T.to(h.dtype) @ h


class _LinearCEScalar(torch.autograd.Function):
    """mean/sum: gradients computed in forward, one pass over the rows. The logit gradient is kept
    unscaled (it lies in [-1, 1]: 1/n would push it below fp16's range); dL/dW gets the scale in fp32
    before it is stored in the weight's dtype, dL/dh gets it (with the upstream gradient) in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, chunk, impl):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            loss, _, g = _ce_chunk(h, weight, t, impl, grad=need_h or need_w)
            total += loss.sum()
            if g is not None:
                _backprop_chunk(g, h, weight, slice(s, s + chunk), grad_h, grad_w)
        ctx.save_for_backward(grad_h, grad_w.mul_(scale).to(weight.dtype) if need_w else None)
        ctx.scale = scale
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = (grad_h.float() * (grad_out.float() * ctx.scale)).to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def _ce_losses(hidden, weight, targets, chunk, impl):
    """Per-row losses and logsumexps (fp32), no gradient: reduction='none''s forward, and every
    reduction under no_grad (val loss, DPO's reference pass), where the backward matmuls would be waste."""
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    lses = torch.empty_like(losses)
    for s in range(0, hidden.shape[0], chunk):
        losses[s:s + chunk], lses[s:s + chunk], _ = _ce_chunk(hidden[s:s + chunk], weight, targets[s:s + chunk],
                                                              impl, grad=False)
    return losses, lses


class _LinearCENone(torch.autograd.Function):
    """none: per-row losses; backward recomputes each chunk's logits from the saved logsumexp, under the
    autocast state the forward ran in (what torch.amp.custom_bwd does): recomputed in another precision,
    the logits would not match their logsumexp (a 3 % gradient error under bf16 autocast, measured)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, impl):
        losses, lses = _ce_losses(hidden, weight, targets, chunk, impl)
        ctx.save_for_backward(hidden, weight, targets, lses)
        ctx.chunk, ctx.impl = chunk, impl
        dev = hidden.device.type
        ctx.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets, lses = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_losses = grad_losses.float().contiguous()
        dev, dtype, enabled = ctx.autocast
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            for s in range(0, hidden.shape[0], ctx.chunk):
                h, rows = hidden[s:s + ctx.chunk], slice(s, s + ctx.chunk)
                _, _, g = _ce_chunk(h, weight, targets[rows], ctx.impl, lse=lses[rows], row_scale=grad_losses[rows])
                _backprop_chunk(g, h, weight, rows, grad_h, grad_w)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def _pick_impl(impl, device):
    if impl == "auto":
        return "triton" if triton is not None and device.type == "cuda" else "torch"
    if impl == "triton":
        if triton is None:
            raise RuntimeError("impl='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not TRITON_INTERPRET:
            raise RuntimeError("impl='triton' on CPU tensors runs only under Triton's interpreter: "
                               "set TRITON_INTERPRET=1 before importing model.py")
        return impl
    if impl == "torch":
        return impl
    raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")


def fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="mean",
                               chunk_size=None, impl="auto"):
    """Cross-entropy of softmax(hidden @ weight.T) against targets, never holding the (N, V) logits.

    hidden (N, H), weight (V, H), targets (N,) with ignore_index rows skipped; fp32, fp16 or bf16
    inputs, fp32 accumulation. reduction: "mean" (over non-ignored rows; 0.0 when every row is
    ignored, so an all-prompt micro-batch adds nothing instead of a NaN), "sum", or "none" ((N,)
    fp32, 0 at ignored rows, any upstream gradient). chunk_size: rows per chunk (default: ~8M
    logits per chunk, >= 1024 rows on a GPU). impl: "auto" (Triton kernel on CUDA when triton is
    installed, else chunked PyTorch), "triton" or "torch" to force one.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"shapes: hidden {tuple(hidden.shape)} weight {tuple(weight.shape)} targets {tuple(targets.shape)}")
    impl = _pick_impl(impl, hidden.device)
    keep = targets != ignore_index
    idx = keep.nonzero().squeeze(1)
    n = idx.numel()
    h, t = hidden.index_select(0, idx), targets.index_select(0, idx)  # drop ignored rows before any matmul
    if n and (t.min() < 0 or t.max() >= weight.shape[0]):  # the kernel would read out of bounds
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index {ignore_index}; "
                         f"got values in [{int(t.min())}, {int(t.max())}]")
    chunk = chunk_size or _auto_chunk(n, weight.shape[0], hidden.device)
    weight = weight if impl == "torch" else weight.contiguous()
    scale = 1.0 / n if reduction == "mean" and n else 1.0
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        # nothing will call backward: the losses alone (a Function's needs_input_grad stays true under no_grad)
        losses = _ce_losses(h, weight, t, chunk, impl)[0]
        if reduction != "none":
            return losses.sum() * scale
        return torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_put((idx,), losses)
    if n == 0:  # every row ignored: zeros with a path to both inputs (DDP needs every used parameter's gradient)
        zero = 0.0 * (hidden.sum() + weight.sum())
        return zero if reduction != "none" else zero + torch.zeros(hidden.shape[0], device=hidden.device)
    if reduction == "none":
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        return out.index_put((idx,), _LinearCENone.apply(h, weight, t, chunk, impl))
    return _LinearCEScalar.apply(h, weight, t, scale, chunk, impl)
