"""
Visual instruction tuning of a LLaVA-style model: LLaVA stage 1 (projector alignment) and stage 2
(LLM + projector, or LoRA adapters), reflective (REVERIE) data as prepare_reverie.py writes it, CoT SFT.
One file, top to bottom, like nanoGPT's train.py.

The built-in shapes world on a laptop CPU (after `python -m shapes.prepare`), LLaVA's two stages from
the world's shipped LM and CLIP (shapes/models/), or both in one stage (the defaults below):
    python sft.py config/shapes_stage1.py && python sft.py config/shapes_stage2.py
    python sft.py
LLaVA-1.5-7B on 8 GPUs (the global batch stays the same; gradient accumulation adapts to the world size;
stage 2's full fine-tune needs FSDP's sharding, which only torchrun gives: one GPU cannot hold it):
    torchrun --standalone --nproc_per_node=8 sft.py config/llava15_7b_stage1.py
    torchrun --standalone --nproc_per_node=8 sft.py config/llava15_7b_stage2.py
    torchrun --standalone --nproc_per_node=8 sft.py config/llava15_7b_reverie_lora.py   # + REVERIE, LoRA
Resume an interrupted run exactly where it stopped:
    python sft.py <same args> --init_from=resume
"""
import json
import time
from collections import Counter

import torch
from tqdm import tqdm

import data as D
import model as M
from lucid import checkpoint, common, lora, optim

# -----------------------------------------------------------------------------
# defaults: instruction-tune a small VLM on the shapes world, on CPU, in minutes, from the world's
# pretrained LM and CLIP in one stage (config/shapes_stage{1,2}.py are the two-stage LLaVA recipe)
# I/O
out_dir = "out/sft"
init_from = "parts"        # 'parts' (lm_path + vision_path) | 'scratch' (LM built from the sizes below; vision tower from vision_path, or also from the sizes if None) | 'resume' | a checkpoint dir (ours or llava-hf)
eval_interval = 200        # steps between val-loss evaluations (and checkpoints)
eval_batches = 8           # val micro-batches per evaluation (0 = the whole val set)
log_interval = 10
save_checkpoint = True
wandb_log = False          # off by default; needs `pip install wandb`
wandb_project = "lucid"
wandb_run_name = "sft"
# data
data_path = "data/shapes/train.json"   # LLaVA conversation json/jsonl; several: "a.json:1.0,b.jsonl:0.5" (sample ratios)
val_data_path = "data/shapes/val.json"  # None = no val loss
image_root = "data/shapes/images"
template = "chat"          # 'plain' (LLaVA stage 1) | 'vicuna_v1' (LLaVA-1.5) | 'chat' (the tokenizer's own chat template)
max_len = 512              # tokens; text is truncated, an image never is (too long -> error, or skip with skip_bad)
skip_bad = False           # True: count and skip bad samples (missing/corrupt image, too long...) instead of stopping
check_images = "header"    # before step 1, split over the ranks: 'header' opens every image's header (a missing or non-image
                           # file stops, or is skipped, now, not hours in), 'full' decodes every image (truncated files too), 'none'
