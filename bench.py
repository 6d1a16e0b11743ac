"""
Speed and memory, side by side against the obvious alternative, in one run. Prints tables and writes JSON.

    python bench.py                       # everything this machine can run (a few minutes on 2 CPU cores)
    python bench.py --which=loss          # one section: loss | sft | gen | dpo | data | plan | csr | all
    python bench.py --rounds=3            # each case 3 times, in turn with its rival (a shared machine's noise)
    python bench.py --device=cuda         # on a GPU: adds our Triton kernel, liger-kernel and
                                          # cut-cross-entropy (when installed) at 7B-like shapes

Sections:
  loss  the LM head + cross-entropy, forward + backward: naive (full logits, F.cross_entropy) vs our
        fused_linear_cross_entropy, at several (tokens, hidden, vocab).
  sft   one training step (forward, backward, AdamW) of a small VLM with a 32k vocabulary on a batch
        with LLaVA's token mix (image + prompt positions unsupervised, a minority of answer tokens):
        our VLM vs transformers' LlavaForConditionalGeneration with its own loss, same weights.
  gen   greedy generation, tokens/s: ours vs LlavaForConditionalGeneration.generate, batched and batch 1.
  dpo   one DPO step (policy and reference log-probs of chosen + rejected, loss, backward, AdamW) of the
        same small VLM, the reference three ways (a frozen copy, LoRA adapters off, precomputed
        log-probs), full fine-tuning vs LoRA. Memory here is the whole footprint the step needs (models,
        gradients, AdamW state, activations): what a reference copy costs is the point. On CUDA the
        allocator's peak; on CPU a count of those tensors (RSS was too noisy to tell the cases apart).
  data  start-up on a generated LLaVA-format file of data_records records (llava_v1_5_mix665k's count;
        image records pointing at a few small PNGs, 6 % long text-only ones as ShareGPT's): parsing
        the file and validating each record (template, tokenisation, image header), every rank the
        whole file (before) vs one rank's share when data_ranks split it (after; the gather of the
        verdicts is a few MB); then the padding share of micro-batches at LLaVA-1.5 stage 2's batch
        (128 = 8 ranks x 16) with group_by_length 0 (random), 1, 16 and 50.
  plan  a memory plan, COMPUTED from a config's settings (not measured): LLaVA-1.5-7B stage 2 per GPU
        (sharded fp32 weights, gradients and AdamW state, FSDP2's gathered bf16 blocks, activations with
        and without gradient checkpointing, the fused loss's buffers, the transient at load).
  csr   calibrated self-rewarding's sentence-tree search (methods.csr.grow_trees) on the shapes world
        (shapes/prepare.py's prompts, its CLIP as the scorer, csr_model as the VLM): pairs/s and
        sentences/s batched over prompts and live nodes vs one prompt at a time, node by node (one
        generate call per node and one scorer call per level, as the released code runs it); the trees
        must come out the same.

How memory is measured. On CPU every case runs in a fresh process: after its inputs are built, the
process's peak-RSS mark is reset (Linux: write 5 to /proc/self/clear_refs) and the case's peak is
VmHWM afterwards minus the RSS before it, i.e. what the operation itself added at its worst moment,
as the OS saw it. On CUDA: torch.cuda.max_memory_allocated minus the memory allocated before.
Times: the median of `repeats` runs after one warm-up run.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
which = "all"            # loss | sft | gen | dpo | data | plan | csr | all
device = "auto"          # auto | cpu | cuda
out = "bench.json"       # results (written atomically)
repeats = 3              # timed runs per case (median), after one warm-up
rounds = 1               # run every case of a section this many times, in turn (A B A B ...): on a shared
                         # machine a slow spell then hits both sides alike; reported time = median of rounds
threads = 0              # torch CPU threads; 0 = torch's default
# (tokens, hidden, vocab) for the loss section; CPU sizes fit 24 GiB and run in minutes
loss_shapes_cpu = [(8192, 256, 32000), (16384, 128, 32000), (4096, 128, 128256)]
loss_shapes_cuda = [(8192, 4096, 32000), (16384, 4096, 32000), (8192, 4096, 128256), (16384, 4096, 128256)]
# the small VLM for sft/gen: a Llama LM with a 32k vocabulary and a CLIP tower
lm_layers, lm_hidden, lm_vocab = 4, 256, 32000
image_size, patch_size = 96, 8       # -> 144 image tokens
sft_batch, sft_seq, sft_answer = 8, 512, 64  # per sample: 144 image + prompt, the last 64 tokens supervised
gen_batch, gen_prompt, gen_new = 16, 32, 32  # prompt = image tokens + gen_prompt text tokens
dpo_pairs, dpo_lora_r = 4, 16        # pairs per DPO step (8 sequences of sft_seq tokens, sft_answer supervised); LoRA rank
data_records, data_ranks = 665_000, 8  # the data section: records in the generated file; ranks that split its validation
data_steps = 500         # steps whose micro-batches the padding figures cover
plan_config, plan_gpus = "config/llava15_7b_stage2.py", 8  # the plan section: the recipe and its number of GPUs
csr_model = ""           # the VLM for csr: a checkpoint dir; '' = the world's LM + CLIP tower with a fresh projector
csr_prompts, csr_batches = 32, [1, 8, 32]  # prompts searched; prompts per batch (1 = node by node as well)
case = ""                # internal: run one case in this process and print its JSON (the parent sets it)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402
configure(globals())
# -----------------------------------------------------------------------------

if threads:
    torch.set_num_threads(threads)
dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
cuda = dev.type == "cuda"
GiB = 1024 ** 3


def memory_now():
    return torch.cuda.memory_allocated() if cuda else rss_now()


def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak():
    """Start a fresh peak measurement: returns the baseline in bytes."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS, Linux >= 4.0
    except OSError:
        pass  # then the peak below is the process's peak so far (an upper bound)
    return rss_now()


