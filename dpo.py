"""
Direct preference optimisation (DPO) of a LLaVA-style model on (image, prompt, chosen, rejected) pairs:
the last stage of LLaVA-Reasoner (its own correct vs incorrect reasoning chains) and of calibrated
self-rewarding (its best vs worst descriptions). One file, top to bottom, like sft.py.

The shapes world on a laptop CPU (after `python -m shapes.prepare` and the two SFT stages), on the
world's correct vs hallucinated answers:
    python dpo.py config/shapes_dpo.py
One GPU, LLaVA-Reasoner's recipe (full fine-tuning of the LM, vision and projector frozen):
    python dpo.py config/reasoner_dpo.py
8 GPUs (the global batch stays the same; accumulation adapts to the world size):
    torchrun --standalone --nproc_per_node=8 dpo.py config/reasoner_dpo.py
CSR's recipe (LoRA r 128, the adapters-off model as the reference):
    torchrun --standalone --nproc_per_node=8 dpo.py config/csr_dpo.py
Resume an interrupted run exactly where it stopped:
    python dpo.py <same args> --init_from=resume

The reference model, three ways, all giving the same loss (tests/test_dpo.py):
    'copy'          a frozen copy of the starting model (TRL's default): a second model in memory
    'adapters_off'  with LoRA, the same network with its adapters switched off: no second copy (a part
                    that trains besides the adapters, e.g. the projector at lr_projector > 0 as in CSR's
                    recipe, has its starting weights kept and put back for the reference pass)
    'precomputed'   one pass over the pairs before training stores the reference log-probs in
                    out_dir/ref_logps.pt (reused on resume): no reference model in memory at all
"""
import copy
import json
import os
import time
from collections import Counter

import torch
from tqdm import tqdm

import data as D
import model as M
from lucid import checkpoint, common, lora, optim
from lucid.dpo_loss import DPO_LOSSES, dpo_loss

# -----------------------------------------------------------------------------
# defaults: the shapes world's DPO on CPU, from the two-stage base (config/shapes_stage2.py)
# I/O
out_dir = "out/dpo"
init_from = "out/shapes_stage2"   # a checkpoint dir (ours or llava-hf) or hub id | 'resume'
eval_interval = 50         # steps between held-out pair evaluations (and checkpoints)
eval_pairs = 0             # held-out pairs per evaluation (0 = all)
log_interval = 10
save_checkpoint = True
wandb_log = False          # off by default; needs `pip install wandb`
wandb_project = "lucid"
wandb_run_name = "dpo"
# data: preference files in the CSR, LLaVA-Reasoner or TRL format (data.py, section 6); several with ratios
data_path = "data/shapes/pairs.json"
val_data_path = "data/shapes/pairs_val.json"   # None = no held-out evaluation
image_root = "data/shapes/images"
template = None            # None: the checkpoint's own (what it was instruction-tuned with)
max_len = 512              # tokens per sequence; an image is never truncated (error instead)
max_words = 0              # keep the first N words of chosen and rejected (LLaVA-Reasoner: 90); 0 = all
drop_eos = False           # leave the answers' end-of-turn unsupervised (LLaVA-Reasoner, with truncation)
skip_bad = False
num_workers = 0
group_by_length = 0        # k > 0: sort windows of k global batches by modality and length (less padding; see data.batch_indices)
# DPO
beta = 0.1
loss_type = "sigmoid"      # 'sigmoid' (DPO) | 'robust' (with label_smoothing) | 'ipo' | 'hinge' (lucid/dpo_loss.py)
label_smoothing = 0.0      # robust only: the assumed share of flipped labels
length_norm = False        # average the log-probs over the answer's tokens instead of summing them (always on for ipo, as in TRL)
sft_weight = 0.0           # + sft_weight x the token-mean NLL of the chosen answers (RPO; 0 = pure DPO)
reference = "copy"         # 'copy' | 'adapters_off' (needs LoRA) | 'precomputed'
# LoRA (0 = full fine-tuning of the parts with a learning rate)
lora_r = 0
lora_alpha = 16
lora_dropout = 0.0
lora_targets = lora.LORA_TARGETS  # regex over module names; default: the LM's attention and MLP projections
# optimization: a batch is pairs (each pair is two sequences in one forward)
global_batch_size = 16
micro_batch_size = 8
max_steps = 0              # 0: derive from epochs
stop_at_step = 0
epochs = 1.0
lr_vision = 0.0            # per-part learning rates; 0 freezes the part
lr_projector = 0.0
lr_lm = 5e-6
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
warmup_ratio = 0.1
min_lr_ratio = 0.0
# system
device = "auto"
dtype = "auto"             # 'auto' (bfloat16 autocast on CUDA, float32 on CPU) | 'float32' | 'bfloat16'
compile = False
gradient_checkpointing = False
distributed = "ddp"        # under torchrun: 'ddp' | 'fsdp' (FSDP2: shards weights, grads, AdamW state; and the reference copy)
seed = 1337
# -----------------------------------------------------------------------------
from configurator import ConfigError, configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------
if loss_type not in DPO_LOSSES:
    raise ConfigError(f"loss_type must be one of {DPO_LOSSES}, got {loss_type!r}")
