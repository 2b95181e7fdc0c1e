"""Training, nanoGPT style: one file, defaults at the top, overrides from configs and flags.

    python train.py configs/prefix_simba.py                      # one GPU (or the CPU)
    python train.py configs/prefix_simba.py configs/tiny.py      # a tiny model on a laptop CPU
    torchrun --standalone --nproc_per_node=8 train.py configs/prefix_simba.py
    python train.py configs/prefix_simba.py --init_from=resume   # continue exactly where it stopped
    # fine-tune: the weights of out-base, trained on data/mine, written to out-mine
    python train.py configs/prefix_simba.py --init_from=out-base --dataset=mine --out_dir=out-mine

Data: data/<dataset>/ as prepare.py writes it. Each training example is a random clip, a random crop
of seq_len frames (padded with the special token), its first n_codebooks codebooks in the delay
pattern, and the clip's caption embedding; the caption is dropped whole (caption_dropout) or token
by token (word_dropout) so that one model serves classifier-free guidance. Every eval_interval: the
val loss with the caption and without it (their difference, the text gain, shows the model listens
to the text), one row in out_dir/log.csv, and out_dir/ckpt.pt (written atomically, with the RNG
states, so resume is exact); best.pt too when the val loss is the lowest so far, and ckpt_<iter>.pt
every keep_every iterations. At the end, out_dir/export/: the best weights alone as
model.safetensors and model.json, to share (sample.export_run).
"""
import copy
import csv
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from bench import peak_flops
from configurator import configure
from data import (DataError, atomic_write, keep_freed_memory, load_dataset_codec, read_split,
                  text_rows)
from model import ModelConfig, MusicLM, codebook_losses, delay
from sample import export_run, load_run, write_wav
from stage2 import Stage2Config, Stage2Diffusion

keep_freed_memory()

# -----------------------------------------------------------------------------
# defaults; the paper's training settings where it has them (read from the official code,
# github Lonian6/SSM-TTM)
out_dir = "out"
init_from = "scratch"  # scratch | resume (out_dir/ckpt.pt) | a run dir or checkpoint to start from
# (a run dir or checkpoint file: its weights start a new run)
keep_every = 0  # also keep ckpt_<iter>.pt every keep_every iterations (0: only ckpt.pt and best.pt)
ema_decay = 0.0  # EMA of the weights, used by eval, sample.py and evaluate.py (0: off)
# (EMA: an exponential moving average)
dataset = "synth"  # data/<dataset>, written by prepare.py
data_dir = "data"
eval_interval = 500
eval_iters = 20  # val batches per eval
log_interval = 10
max_iters = 100_000  # the paper trains Prefix SiMBA 100k steps
seed = 1337
# data
batch_size = 4  # the paper: 4 x 32 accumulation of 30 s clips
gradient_accumulation_steps = 32  # in total over all processes
seq_len = 2250  # music frames per crop: 30 s at 75 Hz
caption_dropout = 0.1
word_dropout = 0.1
# model: every ModelConfig key (the configs/ files set them); text_dim and max_text_len come from
# the data
model_type = "lm"  # lm: the LM (MusicLM) | stage2: the two-stage design's diffusion model
block = "simba"
cond = "prefix"
mixer = "mamba2"
attn_layers = ()
n_layer = 24
d_model = 1024
d_state = 512
d_conv = 4
expand = 2
headdim = 64
n_head = 16
mlp_ratio = 2.0
dropout = 0.3
n_codebooks = 4
codebook_size = 1024
label_smoothing = 0.1
# stage 2 (model_type = "stage2"): Stage2Config keys; codebooks and latent size come from the
# data's codec
unet_channels = (64, 64, 128)
train_timesteps = 1000
# optimizer: AdamW, linear warmup then cosine decay to min_lr_ratio x learning_rate
learning_rate = 1e-4
weight_decay = 0.02
beta1 = 0.9
beta2 = 0.999
eps = 1e-7
grad_clip = 1.0
warmup_iters = 500
lr_decay_iters = 100_000
min_lr_ratio = 0.005
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype on CUDA
# (float16: with a gradient scaler, for GPUs without bfloat16); CPU runs float32
compile = False
# logging (log.csv always) and audio while training; the packages are imported only when asked for
wandb_log = False  # as nanoGPT: also log to Weights & Biases (pip install wandb)
wandb_project = "ssm-ttm"
wandb_run_name = ""  # default: out_dir's name
tensorboard_log = False  # also log to TensorBoard in out_dir/tensorboard/ (pip install tensorboard)
sample_interval = 0  # LM: every sample_interval evals, clips in out_dir/samples/iter_<N>/
# (from the first sample_clips val captions)
sample_clips = 2
sample_seconds = 5.0
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:], "train.py")