pad_to_square = True       # LLaVA-1.5: pad images to square with the processor's mean colour
group_by_length = 0        # k > 0: sort windows of k global batches by modality and length (less padding; see data.batch_indices)
num_workers = 0            # DataLoader workers for image decoding, and processes for validating the data (use 4-8 on GPU machines)
# model: pretrained parts (init_from='parts': both; 'scratch': the vision tower only)
lm_path = "shapes/models/lm"        # e.g. 'lmsys/vicuna-7b-v1.5'; the shapes world ships a tiny pretrained LM
vision_path = "shapes/models/clip"  # e.g. 'openai/clip-vit-large-patch14-336'; the shapes world ships a tiny pretrained CLIP
tokenizer_path = None      # None: the LM's own (init_from='parts') or data/shapes/tokenizer ('scratch')
projector_type = "mlp2x_gelu"
vision_feature_layer = -2  # LLaVA: penultimate layer
lora_r = 0                 # > 0: train LoRA adapters of this rank on the LM's projections instead of its weights
lora_alpha = 16            # (LLaVA-1.5's LoRA recipe, which REVERIE's table uses: r 128, alpha 256, lr_lm 2e-4)
lora_dropout = 0.0
lora_targets = lora.LORA_TARGETS  # regex over module names; default: the LM's attention and MLP projections
# model: the LM (and, with vision_path=None, the vision tower) built from these sizes for init_from='scratch'
n_layer = 4
n_head = 4
n_embd = 128
vision_n_layer = 3
vision_n_head = 4
vision_n_embd = 96
image_size = 48
patch_size = 16
# optimization
global_batch_size = 32     # sequences per optimizer step, summed over ranks and micro-batches
micro_batch_size = 16      # sequences per forward pass per rank
max_steps = 0              # 0: derive from epochs
stop_at_step = 0           # >0: stop (with a checkpoint) after this step, e.g. to fit a job's time limit; resume later
epochs = 1.0
lr_vision = 0.0            # per-part learning rates; 0 freezes the part (LLaVA keeps its pretrained vision tower frozen)
lr_projector = 1e-3
lr_lm = 1e-3
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0            # 0 = off
warmup_ratio = 0.03
min_lr_ratio = 0.0
# system
device = "auto"            # 'auto' | 'cpu' | 'cuda'
dtype = "auto"             # 'auto' (bfloat16 autocast on CUDA, float32 on CPU) | 'float32' | 'bfloat16'
compile = False
gradient_checkpointing = False   # recompute activations in backward: less memory, ~30% more compute
distributed = "ddp"        # under torchrun: 'ddp' (weights, grads and AdamW state fit one GPU) | 'fsdp' (FSDP2 shards them: 7B full fine-tuning)
seed = 1337
# -----------------------------------------------------------------------------
from configurator import ConfigError, configure  # noqa: E402
config = configure(globals())
# -----------------------------------------------------------------------------

run = common.setup(seed, device, dtype)
dist, dev, log, master = run.dist, run.device, run.log, run.dist.master
checkpoint.recover(out_dir, run)  # finish (or undo) a checkpoint write a kill interrupted, before anything reads out_dir

# model --------------------------------------------------------------------------
# where the run started; LoRA resumes from there (the adapted layers' own weights) plus its saved adapters
resume_state, start_from = checkpoint.resume_point(init_from, out_dir)
if lora_r and start_from == "scratch":
    raise ConfigError("LoRA adapts a pretrained LM: use init_from=parts or a checkpoint, not scratch")
source = start_from if lora_r else init_from