if reference not in ("copy", "adapters_off", "precomputed"):
    raise ConfigError(f"reference must be 'copy', 'adapters_off' or 'precomputed', got {reference!r}")
length_norm = length_norm or loss_type == "ipo"
if reference == "adapters_off" and not lora_r:
    raise ConfigError("reference='adapters_off' needs LoRA (lora_r > 0): without adapters there is nothing to switch off")

run = common.setup(seed, device, dtype)
dist, dev, log, master = run.dist, run.device, run.log, run.dist.master
checkpoint.recover(out_dir, run)  # finish (or undo) a checkpoint write a kill interrupted, before anything reads out_dir

# model: the policy, and where the reference comes from ------------------------------
resume_state, base_from = checkpoint.resume_point(init_from, out_dir)  # base_from: the starting model
policy_from = out_dir if resume_state and not lora_r else base_from  # (LoRA resumes from its start + adapters)
vlm = common.build(lambda: M.VLM.from_pretrained(policy_from), run, distributed)  # FSDP2: only rank 0 reads it
if resume_state:
    log(f"resuming from {out_dir} at step {resume_state['step']}")
template = template or vlm.config["template"]
pad_to_square = vlm.config.get("pad_to_square", True)
tok = vlm.tokenizer
ref_model = None
if reference == "copy":  # the starting model, before any adapter: frozen, in eval mode
    ref_model = copy.deepcopy(vlm) if not resume_state else common.build(lambda: M.VLM.from_pretrained(base_from), run, distributed)
    common.master_weights(ref_model.eval().requires_grad_(False), run)
# adapters_off: switching the adapters off gives back the starting LM, not the starting projector or vision
# tower when they train too; their starting weights are kept (before a resume loads the trained ones) and put
# back for each reference pass, so the reference is the starting model whatever trains
ref_parts = {}
if reference == "adapters_off":
    trains = {"vision": lr_vision, "projector": lr_projector}
    ref_parts = {n: p.detach().clone() for n, p in vlm.named_parameters() if trains.get(optim.part_of(n))}
    if ref_parts and run.dist.ddp and distributed == "fsdp":
        raise ConfigError("reference='adapters_off' with a trained projector or vision tower under FSDP2 is not "
                          "supported (their starting weights would have to be sharded too): use reference='precomputed'")
if lora_r:
    lora.add_adapters(vlm, lora_r, lora_alpha, lora_dropout, lora_targets, resume_state, out_dir, log)
if gradient_checkpointing:
    vlm.lm.gradient_checkpointing_enable()

# data ---------------------------------------------------------------------------
def make_dataset(spec):
    ds = D.PairDataset(D.load_pairs(spec, image_root), tok, vlm.image_processor, template, vlm.image_token_id,
                       vlm.num_image_tokens, image_root, max_len=max_len, pad_to_square=pad_to_square,
                       skip_bad=skip_bad, max_words=max_words, drop_eos=drop_eos)
    good = ds.validate(True, dist.rank, dist.world_size, num_workers)  # every image file is there, before a step is taken
    if ds.skipped:
        log(f"{spec}: skipping {sum(ds.skipped.values())} of {len(ds)} pairs: {dict(ds.skipped)}")
    return ds, good