# DDP: torchrun sets RANK; each process takes its share of the gradient accumulation
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank, local_rank, world_size = (dist.get_rank(), int(os.environ["LOCAL_RANK"]),
                                    dist.get_world_size())
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:
        sys.exit(f"train.py: gradient_accumulation_steps={gradient_accumulation_steps} must be a "
                 f"multiple of the {world_size} processes")
    gradient_accumulation_steps //= world_size
else:
    rank, world_size = 0, 1
master = rank == 0
device_type = "cuda" if device.startswith("cuda") else "cpu"
torch.manual_seed(seed + rank)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
autocast = (nullcontext() if device_type == "cpu"
            else torch.autocast("cuda", dtype=getattr(torch, dtype)))

# -----------------------------------------------------------------------------
# data
root = os.path.join(data_dir, dataset)
if not os.path.exists(os.path.join(root, "meta.json")):
    sys.exit(f"train.py: no dataset at {root} (meta.json missing); "
             "run `python prepare.py` or set --dataset")
meta = json.load(open(os.path.join(root, "meta.json")))
codec, text_meta = meta["codec"], meta["text_encoder"]
if model_type not in ("lm", "stage2"):
    sys.exit(f"train.py: model_type={model_type!r}: expected 'lm' or 'stage2'")
if keep_every % eval_interval:
    sys.exit(f"train.py: keep_every={keep_every} must be a multiple of "
             f"eval_interval={eval_interval} (checkpoints are written at evals)")
if not 0 <= ema_decay < 1:
    sys.exit(f"train.py: ema_decay={ema_decay} must be in [0, 1) (0: no EMA; 0.999 is usual)")
if n_codebooks > codec["n_codebooks"]:
    sys.exit(f"train.py: n_codebooks={n_codebooks} but {root} stores {codec['n_codebooks']}")
if codebook_size != codec["codebook_size"]:
    sys.exit(f"train.py: codebook_size={codebook_size} but the codec of {root} has "
             f"{codec['codebook_size']}")
if not codec["pretrained"] and master:
    print(f"train.py: WARNING: {root} was encoded with an UNTRAINED codec; the model will learn "
          "its tokens, but decoded audio will not be meaningful music")


try:
    splits = {s: read_split(root, s, meta) for s in ("train", "val")}
except DataError as e:
    sys.exit(f"train.py: {e}")
# the training batches' randomness (saved in the checkpoint)
data_gen = torch.Generator().manual_seed(seed + rank)