def peak():
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(fn, base=None):
    """(peak extra bytes of the first call, median seconds of `repeats` more calls). base: an earlier
    reading of memory_now() (the peak then also counts what was allocated since, e.g. the models)."""
    start = reset_peak()
    base = start if base is None else base
    fn()
    mem = peak() - base
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return mem, statistics.median(times)


# ----------------------------------------------------------------------------- the cases (run in a child)

def loss_case(impl, N, H, V):
    import model as M
    dt = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = (torch.randn(N, H, device=dev, generator=g) * 0.5).to(dt).requires_grad_()
    weight = (torch.randn(V, H, device=dev, generator=g) * 0.02).to(dt).requires_grad_()
    targets = torch.randint(0, V, (N,), device=dev, generator=g)
    if impl == "naive":  # what HF does: full logits in the model dtype, upcast, F.cross_entropy
        loss_fn = lambda: F.cross_entropy((hidden @ weight.T).float(), targets)  # noqa: E731
    elif impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        loss_fn = lambda: liger_fused_linear_cross_entropy(hidden, weight, targets)  # noqa: E731
    elif impl == "cce":
        from cut_cross_entropy import linear_cross_entropy
        loss_fn = lambda: linear_cross_entropy(hidden, weight, targets)  # noqa: E731
    else:
        loss_fn = lambda: M.fused_linear_cross_entropy(hidden, weight, targets, impl=impl)  # noqa: E731

    def step():
        hidden.grad = weight.grad = None
        loss_fn().backward()
    mem, sec = measure(step)
    return dict(mem=mem, sec=sec, tflops=6 * N * H * V / sec / 1e12)


def vlm_configs():
    from transformers import CLIPVisionConfig, LlamaConfig
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size)
    text = LlamaConfig(vocab_size=lm_vocab, hidden_size=lm_hidden, intermediate_size=4 * lm_hidden,
                       num_hidden_layers=lm_layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=2048, pad_token_id=0, eos_token_id=2)
    return vision, text


def small_vlm(tmp):
    """A LlavaForConditionalGeneration with random weights saved as llava-hf, and our VLM loaded from it."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    import model as M
    vision, text = vlm_configs()
    n_img = (image_size // patch_size) ** 2
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=lm_vocab - 1, image_seq_length=n_img)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(tmp)
    dt = torch.bfloat16 if cuda else torch.float32
    hf = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=dt).to(dev)
    ours = M.VLM.from_pretrained(tmp, dtype=dt).to(dev)
    return hf, ours, n_img


def llava_batch(B, T, n_img, n_answer, seed=0):
    """input_ids with the image tokens first (as LLaVA puts <image> at the start of the first turn),
    then prompt text; labels supervise only the last n_answer tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, lm_vocab - 1, (B, T), generator=g)
    ids[:, 1:1 + n_img] = lm_vocab - 1
    labels = torch.full_like(ids, -100)
    labels[:, T - n_answer:] = ids[:, T - n_answer:]
    px = torch.randn(B, 3, image_size, image_size, generator=g)
    return ids.to(dev), px.to(dev, torch.bfloat16 if cuda else torch.float32), labels.to(dev)