def load_model():
    """The starting model (under FSDP2 only rank 0 calls this: common.build)."""
    if source == "scratch":
        from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig
        tok = AutoTokenizer.from_pretrained(tokenizer_path or "data/shapes/tokenizer")
        vision = vision_path or CLIPVisionConfig(hidden_size=vision_n_embd, intermediate_size=4 * vision_n_embd,
                                                 num_hidden_layers=vision_n_layer, num_attention_heads=vision_n_head,
                                                 image_size=image_size, patch_size=patch_size)
        tcfg = LlamaConfig(vocab_size=len(tok), hidden_size=n_embd, intermediate_size=4 * n_embd, num_hidden_layers=n_layer,
                           num_attention_heads=n_head, num_key_value_heads=n_head, max_position_embeddings=max(max_len, 512),
                           tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
        return M.VLM.from_parts(lm=tcfg, vision=vision, tokenizer=tok, projector_type=projector_type,
                                vision_feature_layer=vision_feature_layer, template=template)
    if source == "parts":
        return M.VLM.from_parts(lm=lm_path, vision=vision_path, tokenizer=tokenizer_path, projector_type=projector_type,
                                vision_feature_layer=vision_feature_layer, template=template)
    return M.VLM.from_pretrained(out_dir if source == "resume" else source)


vlm = common.build(load_model, run, distributed)
if source == "resume":
    log(f"resuming from {out_dir} at step {resume_state['step']}")
if lora_r:
    lora.add_adapters(vlm, lora_r, lora_alpha, lora_dropout, lora_targets, resume_state, out_dir, log)
vlm.config["template"] = template
vlm.config["pad_to_square"] = pad_to_square
tok = vlm.tokenizer
if gradient_checkpointing:
    vlm.lm.gradient_checkpointing_enable()
n_params = sum(p.numel() for p in vlm.parameters())
log(f"model: {n_params / 1e6:.2f}M parameters ({', '.join(f'{p} {sum(q.numel() for n, q in vlm.named_parameters() if optim.part_of(n) == p) / 1e6:.2f}M' for p in M.PARTS)}), "
    f"{vlm.num_image_tokens} tokens per image")

# data ---------------------------------------------------------------------------
def make_dataset(spec):
    ds = D.SFTDataset(D.load_records(spec, image_root), tok, vlm.image_processor, template, vlm.image_token_id,
                      vlm.num_image_tokens, image_root, max_len=max_len, pad_to_square=pad_to_square, skip_bad=skip_bad)
    if check_images not in ("header", "full", "none"):
        raise ConfigError(f"check_images must be 'header', 'full' or 'none', got {check_images!r}")
    # split over the ranks (and num_workers processes each), then gathered: the same verdicts everywhere
    good = ds.validate({"header": True, "full": "full", "none": False}[check_images], dist.rank, dist.world_size, num_workers)
    if ds.skipped:
        log(f"{spec}: skipping {sum(ds.skipped.values())} of {len(ds)} samples: {dict(ds.skipped)}")
    return ds, good

train_ds, train_idx = make_dataset(data_path)
val_ds, val_idx = make_dataset(val_data_path) if val_data_path else (None, [])
grad_accum, max_steps, warmup_steps = optim.steps(len(train_idx), global_batch_size, micro_batch_size, dist.world_size,
                                              max_steps, epochs, warmup_ratio)
log(f"{len(train_idx)} training samples, global batch {global_batch_size} = {micro_batch_size} x {grad_accum} accumulation "
    f"x {dist.world_size} ranks, {max_steps} steps")


lengths = D.grouping_lengths(train_ds, train_idx) if group_by_length else None  # what group_by_length sorts by


def step_batches(start):
    """Yields this rank's micro-batches (lists of dataset indices), step after step, from `start`."""
    for step in range(start, max_steps):
        mine = D.batch_indices(len(train_idx), global_batch_size, step, seed, dist.rank, dist.world_size,
                               group_by_length, lengths)
        yield from D.micro_batches([train_idx[i] for i in mine], micro_batch_size)


def loader(ds, batch_sampler):
    return common.loader(ds, batch_sampler, D.collate, tok.pad_token_id, num_workers, dev)


def to_dev(batch):
    return common.to_device(batch, dev)

# optimizer ----------------------------------------------------------------------
lrs = {"vision": lr_vision, "projector": lr_projector, "lm": lr_lm}
unused = optim.set_trainable(vlm, lrs)
common.master_weights(vlm, run)
if unused:
    log(f"frozen: {len(unused)} vision parameters the chosen feature layer never uses")
vlm, raw, fsdp, autocast = common.wrap(vlm, run, distributed, compile)
optimizer = optim.configure_optimizer(raw, lrs, weight_decay, (beta1, beta2), fused=dev.type == "cuda")
start_step = checkpoint.resume(optimizer, raw, fsdp, resume_state, out_dir)
trainable = [p for p in raw.parameters() if p.requires_grad]


@torch.no_grad()
def evaluate_val():
    """Token-weighted mean loss over (part of) the val set, summed over ranks."""
    vlm.eval()
    idx = val_idx if eval_batches == 0 else val_idx[:eval_batches * micro_batch_size * dist.world_size]
    mine = D.micro_batches(common.equal_shares(idx, dist), micro_batch_size)
    tot = torch.zeros(2, dtype=torch.float64)
    for batch in loader(val_ds, mine):
        batch = to_dev(batch)
        with autocast:
            tot[0] += raw(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"], reduction="sum").item()
        tot[1] += (batch["labels"][:, 1:] != D.IGNORE_INDEX).sum().item()
    tot = common.all_reduce_sum(tot, dist)
    vlm.train()
    return (tot[0] / tot[1]).item()


log_json = checkpoint.JsonLog(out_dir, master, fresh=init_from != "resume",
                     wandb_config=dict(project=wandb_project, name=wandb_run_name, config=config) if wandb_log else None,
                     resume_step=start_step)


def save_step(step, val_loss):
    if save_checkpoint:
        checkpoint.save(out_dir, raw, optimizer, run, fsdp,
               dict(step=step, val_loss=val_loss, config=json.dumps(dict(config, init_from=start_from), default=str)),
               model_state=lora.lora_merged if lora_r else None)


# training loop --------------------------------------------------------------------
# The loss is averaged over the supervised tokens of the WHOLE global batch: each micro-batch returns
# its summed token loss, divided by the global token count (all-reduced before any backward). So
# splitting a batch over micro-batches or ranks leaves the gradient unchanged, and a long answer
# weighs as many tokens as it has (LLaVA's per-micro-batch mean does not have this property).
vlm.train()
batches = iter(loader(train_ds, step_batches(start_step)))
bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, disable=not master, dynamic_ncols=True)
val_loss, tokens_seen, t0 = None, 0, time.time()
skipped = Counter()  # samples skipped mid-run (skip_bad): images that failed only when decoded
if start_step >= max_steps:
    log(f"{out_dir}: already finished ({start_step} of {max_steps} steps); nothing to do")
if val_ds is not None and start_step == 0:
    val_loss = evaluate_val()
    log(f"step 0: val loss {val_loss:.4f}")
    log_json(0, val_loss=val_loss)
if resume_state is not None:  # each step draws (dropout) what it drew in the uninterrupted run: see restore_rng
    checkpoint.restore_rng(resume_state, dist.rank)
step = start_step - 1
for step in bar:
    optim.set_lr(optimizer, optim.lr_factor(step, max_steps, warmup_steps, min_lr_ratio))
    micro = [next(batches) for _ in range(grad_accum)]
    if any(b is None for b in micro):
        raise D.DataError(f"step {step}: every sample of a micro-batch was unreadable (skip_bad); use a larger "
                          f"micro_batch_size, or fix the images", "unreadable batch")
    for b in micro:
        skipped.update(b.pop("skipped"))
    micro = [to_dev(b) for b in micro]
    n_tok = common.all_reduce_sum(sum((b["labels"][:, 1:] != D.IGNORE_INDEX).sum() for b in micro), dist)
    loss_sum = 0.0
    for i, b in enumerate(micro):
        with common.grad_sync(vlm, raw, run, fsdp, i == grad_accum - 1), autocast:
            loss = vlm(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"], reduction="sum")
            # DDP averages gradients over ranks; scaling by world_size turns that average into the sum
            (loss * (dist.world_size / n_tok.item())).backward()
        loss_sum += loss.item()
    grad_norm = optim.clip_grad(trainable, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    totals = common.all_reduce_sum([loss_sum, sum(b["attention_mask"].sum().item() for b in micro)], dist)
    train_loss = totals[0].item() / n_tok.item()
    tokens_seen += int(totals[1])
    tps = tokens_seen / (time.time() - t0)
    bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", tok_s=f"{tps:,.0f}")
    log_json(step + 1, to_wandb=step % log_interval == 0, loss=train_loss, lr=optimizer.param_groups[0]["lr"],
             grad_norm=round(grad_norm, 6), tokens_per_s=round(tps))
    last = step == max_steps - 1 or step + 1 == stop_at_step
    if val_ds is not None and ((step + 1) % eval_interval == 0 or last):
        val_loss = evaluate_val()
        bar.write(f"step {step + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}") if master else None
        log_json(step + 1, val_loss=val_loss)
    if (step + 1) % eval_interval == 0 or last:
        save_step(step + 1, val_loss)
    if step + 1 == stop_at_step:
        break

common.report_skipped(skipped, run, log_json, step + 1, "samples")
if master and step >= start_step:
    log(f"done: {step + 1 - start_step} steps in {time.time() - t0:.0f}s, final train loss {train_loss:.4f}"
        + (f", val loss {val_loss:.4f}" if val_loss is not None else "") + f"; checkpoint in {out_dir}")
common.finish(run.dist)