def get_batch(split, gen, drop_text=False):
    """-> model kwargs: codes, targets (B, K, seq_len + K - 1) delayed; text (B, T, dim);
    text_mask (B, T). Stage 2: codes (B, all stored codebooks, T), crops of seq_len frames or of
    the shortest chosen clip."""
    d = splits[split]
    idx = torch.randint(len(d["clips"]), (batch_size,), generator=gen).tolist()
    if model_type == "stage2":
        n = min(seq_len, *(int(d["clips"][i][1]) for i in idx))
        crops = []
        for i in idx:
            offset, length = (int(x) for x in d["clips"][i, :2])
            start = offset + int(torch.randint(length - n + 1, (1,), generator=gen))
            crops.append(torch.from_numpy(d["codes"][:, start:start + n].astype(np.int64)))
        return dict(codes=torch.stack(crops).to(device))
    # special = padding
    crops = torch.full((batch_size, n_codebooks, seq_len), codebook_size, dtype=torch.long)
    for b, i in enumerate(idx):
        offset, length = (int(x) for x in d["clips"][i, :2])
        start = int(torch.randint(max(1, length - seq_len + 1), (1,), generator=gen))
        n = min(seq_len, length - start)
        crops[b, :, :n] = torch.from_numpy(
            d["codes"][:n_codebooks, offset + start:offset + start + n].astype(np.int64))
    seq = delay(crops, codebook_size)  # (B, K, seq_len + K)
    # train: one of each clip's captions
    text, mask = text_rows(d, idx, gen if split == "train" else None)
    if split == "train":  # caption and word dropout, for classifier-free guidance
        mask &= torch.rand(mask.shape, generator=gen) >= word_dropout
        mask &= torch.rand(batch_size, 1, generator=gen) >= caption_dropout
    if drop_text:
        mask[:] = False
    batch = dict(codes=seq[:, :, :-1], targets=seq[:, :, 1:], text=text, text_mask=mask)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# model and optimizer
if master:
    os.makedirs(out_dir, exist_ok=True)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
if model_type == "lm":
    model_args = {f.name: config[f.name] for f in fields(ModelConfig)
                  if f.name not in ("text_dim", "max_text_len")}
    model_args.update(text_dim=text_meta["dim"], max_text_len=text_meta["max_tokens"])
else:
    model_args = dict(unet_channels=unet_channels, train_timesteps=train_timesteps,
                      codebook_size=codebook_size, n_codebooks=codec["n_codebooks"])
iter_num, best_val_loss, tokens_seen, flops_seen, train_seconds = 0, float("inf"), 0, 0.0, 0.0
# resume: this run's checkpoint; fine-tuning: the weights of another run
checkpoint, source = None, None
if init_from == "resume":
    if not os.path.exists(ckpt_path):
        sys.exit(f"train.py: --init_from=resume but {ckpt_path} does not exist")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model_args = checkpoint["model_args"]
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
    tokens_seen, flops_seen = checkpoint["tokens_seen"], checkpoint["flops_seen"]
    train_seconds = checkpoint.get("train_seconds", 0.0)
elif init_from != "scratch":
    # the weights sample.py would use: best.pt where it exists, the EMA where kept; an export too
    try:
        source, source_ckpt = load_run(init_from, model_type)
    except ValueError as e:
        sys.exit(f"train.py: init_from={init_from}: {e} (expected scratch, resume, or a run dir or "
                 "checkpoint file to start from)")
    theirs = source_ckpt["model_args"]
    differ = [f"{k} ({theirs.get(k)!r} there, {model_args.get(k)!r} here)"
              for k in sorted(set(model_args) | set(theirs)) if theirs.get(k) != model_args.get(k)]
    if differ:
        sys.exit(f"train.py: init_from={init_from}: {source_ckpt['path']} holds another model: "
                 + "; ".join(differ))
if model_type == "lm":
    model = MusicLM(ModelConfig(**model_args)).to(device)
    positions = seq_len + n_codebooks - 1  # per crop, after the delay pattern
    flops_per_token = model.estimate_flops_per_token(positions)
else:
    model = Stage2Diffusion(Stage2Config(**model_args)).to(device)
    positions = seq_len
    # the 6N rule: an upper bound for a UNet, whose deeper levels run shorter
    flops_per_token = 6 * model.num_params()
    if not checkpoint:  # the codec's codebooks and the latent statistics of the training data
        try:
            books = load_dataset_codec(codec, root).quantizer.vq.layers
        except DataError as e:
            sys.exit(f"train.py: {e}")
        model.set_codec(
            torch.stack([layer._codebook.embed
                         for layer in books[:codec["n_codebooks"]]]).to(device),
            torch.from_numpy(splits["train"]["codes"][:, :100_000].astype(np.int64)).to(device))
if checkpoint:
    model.load_state_dict(checkpoint["model"])