def sft_case(impl):
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours, n_img = small_vlm(tmp)
    model = hf if impl == "llava-hf" else ours
    del hf, ours
    model.train()
    ids, px, labels = llava_batch(sft_batch, sft_seq, n_img, sft_answer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if impl == "llava-hf":
        loss_fn = lambda: model(input_ids=ids, pixel_values=px, labels=labels).loss  # noqa: E731
    else:
        loss_fn = lambda: model(ids, px, labels=labels)  # noqa: E731

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # AdamW's state exists from here on, for both: the measured step is a steady-state one
    mem, sec = measure(step)
    return dict(mem=mem, sec=sec, tok_s=sft_batch * sft_seq / sec)


def gen_case(impl, B):
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours, n_img = small_vlm(tmp)
    hf.eval(); ours.eval()
    ids, px, _ = llava_batch(B, 1 + n_img + gen_prompt, n_img, 0, seed=1)
    mask = torch.ones_like(ids)
    if impl == "llava-hf":
        from transformers import GenerationConfig
        gc = GenerationConfig(max_new_tokens=gen_new, min_new_tokens=gen_new, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        fn = lambda: hf.generate(input_ids=ids, pixel_values=px, attention_mask=mask, generation_config=gc)  # noqa: E731
    else:
        fn = lambda: ours.generate(ids, px, mask, max_new_tokens=gen_new, eos_token_id=[])  # noqa: E731  (no early stop, as gc)
    with torch.no_grad():
        mem, sec = measure(fn)
    return dict(mem=mem, sec=sec, tok_s=B * gen_new / sec)


def dpo_case(reference, lora):
    """One DPO step; its memory counts the models resident during it (a reference copy too), measured
    from before they were built (after the imports), but not the building's own transient peak."""
    import copy
    import ctypes
    import model as M
    from lucid.lora import add_lora, lora_disabled
    from lucid.optim import set_trainable
    from lucid.dpo_loss import dpo_loss
    vision, text = vlm_configs()  # (imports transformers: loading the library is not the step's memory)
    trim = ctypes.CDLL("libc.so.6").malloc_trim if not cuda else (lambda _: None)  # freed heap back to the OS: RSS = live memory
    trim(0)
    base = memory_now()
    torch.manual_seed(0)
    policy = M.VLM(dict(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=lm_vocab - 1))
    policy.to(dev, torch.bfloat16 if cuda else torch.float32)
    n_img = policy.num_image_tokens
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if reference == "copy" else None
    if lora:
        add_lora(policy, dpo_lora_r, 2 * dpo_lora_r)
    set_trainable(policy, {"lm": 1e-6, "projector": 0.0 if lora else 1e-6})
    policy.train()
    B = dpo_pairs
    ids, px, labels = llava_batch(2 * B, sft_seq, n_img, sft_answer)
    px = px[:B]  # chosen and rejected share their image: encoded once per pair
    cached = torch.randn(2 * B, device=dev) - 50.0  # 'precomputed': read from a file made before training
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)

    def ref_logps():
        with torch.no_grad():
            if reference == "copy":
                return -ref(ids, px, None, labels, reduction="row", image_repeat=2)
            if reference == "adapters_off":
                with lora_disabled(policy):
                    return -policy(ids, px, None, labels, reduction="row", image_repeat=2)
            return cached

    def step():
        lp, r = -policy(ids, px, None, labels, reduction="row", image_repeat=2), ref_logps()
        dpo_loss(lp[:B], lp[B:], r[:B], r[B:])[0].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    trim(0)
    if cuda:
        mem, sec = measure(step, base)  # its first call creates AdamW's state: counted, as a real step has it
        return dict(mem=mem, sec=sec, pairs_s=B / sec)
    # On CPU the process's RSS moved by ~0.5 GiB between identical runs of this case (allocator arenas),
    # more than the differences measured: count the step's tensors instead. Footprint = weights
    # (policy + a reference copy) + gradients and AdamW's two moments of the trainable ones + what the
    # forward saves for backward (unique storages that are not parameters).
    _, sec = measure(step)
    params = {p.untyped_storage().data_ptr() for m in (policy, ref) if m is not None for p in m.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        -policy(ids, px, None, labels, reduction="row", image_repeat=2)
    nbytes = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    weights = nbytes(policy.parameters()) + (nbytes(ref.parameters()) if ref is not None else 0)
    trained = nbytes(p for p in policy.parameters() if p.requires_grad)
    return dict(mem=weights + 3 * trained + sum(saved.values()), weights=weights, grads_adam=3 * trained,
                activations=sum(saved.values()), sec=sec, pairs_s=B / sec, mem_kind="tensor accounting")


def write_llava_file(d, n):
    """A LLaVA-format training file of n records in d (plus 4 small images), lengths loosely like
    mix665k's: short-answer VQA turns, longer conversations, 6 % long text-only records."""
    import random
    from PIL import Image
    for k in range(4):
        Image.new("RGB", (64, 48), (60 * k, 90, 200)).save(os.path.join(d, f"{k}.png"))
    rng = random.Random(0)
    words = "the a red blue green circle square triangle left right top bottom of is there in and with".split()
    recs = []
    for i in range(n):
        text_only = rng.random() < 0.06
        turns = rng.randint(1, 6) if text_only else rng.choice([1, 1, 1, 2, 3, 5, 8, 12])
        conv = []
        for t in range(turns):
            a = rng.randint(100, 400) if text_only else rng.randint(1, 3) if rng.random() < 0.6 else rng.randint(20, 120)
            conv += [{"from": "human", "value": " ".join(rng.choices(words, k=rng.randint(5, 20))) + "?"},
                     {"from": "gpt", "value": " ".join(rng.choices(words, k=a)) + "."}]
        rec = {"id": str(i), "conversations": conv}
        if not text_only:
            rec["image"] = f"{i % 4}.png"
            conv[0]["value"] = "<image>\n" + conv[0]["value"]
        recs.append(rec)
    path = os.path.join(d, "mix.json")
    with open(path, "w") as f:
        json.dump(recs, f)
    return path


def data_case(path, world, workers=0):
    """One rank's start-up: parse the file, validate its share (1 / world) of the records, in
    `workers` processes (sft.py's num_workers)."""
    import pickle
    import data as D
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained("data/shapes/tokenizer")
    base = reset_peak()
    t0 = time.perf_counter()
    recs = D.load_records(path, os.path.dirname(path))
    t1 = time.perf_counter()
    ds = D.SFTDataset(recs, tok, None, "vicuna_v1", tok.convert_tokens_to_ids("<image>"), 576, os.path.dirname(path),
                      max_len=2048)
    verdicts = ds.check(True, 0, world, workers)
    t2 = time.perf_counter()
    if world == 1:  # the padding figures use every record's token count (negative: text-only), as sft.py does
        lengths = [v * (1 if D.record_images(r) else -1) for r, v in zip(recs, (verdicts[i] for i in range(len(recs))))]
        with open(path + ".lengths.json", "w") as f:
            json.dump(lengths, f)
    return dict(sec=t2 - t0, load_sec=t1 - t0, check_sec=t2 - t1, mem=peak() - base, records=len(recs),
                verdicts_mb=len(pickle.dumps(verdicts)) / 2 ** 20)


def padding_figures(lengths, group, global_batch=128, world=8, micro=16):
    """Over data_steps steps: padding share of the micro-batches' tokens, micro-batches that mix
    modalities, and a step-time proxy (the largest micro-batch, B x longest, of any rank, summed)."""
    import data as D
    pad = tot = mixed = cost = 0
    for step in range(data_steps):
        worst = 0
        for r in range(world):
            for m in D.micro_batches(D.batch_indices(len(lengths), global_batch, step, 0, r, world, group, lengths), micro):
                ls = [abs(lengths[i]) for i in m]
                pad += max(ls) * len(m) - sum(ls)
                tot += max(ls) * len(m)
                mixed += len({lengths[i] > 0 for i in m}) > 1
                worst = max(worst, max(ls) * len(m))
        cost += worst
    return dict(group=group, padding=pad / tot, mixed=mixed / (data_steps * world * global_batch // world // micro),
                step_cost=cost)


# the published shapes of lmsys/vicuna-7b-v1.5 (Llama-2-7B; vocabulary 32000 + <image>, padded to a multiple
# of 64 by from_parts) and openai/clip-vit-large-patch14-336 (576 patches), and LLaVA's 2-layer MLP projector
VICUNA_7B = dict(hidden=4096, inter=11008, layers=32, vocab=32064)
CLIP_L336 = dict(hidden=1024, inter=4096, layers=24, patches=576)


def memory_plan(cfg, gpus):
    """(rows of (what, GB per GPU), notes): the recipe's per-GPU memory from its settings and the
    shapes above. bf16 = 2 bytes, fp32 = 4; activations counted per token and layer as the tensors
    autograd keeps for a Llama block under SDPA (no T x T matrix): 10 x hidden + 4 x intermediate."""
    h, i, L, V = VICUNA_7B["hidden"], VICUNA_7B["inter"], VICUNA_7B["layers"], VICUNA_7B["vocab"]
    vh, vi, vL, n_img = CLIP_L336["hidden"], CLIP_L336["inter"], CLIP_L336["layers"], CLIP_L336["patches"]
    block = 4 * h * h + 3 * h * i + 2 * h
    lm = L * block + 2 * V * h + h                       # untied embeddings and head
    vision = vL * (4 * vh * vh + 2 * vh * vi + 9 * vh) + (n_img + 1) * vh + 3 * 14 * 14 * vh
    proj = vh * h + h + h * h + h
    train = (lm if cfg["lr_lm"] else 0) + (proj if cfg["lr_projector"] else 0) + (vision if cfg["lr_vision"] else 0)
    frozen = lm + vision + proj - train
    shard = gpus if cfg.get("distributed") == "fsdp" else 1
    tokens = cfg["micro_batch_size"] * cfg["max_len"]     # every micro-batch padded to max_len: the worst case
    per_layer = tokens * (10 * h + 4 * i) * 2
    ckpt = cfg.get("gradient_checkpointing", False)
    acts = L * tokens * h * 2 + per_layer if ckpt else L * per_layer
    GB = 1e9
    rows = [("trainable weights, fp32 masters (sharded)", 4 * train / shard / GB),
            ("their gradients, fp32 (sharded)", 4 * train / shard / GB),
            ("AdamW's two moments, fp32 (sharded)", 8 * train / shard / GB),
            ("frozen weights, bf16 (sharded)", 2 * frozen / shard / GB),
            ("gathered for compute: the root (embeddings, head, projector) + 2 LM blocks, bf16", 2 * (2 * V * h + proj + 2 * block) / GB),
            ("a block's unsharded fp32 gradients before their reduce-scatter", 4 * block / GB),
            (f"activations, {tokens:,} tokens, " + ("checkpointed: each block's input + one block's" if ckpt else "every block's"), acts / GB),
            ("projector activations (the frozen tower keeps none)", cfg["micro_batch_size"] * n_img * (vh + 2 * h) * 2 / GB),
            ("fused loss: a 1,024-row bf16 logits chunk + the fp32 dL/dW accumulator", (1024 * V * 2 + V * h * 4) / GB)]
    other = L * per_layer if ckpt else L * tokens * h * 2 + per_layer  # the other setting of gradient_checkpointing
    notes = dict(params_billion=(lm + vision + proj) / 1e9, trainable_billion=train / 1e9, tokens=tokens,
                 # loading (lucid.common.build / shard): rank 0 alone holds the model in host memory, trained parts
                 # cast to fp32; fully_shard moves it to the GPUs one group at a time (the root, or a block)
                 load_host_gb=(4 * train + 2 * frozen) / GB, load_gpu_gb=4 * max(2 * V * h + proj, block) / GB,
                 activations_other_gb=other / GB, checkpointing=ckpt)
    return rows, notes


def csr_case(batch):
    """CSR's search over csr_prompts prompts, `batch` at a time (batch 1: one node per generate call too)."""
    import hashlib
    import data as D
    import model as M
    from methods import csr as S
    if csr_model:
        vlm = M.VLM.from_pretrained(csr_model)
    else:
        torch.manual_seed(0)
        vlm = M.VLM.from_parts(lm="shapes/models/lm", vision="shapes/models/clip", template="chat")
    vlm = vlm.to(dev).eval()
    scorer = S.ClipScorer("shapes/models/clip", dev)
    prompts = D.load_prompts("data/shapes/prompts.json", "data/shapes/images", csr_prompts)
    search = dict(max_new_tokens=24, max_chars=256, max_nodes=1 if batch == 1 else 0)  # config/shapes_csr.py's caps
    stats = {}

    def run(ps):
        with torch.no_grad():
            return [t for b in range(0, len(ps), batch) for t in S.search_prompts(vlm, scorer, ps[b:b + batch], search, stats=stats)]
    run(prompts[:2])  # warm-up
    stats.clear()
    t0 = time.perf_counter()
    trees = run(prompts)
    sec = time.perf_counter() - t0
    n_pairs = sum(S.pick_pair(t)[0] is not None for t in trees)
    digest = hashlib.sha1(json.dumps([[n["sentence"] for n in t] for t in trees]).encode()).hexdigest()[:12]
    return dict(sec=sec, pairs_s=n_pairs / sec, sentences_s=stats["sentences"] / sec, pairs=n_pairs,
                sentences=stats["sentences"], generate_calls=stats["generate_calls"], trees=digest)


if case:  # child: run one case, print its JSON as the last line
    name, *args = json.loads(case)
    fn = dict(loss=loss_case, sft=sft_case, gen=gen_case, dpo=dpo_case, data=data_case, csr=csr_case)[name]
    print(json.dumps(fn(*args)))
    sys.exit(0)


# ----------------------------------------------------------------------------- the parent: run cases, report

def run_case(*args):
    """Each case in its own process (honest peak memory); returns its dict, or dict(error=...)."""
    # the child gets this run's own overrides (sizes, repeats, threads...), so it measures what the table says
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--case={json.dumps(args)}", f"--device={dev.type}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return dict(error=(r.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_rounds(cases):
    """{case: result} for each case (a tuple of run_case arguments), every case run `rounds` times in turn;
    a result's time is the median over its rounds, rates (tok_s, tflops) rescaled to it."""
    runs = {c: [] for c in cases}
    for _ in range(rounds):
        for c in cases:
            runs[c].append(run_case(*c))
    out = {}
    for c, rs in runs.items():
        bad = [r for r in rs if "error" in r]
        if bad:
            out[c] = bad[0]
            continue
        sec = statistics.median(r["sec"] for r in rs)
        rates = {k: rs[0][k] * rs[0]["sec"] / sec for k in ("tok_s", "tflops", "pairs_s", "sentences_s") if k in rs[0]}
        out[c] = dict(rs[0], sec=sec, round_secs=[r["sec"] for r in rs], **rates)
    return out


def available(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def gpu_peak_tflops():
    """Dense bf16 tensor-core peak of known GPUs (vendor datasheets), for the TFLOP/s share; None if unknown."""
    name = torch.cuda.get_device_name()
    for key, tf in (("H200", 989), ("H100", 989), ("A100", 312), ("L40S", 362), ("A10", 125), ("4090", 165)):
        if key in name:
            return tf
    return None


def fmt_mem(b):
    return f"{b / GiB:.2f} GiB" if b >= GiB / 4 else f"{b / 2 ** 20:.0f} MiB"


results = dict(device=torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
               torch=torch.__version__)
t_start = time.time()

if which in ("loss", "all"):
    impls = ["naive", "torch"] + (["triton"] + [m for m, mod in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy"))
                                                if available(mod)] if cuda else [])
    rows = []
    print(f"\nloss forward+backward ({'bf16' if cuda else 'fp32'}), each case in its own process")
    print(f"{'tokens':>7s} {'hidden':>6s} {'vocab':>7s} {'impl':>7s} {'peak mem':>10s} {'time':>9s} {'TFLOP/s':>8s}"
          f" {'mem/naive':>9s} {'time/naive':>10s}")
    for N, H, V in (loss_shapes_cuda if cuda else loss_shapes_cpu):
        naive = None
        done = run_rounds([("loss", impl, N, H, V) for impl in impls])
        for impl in impls:
            r = done["loss", impl, N, H, V]
            r.update(tokens=N, hidden=H, vocab=V, impl=impl)
            if "error" in r:
                print(f"{N:7d} {H:6d} {V:7d} {impl:>7s}  error: {r['error'][:80]}")
                rows.append(r)
                continue
            naive = r if impl == "naive" else naive
            if naive and impl != "naive":
                r.update(mem_ratio=r["mem"] / naive["mem"], time_ratio=r["sec"] / naive["sec"])
            if cuda and gpu_peak_tflops():
                r["peak_share"] = r["tflops"] / gpu_peak_tflops()
            print(f"{N:7d} {H:6d} {V:7d} {impl:>7s} {fmt_mem(r['mem']):>10s} {1e3 * r['sec']:7.0f}ms {r['tflops']:8.2f}"
                  + (f" {r['mem_ratio']:9.3f} {r['time_ratio']:10.2f}" if "mem_ratio" in r else ""))
            rows.append(r)
    results["loss"] = rows

if which in ("sft", "all"):
    n_img = (image_size // patch_size) ** 2
    print(f"\nSFT step (fwd+bwd+AdamW), {lm_layers}-layer {lm_hidden}-wide LM, vocab {lm_vocab}, batch {sft_batch} x "
          f"{sft_seq} tokens: {n_img} image + {sft_seq - n_img - sft_answer} prompt + {sft_answer} supervised")
    rows = {c[1]: r for c, r in run_rounds([("sft", "llava-hf"), ("sft", "ours")]).items()}
    print(f"{'model':>9s} {'peak mem':>10s} {'step':>8s} {'tokens/s':>9s}")
    for impl, r in rows.items():
        print(f"{impl:>9s} " + (f"{fmt_mem(r['mem']):>10s} {1e3 * r['sec']:6.0f}ms {r['tok_s']:9.0f}" if "error" not in r
                                else f"error: {r['error'][:80]}"))
    if all("error" not in r for r in rows.values()):
        a, b = rows["ours"], rows["llava-hf"]
        rows["ratio"] = dict(tok_s=a["tok_s"] / b["tok_s"], mem=a["mem"] / b["mem"])
        print(f"ours / llava-hf: {rows['ratio']['tok_s']:.2f}x tokens/s, {rows['ratio']['mem']:.2f}x peak memory")
    results["sft"] = rows

if which in ("gen", "all"):
    print(f"\ngreedy generation, {gen_new} new tokens after {(image_size // patch_size) ** 2} image + {gen_prompt} text tokens")
    rows = []
    print(f"{'model':>9s} {'batch':>5s} {'peak mem':>10s} {'time':>8s} {'tokens/s':>9s}")
    for (_, impl, B), r in run_rounds([("gen", impl, B) for B in (1, gen_batch) for impl in ("llava-hf", "ours")]).items():
        r.update(impl=impl, batch=B)
        rows.append(r)
        print(f"{impl:>9s} {B:5d} " + (f"{fmt_mem(r['mem']):>10s} {1e3 * r['sec']:6.0f}ms {r['tok_s']:9.0f}"
                                       if "error" not in r else f"error: {r['error'][:80]}"))
    ok = {(r["impl"], r["batch"]): r for r in rows if "error" not in r}
    for B in (1, gen_batch):
        if ("ours", B) in ok and ("llava-hf", B) in ok:
            print(f"batch {B}: ours / llava-hf = {ok['ours', B]['tok_s'] / ok['llava-hf', B]['tok_s']:.2f}x tokens/s")
    if ("ours", 1) in ok and ("ours", gen_batch) in ok:
        print(f"ours: batch {gen_batch} / batch 1 = {ok['ours', gen_batch]['tok_s'] / ok['ours', 1]['tok_s']:.2f}x tokens/s")
    results["gen"] = rows

if which in ("dpo", "all"):
    print(f"\nDPO step ({dpo_pairs} pairs = {2 * dpo_pairs} sequences of {sft_seq} tokens, {sft_answer} supervised; "
          f"full fine-tuning: LM + projector; LoRA r {dpo_lora_r}: adapters only), whole footprint")
    cases = [("dpo", ref, lora) for lora in (False, True) for ref in (("copy", "adapters_off", "precomputed") if lora
                                                                       else ("copy", "precomputed"))]
    done = run_rounds(cases)
    rows = []
    print(f"{'training':>8s} {'reference':>13s} {'peak mem':>10s} {'step':>8s} {'mem/copy':>9s} {'mem/full copy':>13s}")
    full_copy = done["dpo", "copy", False]
    for (_, ref, lora), r in done.items():
        r.update(reference=ref, lora=lora)
        rows.append(r)
        if "error" in r:
            print(f"{'LoRA' if lora else 'full':>8s} {ref:>13s}  error: {r['error'][:80]}")
            continue
        same_copy = done["dpo", "copy", lora]
        if "error" not in same_copy and "error" not in full_copy:
            r.update(mem_vs_copy=r["mem"] / same_copy["mem"], mem_vs_full_copy=r["mem"] / full_copy["mem"])
        print(f"{'LoRA' if lora else 'full':>8s} {ref:>13s} {fmt_mem(r['mem']):>10s} {1e3 * r['sec']:6.0f}ms"
              + (f" {r['mem_vs_copy']:9.2f} {r['mem_vs_full_copy']:13.2f}" if "mem_vs_copy" in r else ""))
    results["dpo"] = rows

if which in ("data", "all"):
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        path = write_llava_file(d, data_records)
        print(f"\nstart-up on {data_records:,} generated LLaVA-format records ({os.path.getsize(path) / 2 ** 20:.0f} MB, "
              f"written in {time.time() - t0:.0f}s): parse + validate (template, tokens, image header), each rank in its own process")
        done = run_rounds([("data", path, 1, 0), ("data", path, data_ranks, 0), ("data", path, data_ranks, 2)])
        rows = []
        print(f"{'validation':>44s} {'parse':>7s} {'validate':>9s} {'total':>7s} {'peak RSS':>9s}")
        for (_, _, world, workers), r in done.items():
            label = ("every rank, all records (before)" if world == 1 else f"one rank's share of {world} (after)") + \
                (f", {workers} workers" if workers else "")
            r.update(world=world, workers=workers, label=label)
            rows.append(r)
            print(f"{label:>44s} " + (f"{r['load_sec']:6.1f}s {r['check_sec']:8.1f}s {r['sec']:6.1f}s {fmt_mem(r['mem']):>9s}"
                                       if "error" not in r else f"error: {r['error'][:80]}"))
        if all("error" not in r for r in rows):
            print(f"after / before: {rows[1]['sec'] / rows[0]['sec']:.2f}x start-up time ({rows[2]['sec'] / rows[0]['sec']:.2f}x "
                  f"with 2 workers); the gather moves "
                  f"{rows[0]['verdicts_mb']:.1f} MB of verdicts to every rank")
            lengths = tuple(json.load(open(path + ".lengths.json")))
            pads = [padding_figures(lengths, g) for g in (0, 1, 16, 50)]
            print(f"\nmicro-batches of {data_steps} steps at global batch 128 = 8 ranks x 16 (LLaVA-1.5 stage 2)")
            print(f"{'group_by_length':>15s} {'padding share':>13s} {'mixed-modality':>14s} {'step cost vs random':>19s}")
            for p in pads:
                p["step_cost_ratio"] = p["step_cost"] / pads[0]["step_cost"]
                print(f"{p['group']:15d} {p['padding']:13.1%} {p['mixed']:14.1%} {p['step_cost_ratio']:19.2f}")
        results["data"] = dict(startup=rows, padding=pads if all("error" not in r for r in rows) else None)

if which in ("plan", "all"):
    cfg = {}
    exec(open(plan_config).read(), {}, cfg)  # the recipe's own settings
    rows, notes = memory_plan(cfg, plan_gpus)
    total = sum(gb for _, gb in rows)
    print(f"\nmemory plan, COMPUTED (not measured): {plan_config} on {plan_gpus} GPUs, "
          f"{notes['params_billion']:.2f}B parameters ({notes['trainable_billion']:.2f}B trained), micro-batch "
          f"{cfg['micro_batch_size']} x {cfg['max_len']} tokens, {cfg.get('distributed', 'ddp')}")
    for what, gb in rows:
        print(f"{gb:8.2f} GB  {what}")
    print(f"{total:8.2f} GB  per GPU in all, before the CUDA context, NCCL buffers and allocator fragmentation")
    print(f"{notes['activations_other_gb']:8.2f} GB  activations {'without' if notes['checkpointing'] else 'with'} "
          f"gradient checkpointing instead")
    print(f"{notes['load_host_gb']:8.2f} GB  at load, in rank 0's host memory alone: the whole model, trainable parts in fp32 "
          f"(the other ranks build it on the meta device)")
    print(f"{notes['load_gpu_gb']:8.2f} GB  at load, on a GPU on top of its shards: the largest group (root or block) in fp32, "
          f"whole, until fully_shard keeps its slice")
    results["plan"] = dict(config=plan_config, gpus=plan_gpus, rows=dict(rows), total_gb=total, **notes)

if which in ("csr", "all"):
    print(f"\nCSR sentence-tree search, {csr_prompts} shapes prompts, K 5 diverse proposals, best 1 + worst 2 kept"
          f" ({csr_model or 'the world LM + CLIP tower, fresh projector'})")
    done = run_rounds([("csr", b) for b in csr_batches])
    rows = []
    print(f"{'prompts/batch':>13s} {'time':>7s} {'pairs/s':>8s} {'sentences/s':>11s} {'generate calls':>14s} {'vs node by node':>15s} {'trees':>12s}")
    one = done.get(("csr", 1))
    for (_, b), r in done.items():
        r.update(batch=b)
        rows.append(r)
        if "error" in r:
            print(f"{b:13d}  error: {r['error'][:80]}")
            continue
        if one and "error" not in one:
            r.update(speedup=r["pairs_s"] / one["pairs_s"] if one["pairs_s"] else float("nan"), same_trees=r["trees"] == one["trees"])
        print(f"{b:13d} {r['sec']:6.1f}s {r['pairs_s']:8.2f} {r['sentences_s']:11.1f} {r['generate_calls']:14d}"
              f" {r.get('speedup', float('nan')):14.2f}x {r['trees']:>12s}")
    results["csr"] = rows

results["seconds"] = time.time() - t_start
from data import write_atomic  # noqa: E402
write_atomic(out, json.dumps(results, indent=2))
print(f"\n{results['seconds']:.0f}s; wrote {out}")