train_ds, train_idx = make_dataset(data_path)
val_ds, val_idx = make_dataset(val_data_path) if val_data_path else (None, [])
if eval_pairs:
    val_idx = val_idx[:eval_pairs]
if val_ds is not None and not val_idx:
    raise D.DataError(f"{val_data_path}: no usable held-out pairs (set val_data_path=None to train without)", "no pairs")
grad_accum, max_steps, warmup_steps = optim.steps(len(train_idx), global_batch_size, micro_batch_size, dist.world_size,
                                              max_steps, epochs, warmup_ratio)
log(f"{len(train_idx)} training pairs, global batch {global_batch_size} = {micro_batch_size} x {grad_accum} accumulation "
    f"x {dist.world_size} ranks, {max_steps} steps; reference: {reference}")


def loader(ds, batch_sampler):
    return common.loader(ds, batch_sampler, D.collate_pairs, tok.pad_token_id, num_workers, dev)


def to_dev(batch):
    return common.to_device(batch, dev)

# optimizer ----------------------------------------------------------------------
lrs = {"vision": lr_vision, "projector": lr_projector, "lm": lr_lm}
optim.set_trainable(vlm, lrs)
common.master_weights(vlm, run)
if ref_model is not None:  # sharded like the policy (its shards from rank 0), or moved whole
    common.shard(ref_model, run) if run.dist.ddp and distributed == "fsdp" else ref_model.to(dev)
model, raw, fsdp, autocast = common.wrap(vlm, run, distributed, compile)
optimizer = optim.configure_optimizer(raw, lrs, weight_decay, (beta1, beta2), fused=dev.type == "cuda")
start_step = checkpoint.resume(optimizer, raw, fsdp, resume_state, out_dir)
trainable = [p for p in raw.parameters() if p.requires_grad]
log(f"training {sum(p.numel() for p in trainable) / 1e6:.3f}M of {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M parameters")