if source is not None:  # the same settings, so the same parameters and buffers
    model.load_state_dict(source.state_dict())
    source = None
ema = None
if ema_decay > 0:  # a copy of the weights, averaged after every optimizer step
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if checkpoint and checkpoint.get("ema") is not None:
        ema.load_state_dict(checkpoint["ema"])

decay = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d))]
decay_ids = {id(p) for p in decay}  # matrices; never A_log, D, dt bias, norms, biases, embeddings
no_decay = [p for p in model.parameters() if id(p) not in decay_ids]
optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay),
                               dict(params=no_decay, weight_decay=0.0)],
                              lr=learning_rate, betas=(beta1, beta2), eps=eps,
                              fused=device_type == "cuda")
scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16" and device_type == "cuda")
if checkpoint:
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    if master:  # the checkpoint holds rank 0's RNG states; other ranks draw fresh ones
        data_gen.set_state(checkpoint["rng"]["data"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
    else:
        data_gen.manual_seed(seed + rank + 1_000_003 * iter_num)
    if device_type == "cuda" and checkpoint["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
checkpoint = None  # free memory
raw_model = model
if compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)


def get_lr(it):
    """Linear warmup, then cosine decay to min_lr_ratio x learning_rate at lr_decay_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    ratio = min(1.0, (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters))
    return learning_rate * (min_lr_ratio
                            + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * ratio)))


METRICS = (["val_loss", "val_loss_notext", "text_gain"]
           + [f"val_loss_cb{k}" for k in range(n_codebooks)]
           if model_type == "lm" else ["val_loss"])


@torch.no_grad()
def evaluate():
    """-> {metric: value} over eval_iters fixed val batches. LM: the loss (mean and per codebook)
    with the caption and without it, and their difference, the text gain. Stage 2: the diffusion
    loss."""
    model.eval()
    net = raw_model if ema is None else ema  # the weights sample.py and evaluate.py will use
    if model_type == "stage2":
        gen = torch.Generator().manual_seed(seed)  # the same batches, timesteps, noise every time
        loss = sum(net(**get_batch("val", gen), generator=gen)[1].item() for _ in range(eval_iters))
        model.train()
        return dict(val_loss=loss / eval_iters)
    per_cb = {}
    for drop_text in (False, True):
        gen = torch.Generator().manual_seed(seed)
        per_cb[drop_text] = torch.zeros(n_codebooks)
        for _ in range(eval_iters):
            batch = get_batch("val", gen, drop_text)
            with autocast:
                logits, _ = net(batch["codes"], batch["text"], batch["text_mask"])
            per_cb[drop_text] += codebook_losses(logits, batch["targets"]).cpu() / eval_iters
    model.train()
    val, val_notext = per_cb[False].mean().item(), per_cb[True].mean().item()
    return dict(val_loss=val, val_loss_notext=val_notext, text_gain=val_notext - val,
                **{f"val_loss_cb{k}": v for k, v in enumerate(per_cb[False].tolist())})


def mfu(tokens_per_s):
    peak = peak_flops() if device_type == "cuda" else None
    return None if peak is None else flops_per_token * tokens_per_s / (peak * world_size)


def save_checkpoint(path, resumable=True):
    """Everything a run needs to continue exactly (resumable), or only what sample.py and
    evaluate.py read."""
    ckpt = dict(model_args=model_args, model=raw_model.state_dict(),
                ema=None if ema is None else ema.state_dict(),
                iter_num=iter_num, best_val_loss=best_val_loss, config=config, data_meta=meta,
                tokens_seen=tokens_seen, flops_seen=flops_seen, train_seconds=train_seconds)
    if resumable:
        ckpt.update(optimizer=optimizer.state_dict(),
                    scaler=scaler.state_dict() if scaler.is_enabled() else None,
                    rng=dict(data=data_gen.get_state(), torch=torch.get_rng_state(),
                             cuda=torch.cuda.get_rng_state() if device_type == "cuda" else None))
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))  # a kill never leaves a broken checkpoint


def write_samples():
    """Clips of sample_seconds from the first sample_clips val captions (cached decoding,
    guidance 3, the weights the evals use) -> out_dir/samples/iter_<N>/ (wav files, captions.jsonl);
    -> [(caption, wav, sample_rate)]."""
    rows = list(range(min(sample_clips, len(splits["val"]["clips"]))))
    text, mask = text_rows(splits["val"], rows)
    net = raw_model if ema is None else ema
    codes = net.generate(text.to(device), mask.to(device),
                         round(sample_seconds * codec["frame_rate"]), cfg_scale=3.0,
                         generator=torch.Generator(device).manual_seed(seed))  # (n, K, frames)
    with torch.no_grad():
        wavs = sample_codec.decode([(codes, None)])[:, 0].float().cpu().numpy()  # (n, samples)
    folder = os.path.join(out_dir, "samples", f"iter_{iter_num}")
    os.makedirs(folder, exist_ok=True)
    clips = [(val_captions[i], wav, codec["sample_rate"]) for i, wav in zip(rows, wavs)]
    for i, (caption, wav, rate) in enumerate(clips):
        write_wav(os.path.join(folder, f"{i}.wav"), wav, rate)
    index = "".join(json.dumps(dict(file=f"{i}.wav", caption=c)) + "\n"
                    for i, (c, _, _) in enumerate(clips))
    atomic_write(os.path.join(folder, "captions.jsonl"), lambda tmp: Path(tmp).write_text(index))
    return clips


def log_to_loggers(values, clips=()):
    """This eval's values {name: number} and sampled clips [(caption, wav, sample_rate)]
    -> wandb / TensorBoard."""
    if wandb_run is not None:
        wandb_run.log({**values,
                       **{f"sample_{i}": wandb.Audio(wav, sample_rate=rate, caption=caption)
                          for i, (caption, wav, rate) in enumerate(clips)}}, step=iter_num)
    if tensorboard is not None:
        for name, value in values.items():
            tensorboard.add_scalar(name, value, iter_num)
        for i, (caption, wav, rate) in enumerate(clips):
            tensorboard.add_audio(f"sample_{i}", torch.from_numpy(wav)[None], iter_num,
                                  sample_rate=rate)
            tensorboard.add_text(f"sample_{i}", caption, iter_num)
        tensorboard.flush()


# -----------------------------------------------------------------------------
# the loop
wandb_run = tensorboard = sample_codec = None
if master and wandb_log:
    try:
        import wandb
    except ImportError:
        sys.exit("train.py: wandb_log=True but the wandb package is not installed: "
                 "pip install wandb")
    wandb_run = wandb.init(project=wandb_project,
                           name=wandb_run_name or os.path.basename(os.path.abspath(out_dir)),
                           config=config)
if master and tensorboard_log:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        sys.exit("train.py: tensorboard_log=True but the tensorboard package is not installed: "
                 "pip install tensorboard")
    tensorboard = SummaryWriter(os.path.join(out_dir, "tensorboard"))
# the codec that turns the samples' tokens into audio
if master and sample_interval and model_type == "lm":
    try:
        sample_codec = load_dataset_codec(codec, root, device)
    except DataError as e:
        sys.exit(f"train.py: {e}")
    with open(os.path.join(root, "val_captions.jsonl")) as f:
        # the caption text_rows gives
        val_captions = [json.loads(line)["captions"][0] for line in f]
log_path = os.path.join(out_dir, "log.csv")
columns = ["iter", "tokens_seen", "flops_seen", "train_seconds", "lr", "train_loss", *METRICS,
           "tokens_per_s", "mfu", "peak_mem_MB"]
if master and (init_from == "scratch" or not os.path.exists(log_path)):
    with open(log_path, "w", newline="") as f:
        csv.writer(f).writerow(columns)
tokens_per_iter = batch_size * positions * gradient_accumulation_steps * world_size
train_kwargs = dict(label_smoothing=label_smoothing) if model_type == "lm" else {}
train_losses, t_window, tokens_window = [], time.time(), 0
start_iter = iter_num
if master:
    print(f"train.py: {raw_model.num_params() / 1e6:.2f}M parameters, "
          f"{tokens_per_iter} tokens per iteration, "
          f"{flops_per_token / 1e6:.1f} MFLOPs per token, "
          f"data {root} ({meta['splits']['train']['clips']} train clips)")
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # the checkpoint was written right after this eval
    logged = init_from == "resume" and iter_num == start_iter
    if (iter_num % eval_interval == 0 or iter_num >= max_iters) and master and not logged:
        # training time since the last eval (evals and checkpoints not counted)
        elapsed = time.time() - t_window
        metrics = evaluate()
        tokens_per_s = tokens_window / elapsed if tokens_window else None
        train_seconds += elapsed if tokens_window else 0.0
        train_loss = sum(train_losses) / len(train_losses) if train_losses else None
        peak = torch.cuda.max_memory_allocated() / 2**20 if device_type == "cuda" else None
        print(f"iter {iter_num}: val loss {metrics['val_loss']:.4f}"
              + (f", without text {metrics['val_loss_notext']:.4f}, "
                 f"text gain {metrics['text_gain']:+.4f}"
                 if model_type == "lm" else "")
              + (f", train loss {train_loss:.4f}" if train_loss else ""))
        improved = metrics["val_loss"] < best_val_loss
        best_val_loss = min(best_val_loss, metrics["val_loss"])
        row = [iter_num, tokens_seen, flops_seen, train_seconds, lr, train_loss, *metrics.values(),
               tokens_per_s, mfu(tokens_per_s) if tokens_per_s else None, peak]
        with open(log_path, "a", newline="") as f:
            csv.writer(f).writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v
                                    for v in row])
        sampling = (sample_codec is not None and iter_num > 0
                    and (iter_num // eval_interval) % sample_interval == 0)
        clips = write_samples() if sampling else ()
        log_to_loggers({k: v for k, v in zip(columns, row) if k != "iter" and v is not None}, clips)
        save_checkpoint(ckpt_path)
        if improved:
            save_checkpoint(os.path.join(out_dir, "best.pt"), resumable=False)
        if keep_every and iter_num > 0 and iter_num % keep_every == 0:
            save_checkpoint(os.path.join(out_dir, f"ckpt_{iter_num}.pt"))
        train_losses, t_window, tokens_window = [], time.time(), 0
    if iter_num >= max_iters:
        break

    total = 0.0
    for micro_step in range(gradient_accumulation_steps):
        batch = get_batch("train", data_gen)
        if ddp:  # average gradients across processes only after the last micro-step
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with autocast:
            _, loss = model(**batch, **train_kwargs)
            loss = loss / gradient_accumulation_steps
        # with float16 the loss is scaled up first, so no gradient underflows
        scaler.scale(loss).backward()
        total += loss.item()
    if not math.isfinite(total):
        sys.exit(f"train.py: loss is {total} at iteration {iter_num}; "
                 "stopping (the last checkpoint is intact)")
    scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # optimizer.step(), skipped (float16 only) where a gradient overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:  # with a warmup, so that the first steps' weights do not linger
        d = min(ema_decay, (1 + iter_num) / (10 + iter_num))
        for e, p in zip(ema.parameters(), raw_model.parameters()):
            e.lerp_(p, 1 - d)

    iter_num += 1
    tokens_seen += tokens_per_iter
    flops_seen += tokens_per_iter * flops_per_token
    tokens_window += tokens_per_iter
    train_losses.append(total)
    if master and iter_num % log_interval == 0:
        print(f"iter {iter_num}: loss {total:.4f}, lr {lr:.2e}, "
              f"{tokens_window / (time.time() - t_window):.0f} tokens/s")

# the run's model to share: best.pt's weights (the EMA where kept) without the training state
if master:
    print(f"train.py: exported {export_run(out_dir, os.path.join(out_dir, 'export'))} "
          "(model.safetensors, model.json)")
if ddp:
    dist.destroy_process_group()