def sequence_logps(m, b):
    """Summed log-probs of the supervised (answer) tokens of each of the 2B rows, and their counts.
    Through the model's forward (so DDP sees it), per token from the fused loss: no logits tensor."""
    nll = m(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"], reduction="row", image_repeat=2)
    return -nll, (b["labels"][:, 1:] != D.IGNORE_INDEX).sum(1)


class starting_parts:
    """with starting_parts(model): the trained parts besides the adapters (ref_parts) hold their starting weights."""

    def __init__(self, model):
        self.params = {n: model.get_parameter(n) for n in ref_parts}

    def __enter__(self):
        self.saved = {n: p.detach().clone() for n, p in self.params.items()}
        for n, p in self.params.items():
            p.data.copy_(ref_parts[n])

    def __exit__(self, *exc):
        for n, p in self.params.items():
            p.data.copy_(self.saved[n])
        return False


@torch.no_grad()
def reference_logps(b):
    """The reference's summed log-probs (2B,), by the chosen reference mode."""
    if reference == "precomputed":
        cache, idx = ref_cache[b["split"]], b["index"].cpu()
        return torch.cat([cache[idx, 0], cache[idx, 1]]).to(dev, torch.float32)
    with autocast:
        if reference == "adapters_off":
            with lora.lora_disabled(raw), starting_parts(raw):
                return sequence_logps(raw, b)[0]
        return sequence_logps(ref_model, b)[0]


@torch.no_grad()
def precompute_reference(ds, idx, split):
    """The starting model's summed log-probs of every pair's chosen and rejected answer, (len(ds), 2),
    each rank doing its share. Before the first step the policy IS the reference (LoRA's B is zero)."""
    raw.eval()
    mine, n_real = common.padded_share(idx, dist)
    real = set(mine[:n_real])  # the padding repeats pairs of other ranks: leave those to their own rank
    total = torch.zeros(len(ds), 2, dtype=torch.float64)  # each pair written by exactly one rank: the sum gathers them
    bar = tqdm(D.micro_batches(mine, micro_batch_size), desc=f"reference log-probs ({split})", disable=not master, unit="batch")
    for b in loader(ds, bar):  # a pair skipped here (skip_bad) is skipped in training too: its row stays 0
        b = to_dev(b)
        with autocast:
            s = sequence_logps(raw, b)[0].double().cpu()
        B = len(b["index"])
        for i, row in zip(b["index"].tolist(), torch.stack([s[:B], s[B:]], 1)):
            if i in real:
                total[i] = row
    raw.train()
    return common.all_reduce_sum(total, dist).cpu().float()


ref_cache = {}
if reference == "precomputed":
    cache_path = os.path.join(out_dir, "ref_logps.pt")
    key = dict(init_from=base_from, data_path=data_path, val_data_path=val_data_path, template=template,
               max_len=max_len, max_words=max_words, drop_eos=drop_eos, eval_pairs=eval_pairs,
               n=[len(train_ds), len(val_ds) if val_ds else 0])
    cached = torch.load(cache_path, weights_only=True) if os.path.exists(cache_path) else None
    if cached is not None and cached["key"] == json.dumps(key):
        ref_cache = {"train": cached["train"], "val": cached["val"]}
        log(f"reference log-probs from {cache_path}")
    elif resume_state is not None:
        raise RuntimeError(f"{cache_path} is missing or was made for other data: a resumed run cannot recompute "
                           f"the reference (the policy has moved)")
    else:
        ref_cache = {"train": precompute_reference(train_ds, train_idx, "train"),
                     "val": precompute_reference(val_ds, val_idx, "val") if val_ds else torch.zeros(0, 2)}
        if master:
            os.makedirs(out_dir, exist_ok=True)
            tmp = cache_path + ".tmp"
            torch.save(dict(key=json.dumps(key), **ref_cache), tmp)
            os.replace(tmp, cache_path)


def pair_terms(b):
    """Policy and reference log-probs of a batch's pairs -> (per-pair DPO losses, summed chosen NLL,
    per-pair metrics (B, len(METRICS)), detached). Length-normalised here when length_norm is set."""
    lp, n = sequence_logps(model, b)
    ref = reference_logps(b)
    if length_norm:
        lp, ref = lp / n, ref / n
    B = len(b["index"])
    losses, rc, rr = dpo_loss(lp[:B], lp[B:], ref[:B], ref[B:], beta, loss_type, label_smoothing)
    nll_chosen = -(lp[:B] * n[:B]).sum() if length_norm else -lp[:B].sum()
    per_pair = torch.stack([losses.detach(), rc, rr, rc - rr, (rc > rr).float(), lp[:B].detach(), lp[B:].detach()], 1)
    return losses, nll_chosen, per_pair


METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"]


def metrics_of(per_pair_rows):
    """Per-pair metrics of this rank (n, len(METRICS)) -> TRL's names, means over the pairs of all ranks."""
    rows = torch.cat(per_pair_rows).double().cpu()
    tot = common.all_reduce_sum(torch.cat([rows.sum(0), torch.tensor([float(len(rows))], dtype=torch.float64)]), dist).cpu()
    return {k: (tot[i] / tot[-1]).item() for i, k in enumerate(METRICS)}


@torch.no_grad()
def evaluate_pairs():
    """The DPO figures on the held-out pairs. Every rank runs the same number of forwards (FSDP needs
    it): the list is padded with repeats to a multiple of the world size, and the repeats not counted."""
    model.eval()
    mine, n_real = common.padded_share(val_idx, dist)
    rows = []
    for b in loader(val_ds, D.micro_batches(mine, micro_batch_size)):
        with autocast:
            rows.append(pair_terms(dict(to_dev(b), split="val"))[2])
    model.train()
    return metrics_of([torch.cat(rows)[:n_real]])


log_json = checkpoint.JsonLog(out_dir, master, fresh=init_from != "resume",
                     wandb_config=dict(project=wandb_project, name=wandb_run_name, config=config) if wandb_log else None,
                     resume_step=start_step)


def save_step(step, val):
    if save_checkpoint:
        state = dict(step=step, val=json.dumps(val), config=json.dumps(dict(config, init_from=base_from), default=str))
        checkpoint.save(out_dir, raw, optimizer, run, fsdp, state, model_state=lora.lora_merged if lora_r else None)


lengths = D.grouping_lengths(train_ds, train_idx) if group_by_length else None  # what group_by_length sorts by


def step_batches(start):
    for step in range(start, max_steps):
        mine = D.batch_indices(len(train_idx), global_batch_size, step, seed, dist.rank, dist.world_size,
                               group_by_length, lengths)
        yield from D.micro_batches([train_idx[i] for i in mine], micro_batch_size)

# training loop --------------------------------------------------------------------
# The DPO loss is the mean over the pairs of the WHOLE global batch (each micro-batch's summed pair
# losses divided by the global pair count), the optional SFT term the mean over all chosen tokens:
# splitting a batch over micro-batches or ranks leaves the gradient unchanged.
model.train()
batches = iter(loader(train_ds, step_batches(start_step)))
bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, disable=not master, dynamic_ncols=True)
val, t0, first_val = None, time.time(), None
skipped = Counter()  # pairs skipped mid-run (skip_bad): images that failed only when decoded
if start_step >= max_steps:
    log(f"{out_dir}: already finished ({start_step} of {max_steps} steps); nothing to do")
if val_ds is not None and start_step == 0:
    val = first_val = evaluate_pairs()
    log("step 0 held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
    log_json(0, **{"val/" + k: v for k, v in val.items()})
if resume_state is not None:  # each step draws (dropout) what it drew in the uninterrupted run: see restore_rng
    checkpoint.restore_rng(resume_state, dist.rank)
step = start_step - 1
for step in bar:
    optim.set_lr(optimizer, optim.lr_factor(step, max_steps, warmup_steps, min_lr_ratio))
    micro = [next(batches) for _ in range(grad_accum)]
    if any(b is None for b in micro):
        raise D.DataError(f"step {step}: every pair of a micro-batch was unreadable (skip_bad); use a larger "
                          f"micro_batch_size, or fix the images", "unreadable batch")
    for b in micro:
        skipped.update(b.pop("skipped"))
    micro = [dict(to_dev(b), split="train") for b in micro]
    n_pairs = common.all_reduce_sum(sum(len(b["index"]) for b in micro), dist).item()
    n_chosen_tok = common.all_reduce_sum(sum((b["labels"][:len(b["index"]), 1:] != D.IGNORE_INDEX).sum() for b in micro), dist).item()
    rows = []
    for i, b in enumerate(micro):
        with common.grad_sync(model, raw, run, fsdp, i == grad_accum - 1), autocast:
            losses, nll, per_pair = pair_terms(b)
            objective = losses.sum() / n_pairs + (sft_weight * nll / n_chosen_tok if sft_weight else 0.0)
            (objective * dist.world_size).backward()  # DDP averages over ranks: scale the average back to the sum
        rows.append(per_pair)
    grad_norm = optim.clip_grad(trainable, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    train = metrics_of(rows)
    bar.set_postfix(loss=f"{train['loss']:.4f}", acc=f"{train['rewards/accuracies']:.2f}",
                    margin=f"{train['rewards/margins']:.3f}", pairs_s=f"{(step + 1 - start_step) * global_batch_size / (time.time() - t0):.1f}")
    log_json(step + 1, to_wandb=step % log_interval == 0, lr=optimizer.param_groups[0]["lr"],
             grad_norm=round(grad_norm, 6), **train)
    last = step == max_steps - 1 or step + 1 == stop_at_step
    if val_ds is not None and ((step + 1) % eval_interval == 0 or last):
        val = evaluate_pairs()
        bar.write(f"step {step + 1}: held-out loss {val['loss']:.4f}, reward accuracy {val['rewards/accuracies']:.3f}, "
                  f"margin {val['rewards/margins']:.4f}") if master else None
        log_json(step + 1, **{"val/" + k: v for k, v in val.items()})
    if (step + 1) % eval_interval == 0 or last:
        save_step(step + 1, val)
    if step + 1 == stop_at_step:
        break

common.report_skipped(skipped, run, log_json, step + 1, "pairs")
if master and step >= start_step:
    log(f"done: {step + 1 - start_step} steps in {time.time() - t0:.0f}s; checkpoint in {out_dir}")
    if first_val is not None and val is not None:  # the held-out figures before and after, as a table and as JSON
        print(f"{'held-out pairs':<22}{'before':>10}{'after':>10}")
        for k in METRICS:
            print(f"{k:<22}{first_val[k]:>10.4f}{val[k]:>10.4f}")
        D.write_atomic(os.path.join(out_dir, "heldout.json"), json.dumps(dict(before=first_val, after=val), indent=1))
common.finish(run.dist)
