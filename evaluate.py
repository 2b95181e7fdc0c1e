"""Measurement: numbers about trained models and generated audio, as Markdown tables and JSON.

    python evaluate.py --section=offline --out_dir=out-prefix-simba   # val NLL, text gain, probe
    python evaluate.py --section=audio --generated=DIR --reference=DIR   # FD_openl3, KL_passt, CLAP
    python evaluate.py --section=audio --out_dir=RUN --prompts_file=P --reference=DIR   # generates
    python evaluate.py --section=stage2 --stage2_dir=out-stage2-diffusion
    python evaluate.py --runs out-prefix-simba out-prefix-transformer   # one table, one figure

offline (no pretrained evaluator; data prepare.py wrote): the val NLL per codebook with and without
  the caption (their difference is the text gain), and text adherence: a small probe, trained here
  and cached next to the data, predicts each caption attribute (instrument, tempo, mode, drums...)
  from a window of codebook-0 tokens. Its accuracy on real val tokens is the ceiling; its accuracy
  on tokens the model generates from the val captions is the score (a model that ignores the text
  scores at chance, as it does with the caption dropped).
audio: the paper's metrics, computed as Stability-AI's stable-audio-metrics computes them (the
  README lists where we differ).
  FD_openl3: Frechet distance between Gaussians fitted to OpenL3 embeddings (music, mel256, 512-d,
  0.5 s hop) of the generated and the reference set. KL_passt: KL(generated || reference) between
  PaSST's AudioSet label distributions of each generated file and its reference (same file stem, or
  the same caption via --reference_captions). CLAP score: cosine of LAION-CLAP (music checkpoint)
  audio and caption embeddings.
stage2: how well the stage-2 diffusion model restores the full codec latent from ground-truth
  codebook-0 tokens of val clips: accuracy of codebooks 1..K-1 after re-quantizing the generated
  latent, and latent MSE, against the codebook-0 embedding alone (what stage 1 alone gives).
--runs: params, steps, tokens, FLOPs, best val loss, text gain, probe accuracy and audio metrics
  (where a run has them: eval_offline.json, eval_audio.json) as a Markdown table, and val loss vs
  steps and vs FLOPs in one PNG.
"""
import bisect
import csv
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from configurator import configure
from data import AUDIO_EXTENSIONS, DataError, atomic_write, keep_freed_memory, read_split, text_rows
from model import codebook_losses, delay
from prepare import read_captions
from sample import load_run

# -----------------------------------------------------------------------------
# settings: python evaluate.py --key=value ... (configurator.py; --help lists them)
DEFAULTS = dict(
    section="offline",  # offline | audio | stage2 (--runs compares runs)
    out_dir="",  # a train.py run: offline; audio with --prompts_file
    ckpt="best",  # the run's checkpoint: best (best.pt, else the latest) | last (ckpt.pt) | a file
    ema=True,  # the run's EMA weights where it kept them (train.py ema_decay); False: raw weights
    data_dir="",  # default: where the checkpoint's training data was
    split="val",
    seed=0,
    device="cuda" if torch.cuda.is_available() else "cpu",
    out="",  # the JSON's path; default: eval_<section>.json in the run (or the generated folder)
    # offline
    batch_size=8,
    probe_seconds=5.0,  # the probe's window, and the length generated per val caption
    probe_iters=600,
    gen_per_caption=2,  # generations per val caption for the probe
    cfg_scale=3.0,  # classifier-free guidance scale of the probe's generations
    temperature=1.0,
    top_k=250,
    cuda_graph=True,  # on CUDA, replay each decoding step from a CUDA graph (MusicLM.generate)
    # audio
    generated="",  # a folder of wav files
    reference="",  # a folder of wav files
    reference_captions="",  # captions of --reference (a file prepare.py reads): KL pairs by them
    prompts_file="",  # generate first: sample.py writes out_dir/samples_eval/ from these prompts
    seconds=10.0,  # generated length with --prompts_file; the stage-2 section's crop
    weights_dir="",  # where the metrics' weights are when they cannot be downloaded
    metrics=("fd_openl3", "kl_passt", "clap"),
    # stage2
    stage2_dir="out-stage2-diffusion",
    n_clips=16,  # val clips (their first seconds)
    stage2_steps=25,
    stage2_temperatures=(1.0, 0.5, 0.0),
    # comparison
    runs=(),  # --runs DIR DIR ...: compare these runs (a table; loss curves in --out, compare.png)
)
# -----------------------------------------------------------------------------


def save_json(result, path):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    print(f"\nwrote {path}")


def load_section_run(s, run_dir, kind, setting):
    """sample.load_run (the checkpoint and weights s.ckpt and s.ema say) on s.device -> (model,
    checkpoint, its dataset's folder); a run that cannot be read exits naming the setting."""
    try:
        model, checkpoint = load_run(run_dir, kind, s.ckpt, s.ema)
    except ValueError as e:
        sys.exit(f"evaluate.py: {e}; set --{setting}")
    return model.to(s.device), checkpoint, data_root(checkpoint, s.data_dir)


def data_root(checkpoint, data_dir=""):
    """The folder of the run's dataset: under data_dir where given, else where it was."""
    config = checkpoint["config"]
    return os.path.join(data_dir or config["data_dir"], config["dataset"])


# -----------------------------------------------------------------------------
# offline: val NLL per codebook and text gain


@torch.no_grad()
def val_nll(model, d, L, batch_size, device, first=None):
    """-> (nll (K,), nll without the caption (K,)) in nats per token over every frame of the split's
    clips (d: read_split's), cut into windows of L frames (the training crop) and scored as train.py
    scores a crop; with `first`, over the first `first` positions of each window only (where the
    model has heard little of the audio yet)."""
    K, V = model.config.n_codebooks, model.config.codebook_size
    windows = [(i, o + s, min(L, n - s))  # (clip, first frame, frames)
               for i, (o, n) in enumerate(d["clips"][:, :2].tolist()) for s in range(0, n, L)]
    sums, count = torch.zeros(2, K), torch.zeros(K)
    for b in tqdm(range(0, len(windows), batch_size), desc="val NLL", leave=False):
        w = windows[b:b + batch_size]
        crops = torch.full((len(w), K, L), V, dtype=torch.long)  # V, the special token, pads
        for j, (_, start, n) in enumerate(w):
            crops[j, :, :n] = torch.from_numpy(d["codes"][:K, start:start + n].astype(np.int64))
        seq = delay(crops, V).to(device)  # (B, K, L + K)
        text, mask = (t.to(device) for t in text_rows(d, [i for i, _, _ in w]))
        S = L + K - 1 if first is None else min(first, L + K - 1)  # positions scored
        targets = seq[:, :, 1:S + 1]
        n = (targets != V).sum((0, 2)).cpu()  # real targets per codebook
        for j, m in enumerate((mask, torch.zeros_like(mask))):
            logits, _ = model(seq[:, :, :S], text, m)  # (B, K, S, V)
            sums[j] += codebook_losses(logits, targets).cpu() * n  # the mean per codebook -> sum
        count += n
    nll = sums / count.clamp(min=1)
    return nll[0], nll[1]


# -----------------------------------------------------------------------------
# offline: the text-adherence probe


class Probe(nn.Module):
    """Each caption attribute from a window of codebook-0 tokens (B, T): a token embedding (with
    dropout: the train split has few songs), two strided convolutions, mean and max pooling over
    time, one linear head per attribute."""

    def __init__(self, codebook_size, n_classes, width=64):
        super().__init__()
        self.embed = nn.Embedding(codebook_size, width)
        self.drop = nn.Dropout(0.3)
        self.convs = nn.Sequential(nn.Conv1d(width, width, 5, stride=2, padding=2), nn.GELU(),
                                   nn.Conv1d(width, width, 5, stride=2, padding=2), nn.GELU())
        self.heads = nn.ModuleList(nn.Linear(2 * width, n) for n in n_classes)

    def forward(self, tokens):  # (B, T) -> [(B, n_classes)] per attribute
        h = self.convs(self.drop(self.embed(tokens)).transpose(1, 2))  # (B, width, T / 4)
        h = torch.cat([h.mean(-1), h.amax(-1)], dim=-1)  # (B, 2 width)
        return [head(h) for head in self.heads]


def read_attributes(root, split_name):
    """-> [attributes dict per clip] from prepare.py's captions file ({} where a clip has none)."""
    path = os.path.join(root, f"{split_name}_captions.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line).get("attributes") or {} for line in f if line.strip()]


def attribute_classes(train_attrs):
    """-> {attribute: classes}: the values seen in training, sorted; a numeric attribute (BPM)
    becomes three bins of equal size, named by their lower edges ('>=70', '>=100', '>=130')."""
    classes = {}
    for name in sorted({k for a in train_attrs for k in a}):
        values = [a[name] for a in train_attrs if name in a]
        if all(isinstance(v, (int, float)) for v in values):
            edges = sorted(set(np.quantile(values, [0, 1 / 3, 2 / 3], method="lower").tolist()))
            classes[name] = [f">={e:g}" for e in edges]
        else:
            classes[name] = sorted(set(map(str, values)))
    return classes


def label(classes, attrs):
    """-> [class index per attribute], -1 where the clip lacks it or has a value training never
    saw."""
    out = []
    for name, names in classes.items():
        v = attrs.get(name)
        if v is None:
            out.append(-1)
        elif names[0].startswith(">="):
            out.append(max(0, bisect.bisect_right([float(c[2:]) for c in names], float(v)) - 1))
        else:
            out.append(names.index(str(v)) if str(v) in names else -1)
    return out


def probe_accuracy(probe, windows, labels):
    """windows (n, T) tokens, labels (n, attributes) -> accuracy per attribute where labelled."""
    probe.eval()
    with torch.no_grad():
        logits = [torch.cat(x) for x in zip(*(probe(w) for w in windows.split(256)))]
    hits = [(lg.argmax(-1) == labels[:, a]).float()[labels[:, a] >= 0]  # the labelled windows
            for a, lg in enumerate(logits)]
    # None: no window has a value training saw
    return [h.mean().item() if len(h) else None for h in hits]


def clip_windows(d, attrs, classes, frames, per_clip=4):
    """Evenly spaced windows of codebook-0 tokens from each clip long enough
    -> (windows (n, frames), labels (n, attributes))."""
    windows, labels = [], []
    for (o, n), a in zip(d["clips"][:, :2].tolist(), attrs):
        if n < frames:
            continue
        for s in np.linspace(0, n - frames, per_clip).astype(int):
            windows.append(torch.from_numpy(d["codes"][0, o + s:o + s + frames].astype(np.int64)))
            labels.append(label(classes, a))
    return torch.stack(windows), torch.tensor(labels)


def train_probe(root, meta, frames, iters, shuffle=False, seed=0):
    """Train the probe on random windows of the train split -> (probe, classes, accuracy on real val
    windows, chance per attribute: 1 / classes). shuffle=True pairs each train clip with another
    clip's attributes (a control: the probe should then score at chance)."""
    train_attrs = read_attributes(root, "train")
    classes = attribute_classes(train_attrs)
    if not classes:
        return None, {}, [], []
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the weights' initialization and dropout
    d = read_split(root, "train", meta)
    if shuffle:
        order = torch.randperm(len(train_attrs), generator=gen).tolist()
        train_attrs = [train_attrs[i] for i in order]
    long_enough = [i for i, (_, n) in enumerate(d["clips"][:, :2].tolist()) if n >= frames]
    if not long_enough:
        raise DataError(f"no train clip in {root} holds {frames} frames; lower --probe_seconds")
    labels = torch.tensor([label(classes, a) for a in train_attrs])  # (clips, attributes)
    probe = Probe(meta["codec"]["codebook_size"], [len(c) for c in classes.values()])
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=0.05)
    for _ in tqdm(range(iters), desc="probe", leave=False):
        drawn = torch.randint(len(long_enough), (32,), generator=gen).tolist()
        pick = [long_enough[i] for i in drawn]
        starts = [o + int(torch.randint(n - frames + 1, (1,), generator=gen))
                  for o, n in d["clips"][pick, :2].tolist()]
        x = torch.stack([torch.from_numpy(d["codes"][0, s:s + frames].astype(np.int64))
                         for s in starts])  # (32, frames)
        y = labels[pick]  # (32, attributes)
        loss = sum(F.cross_entropy(lg, y[:, a], ignore_index=-1) for a, lg in enumerate(probe(x)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    val_attrs = read_attributes(root, "val")
    windows, val_labels = clip_windows(read_split(root, "val", meta), val_attrs, classes, frames)
    # chance: guessing uniformly (the synth set draws its attributes so)
    chance = [1 / len(c) for c in classes.values()]
    return probe, classes, probe_accuracy(probe, windows, val_labels), chance


def cached_probe(root, meta, frames, iters, seed):
    """train_probe's (probe, classes, ceiling, chance) for this dataset and window, trained once and
    kept at <data>/probe_<frames>.pt (trained again if the file was written with other iters or
    seed, or by an older Probe)."""
    path = os.path.join(root, f"probe_{frames}.pt")
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        probe = Probe(meta["codec"]["codebook_size"], [len(c) for c in saved["classes"].values()])
        try:
            probe.load_state_dict(saved["state"])
            same = saved.get("iters") == iters and saved.get("seed") == seed
        except RuntimeError:  # another Probe's weights
            same = False
        if same:
            return probe, saved["classes"], saved["ceiling"], saved["chance"]
    probe, classes, ceiling, chance = train_probe(root, meta, frames, iters, seed=seed)
    if probe is not None:
        saved = dict(state=probe.state_dict(), classes=classes, ceiling=ceiling, chance=chance,
                     iters=iters, seed=seed)
        atomic_write(path, lambda tmp: torch.save(saved, tmp))
    return probe, classes, ceiling, chance


@torch.no_grad()
def generated_windows(model, d, frames, with_text, s):
    """s.gen_per_caption generations of `frames` frames from each clip's caption of d (or with it
    dropped) -> codebook-0 tokens (n, frames), ordered clip by clip. s: the settings (batch_size,
    device, seed, and cfg_scale, temperature, top_k, cuda_graph for sampling)."""
    idx = [i for i in range(len(d["clips"])) for _ in range(s.gen_per_caption)]
    tokens = []
    gen = torch.Generator(s.device).manual_seed(s.seed)
    desc = f"generate ({'caption' if with_text else 'no caption'})"
    for b in tqdm(range(0, len(idx), s.batch_size), desc=desc, leave=False):
        text, mask = (t.to(s.device) for t in text_rows(d, idx[b:b + s.batch_size]))
        codes = model.generate(text, mask if with_text else torch.zeros_like(mask), frames,
                               cfg_scale=s.cfg_scale if with_text else 1.0,
                               temperature=s.temperature, top_k=s.top_k, generator=gen,
                               cuda_graph=s.cuda_graph)  # (B, K, frames)
        tokens.append(codes[:, 0].cpu())
    return torch.cat(tokens)


def evaluate_offline(s):
    """The offline section for the run s.out_dir -> its result: val NLL, text gain, the probe's."""
    model, checkpoint, root = load_section_run(s, s.out_dir, "lm", "out_dir")
    meta = checkpoint["data_meta"]
    d = read_split(root, s.split, meta)
    L = checkpoint["config"]["seq_len"]
    nll, nll_notext = val_nll(model, d, L, s.batch_size, s.device)  # (K,) each
    second = round(meta["codec"]["frame_rate"])
    first, first_notext = val_nll(model, d, L, s.batch_size, s.device, first=second)
    result = dict(section="offline", checkpoint=checkpoint["path"], iter_num=checkpoint["iter_num"],
                  split=s.split, nll=nll.mean().item(), nll_notext=nll_notext.mean().item(),
                  text_gain=(nll_notext - nll).mean().item(),
                  nll_per_codebook=[round(x, 4) for x in nll.tolist()],
                  text_gain_per_codebook=[round(x, 4) for x in (nll_notext - nll).tolist()],
                  text_gain_first_second=(first_notext - first).mean().item())
    result.update(probe_scores(model, d, root, meta, s))
    return result


def probe_scores(model, d, root, meta, s):
    """The probe's accuracy per attribute on real val windows (the ceiling), on windows the model
    generates from the split's captions and with them dropped, and by chance -> the result's probe_*
    entries ({}, with a note, where the captions carry no attributes)."""
    frames = round(s.probe_seconds * meta["codec"]["frame_rate"])
    probe, classes, ceiling, chance = cached_probe(root, meta, frames, s.probe_iters, s.seed)
    if probe is None:
        print(f"evaluate.py: the captions in {root} carry no attributes (only the synth set's do); "
              "no probe")
        return {}
    attrs = read_attributes(root, s.split)
    labels = torch.tensor([label(classes, a) for a in attrs])  # (clips, attributes)
    labels = labels.repeat_interleave(s.gen_per_caption, 0)  # one row per generation
    rows = {}
    for with_text in (True, False):
        acc = probe_accuracy(probe, generated_windows(model, d, frames, with_text, s), labels)
        rows["generated" if with_text else "generated_no_caption"] = acc
    accuracies = dict(ceiling=ceiling, chance=chance, **rows)
    return dict(probe_attributes=list(classes), probe_ceiling=ceiling, probe_chance=chance,
                probe_cfg_scale=s.cfg_scale, probe_generated=rows["generated"],
                probe_generated_no_caption=rows["generated_no_caption"],
                **{f"probe_{k}_mean": mean(v) for k, v in accuracies.items()})


def mean(values):
    """The mean over the attributes that have a value (the probe's means skip those it could not
    score)."""
    return float(np.mean([v for v in values if v is not None]))


def print_offline(r):
    print(f"## offline metrics, {r['checkpoint']} (iter {r['iter_num']}), {r['split']} split\n")
    print(f"NLL {r['nll']:.4f} nats/token, without the caption {r['nll_notext']:.4f}, "
          f"text gain {r['text_gain']:+.4f} "
          f"({r['text_gain_first_second']:+.4f} over the first second of each window)")
    print(f"per codebook: NLL {r['nll_per_codebook']}, text gain {r['text_gain_per_codebook']}\n")
    if "probe_attributes" in r:
        print("| probe accuracy | mean | " + " | ".join(r["probe_attributes"]) + " |")
        print("|---|---|" + "---|" * len(r["probe_attributes"]))
        for name in ("ceiling", "generated", "generated_no_caption", "chance"):
            row = r[f"probe_{name}"]
            cells = " | ".join("-" if x is None else f"{x:.2f}" for x in row)
            print(f"| {name.replace('_', ' ')} | {mean(row):.3f} | " + cells + " |")


# -----------------------------------------------------------------------------
# audio: FD_openl3, KL_passt, CLAP score (pretrained evaluators, optional packages)


class Unavailable(Exception):
    """A metric whose package or weights cannot be had; the message says what to install or where
    to put what."""


def weight_file(metric, name, url, weights_dir=""):
    """-> the path of a weight file: <weights_dir or torch's hub dir>/checkpoints/<name>, downloaded
    if missing. The hub dir is then pointed there, so the packages' own loaders find the file
    instead of downloading it."""
    hub = weights_dir or torch.hub.get_dir()
    path = os.path.join(hub, "checkpoints", name)
    if not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=False)
        except Exception:
            why = (f"{metric} needs {name}: cannot download {url}; fetch it elsewhere and put it "
                   f"at {path} (or in <--weights_dir>/checkpoints/)")
            raise Unavailable(why) from None
    torch.hub.set_dir(hub)
    return path


def need(metric, package, module):
    try:
        return __import__(module, fromlist=["_"])
    except Exception as e:  # not installed, or one of its imports fails (hear21passt's torchaudio)
        raise Unavailable(f"{metric} needs the {package} package (import {module}: "
                          f"{str(e).splitlines()[0][:120]}): pip install {package}") from None


# Each evaluator's builder takes (device, seed, weights_dir) -> (model, spec): spec is the rate and
# the channels its audio must have (load_audio). Unavailable where its package or weights cannot be
# had.


def openl3_model(device, seed, weights_dir):
    """-> embed(wav (2, n) at 48 kHz) -> (frames, 1024): OpenL3 (music, mel256, 512-d) every 0.5 s
    of each channel, left and right concatenated per frame, as stable-audio-metrics does for stereo
    (torchopenl3, not TF openl3; on the CPU, whatever the device)."""
    torchopenl3 = need("FD_openl3", "torchopenl3", "torchopenl3")
    name = "torchopenl3_mel256_music_512.pth.tar"
    url = f"https://github.com/torchopenl3/torchopenl3-models/raw/master/{name}"
    weight_file("FD_openl3", name, url, weights_dir)
    model = torchopenl3.core.load_audio_embedding_model("mel256", "music", 512)

    def embed(wav):
        emb, _ = torchopenl3.get_audio_embedding(wav.astype(np.float64), 48_000, model=model,
                                                 hop_size=0.5, center=True, verbose=False)
        return torch.cat(list(emb), dim=-1).cpu().numpy()  # (2, frames, 512) -> (frames, 1024)
    return embed, dict(rate=48_000, channels=2)


def passt_model(device, seed, weights_dir):
    """-> probs(wav (1, n) at 32 kHz) -> (527,): PaSST's AudioSet logits averaged over 10 s windows
    every 5 s (windows over 1.5 s zero-padded to 10 s), then softmax, as stable-audio-metrics
    does."""
    base = need("KL_passt", "hear21passt", "hear21passt.base")
    name = "passt-s-f128-p16-s10-ap.476-swa.pt"
    url = f"https://github.com/kkoutini/PaSST/releases/download/v0.0.1-audioset/{name}"
    weight_file("KL_passt", name, url, weights_dir)
    model = base.get_basic_model(mode="logits").to(device).eval()
    win, hop = 10 * 32_000, 5 * 32_000

    @torch.no_grad()
    def probs(wav):
        x = torch.from_numpy(wav[0])
        logits = []
        for s in range(0, max(hop, len(x) - hop), hop):
            w = x[s:s + win]
            if len(w) > 1.5 * 32_000:
                w = F.pad(w, (0, win - len(w)))
            logits.append(model(w[None].to(device))[0].float().cpu())
        return torch.stack(logits).mean(0).softmax(-1).numpy()
    return probs, dict(rate=32_000, channels=1)


def clap_model(device, seed, weights_dir):
    """-> (embed_audio(wav (1, n) at 48 kHz) -> (512,), embed_text([str]) -> (n, 512)): LAION-CLAP's
    music checkpoint (HTSAT-base, no fusion); audio goes through 16-bit quantization first, as CLAP
    was trained."""
    laion_clap = need("CLAP", "laion-clap", "laion_clap")
    name = "music_audioset_epoch_15_esc_90.14.pt"
    url = f"https://huggingface.co/lukewys/laion_clap/resolve/main/{name}"
    path = weight_file("CLAP", name, url, weights_dir)
    try:
        model = laion_clap.CLAP_Module(enable_fusion=False, amodel="HTSAT-base", device=device)
    except Exception as e:  # it loads roberta-base from the Hugging Face hub
        raise Unavailable("CLAP cannot build its text encoder (roberta-base from the Hugging Face "
                          f"hub): {str(e).splitlines()[0][:160]}") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
    own = model.model.state_dict()
    model.model.load_state_dict({k: v for k, v in state.items()
                                 if k in own or not k.endswith("position_ids")})
    # clips over 10 s: CLAP embeds a random 10 s crop (np.random inside laion_clap)
    torch.manual_seed(seed)
    np.random.seed(seed)

    @torch.no_grad()
    def embed_audio(wav):
        x = np.round(np.clip(wav, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32767
        emb = model.get_audio_embedding_from_data(torch.from_numpy(x).to(device), use_tensor=True)
        return emb[0].float().cpu().numpy()

    @torch.no_grad()
    def embed_text(texts):
        return model.get_text_embedding(texts, use_tensor=True).float().cpu().numpy()
    return (embed_audio, embed_text), dict(rate=48_000, channels=1)


METRIC_MODELS = dict(fd_openl3=openl3_model, kl_passt=passt_model, clap=clap_model)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^1/2). The last trace is computed
    as the sum of the square roots of the eigenvalues of the symmetric s1^1/2 sigma2 s1^1/2, which
    has the same spectrum as sigma1 sigma2: symmetric eigensolvers in float64, no complex parts to
    discard (scipy's sqrtm on the non-symmetric product is what the usual code does)."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(x, dtype=np.float64) for x in (mu1, mu2, sigma1, sigma2))
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T  # sigma1^1/2
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def kl_divergence(p, q, eps=1e-6):
    """KL(p || q) = sum p (log p - log(q + eps)) over the last axis (distributions; 0 log 0 = 0)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return (np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q + eps)), 0.0)).sum(-1)


def cosine(a, b):
    """Cosine similarity along the last axis."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(norms, 1e-8)


def load_audio(path, rate, channels):
    """A file -> float32 (channels, samples) at `rate`, peak-normalized to -1 dBFS. channels=1
    averages the channels; channels=2 keeps the first two, or repeats a mono file. ValueError for a
    file that cannot be used."""
    import soundfile as sf
    import soxr
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
    except Exception as e:
        raise ValueError(f"unreadable: {str(e).splitlines()[0][:160]}") from None
    peak = np.abs(wav).max() if wav.size else 0.0
    if not np.isfinite(wav).all() or peak < 1e-6:
        raise ValueError("empty, silent or not finite")
    if channels == 1:
        wav = wav.mean(1, keepdims=True)
    else:
        wav = np.repeat(wav, 2, 1)[:, :2] if wav.shape[1] == 1 else wav[:, :2]
    if sr != rate:
        wav = soxr.resample(wav, sr, rate)
    wav = wav / np.abs(wav).max() * 10 ** (-1 / 20)
    return np.ascontiguousarray(wav.T, dtype=np.float32)


def wav_files(folder, flag):
    """-> {stem: path} of the audio files in folder; DataError (naming --flag) if it has none."""
    files = []
    if Path(folder).is_dir():
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        raise DataError(f"--{flag}={folder} holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return {p.stem: p for p in files}


def captions_of(gen_files, reference_captions=""):
    """-> ({generated stem: caption}, {reference stem: caption}): the generated folder's index.jsonl
    (sample.py writes one) and the reference_captions file (ids matched to stems). Either may be
    empty."""
    gen, ref = {}, {}
    index = next(iter(gen_files.values())).parent / "index.jsonl"
    if index.exists():
        for line in index.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            gen[Path(row["file"]).stem] = row["prompt"]
    if reference_captions:
        rows, _ = read_captions(reference_captions)
        ref = {Path(name).stem: row["captions"][0] for row in rows for name in row["names"]}
    for stem in gen_files:
        gen.setdefault(stem, ref.get(stem))
    return {k: v for k, v in gen.items() if v}, ref


def pair_files(gen_files, ref_files, gen_captions, ref_captions):
    """Each generated file's reference: the file with the same stem, else one whose caption is its
    caption."""
    by_caption = {c: stem for stem, c in sorted(ref_captions.items()) if stem in ref_files}
    pairs = {}
    for stem in gen_files:
        ref = stem if stem in ref_files else by_caption.get(gen_captions.get(stem))
        if ref is not None:
            pairs[stem] = ref
    return pairs


def each_file(files, spec, problems, desc):
    """Yield (stem, waveform) for the files that load; what does not is added to problems, not
    fatal."""
    for stem, path in tqdm(files.items(), desc=desc, leave=False):
        try:
            yield stem, load_audio(path, spec["rate"], spec["channels"])
        except ValueError as e:
            problems[str(path)] = str(e)


def openl3_stats(embed, spec, files, problems, cache=None):
    """Mean and covariance of the OpenL3 frames of all files (frames pooled, not averaged per file);
    cached in `cache` (.npz) with the file list, reused while the list is the same."""
    names = np.array(sorted(str(p) for p in files.values()))
    if cache and os.path.exists(cache):
        saved = np.load(cache)
        if np.array_equal(saved["files"], names):
            return saved["mu"], saved["sigma"]
    frames = np.concatenate([embed(w) for _, w in each_file(files, spec, problems, "OpenL3")])
    mu, sigma = frames.mean(0), np.cov(frames, rowvar=False)
    if cache:
        def write(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, mu=mu, sigma=sigma, files=names)
        atomic_write(cache, write)
    return mu, sigma


def generate_samples(s):
    """sample.py's own code writes a file per prompt of s.prompts_file from the run s.out_dir into
    out_dir/samples_eval (replacing what is there) -> that folder."""
    import sample
    folder = os.path.join(s.out_dir, "samples_eval")
    settings = dict(sample.DEFAULTS, out_dir=s.out_dir, ckpt=s.ckpt, ema=s.ema, seed=s.seed,
                    prompts_file=s.prompts_file, samples_dir=folder, seconds=s.seconds,
                    device=s.device, overwrite=True)
    sample.run(types.SimpleNamespace(**settings))
    return folder


def evaluate_audio(s):
    """The audio section: each of s.metrics on the generated folder (written first from
    s.prompts_file where given) against s.reference -> the result; a metric that is unavailable is
    noted and skipped."""
    gen_dir = generate_samples(s) if s.prompts_file else s.generated
    if not gen_dir or not s.reference:
        sys.exit("evaluate.py: the audio section needs --generated=DIR (or --out_dir with "
                 "--prompts_file) and --reference=DIR")
    gen_files, ref_files = wav_files(gen_dir, "generated"), wav_files(s.reference, "reference")
    gen_captions, ref_captions = captions_of(gen_files, s.reference_captions)
    result = dict(section="audio", generated=gen_dir, reference=s.reference,
                  n_generated=len(gen_files), n_reference=len(ref_files),
                  unavailable={}, problems={})
    problems = result["problems"]  # {file: why it was skipped}
    for metric in s.metrics:
        if metric not in METRIC_MODELS:
            sys.exit(f"evaluate.py: unknown metric {metric!r} in --metrics; "
                     f"available: {', '.join(METRIC_MODELS)}")
        try:
            model, spec = METRIC_MODELS[metric](s.device, s.seed, s.weights_dir)
        except Unavailable as e:
            result["unavailable"][metric] = str(e)
            print(f"evaluate.py: {metric} skipped: {e}", file=sys.stderr)
            continue
        if metric == "fd_openl3":
            writable = os.access(s.reference, os.W_OK)
            cache = os.path.join(s.reference, "fd_openl3_stats.npz") if writable else None
            mu_r, sigma_r = openl3_stats(model, spec, ref_files, problems, cache)
            mu_g, sigma_g = openl3_stats(model, spec, gen_files, problems)
            result["fd_openl3"] = frechet_distance(mu_g, sigma_g, mu_r, sigma_r)
        elif metric == "kl_passt":
            pairs = pair_files(gen_files, ref_files, gen_captions, ref_captions)
            result.update(kl_passt_score(model, spec, gen_files, ref_files, pairs, problems))
        else:
            result.update(clap_score(*model, spec, gen_files, gen_captions, problems))
    for path, why in problems.items():
        print(f"evaluate.py: skipped {path}: {why}", file=sys.stderr)
    return result


def kl_passt_score(probs, spec, gen_files, ref_files, pairs, problems):
    """KL(generated || reference), as stable-audio-metrics computes it, averaged over the pairs
    {generated stem: reference stem} -> dict(kl_passt, kl_passt_pairs)."""
    refs = {r: ref_files[r] for r in set(pairs.values())}
    ref_probs = {r: probs(w) for r, w in each_file(refs, spec, problems, "PaSST reference")}
    paired = {stem: gen_files[stem] for stem in pairs}
    kls = [kl_divergence(probs(w), ref_probs[pairs[stem]])
           for stem, w in each_file(paired, spec, problems, "PaSST") if pairs[stem] in ref_probs]
    return dict(kl_passt=float(np.mean(kls)) if kls else None, kl_passt_pairs=len(kls))


def clap_score(embed_audio, embed_text, spec, gen_files, gen_captions, problems):
    """The mean cosine of each captioned generated file's CLAP embedding and its caption's
    -> dict(clap, clap_files)."""
    with_text = {stem: path for stem, path in gen_files.items() if stem in gen_captions}
    sims = [cosine(embed_audio(w), embed_text([gen_captions[stem]])[0])
            for stem, w in each_file(with_text, spec, problems, "CLAP")]
    return dict(clap=float(np.mean(sims)) if sims else None, clap_files=len(sims))


def print_audio(r):
    def cell(k):
        return f"{r[k]:.4f}" if r.get(k) is not None else "n/a"

    print(f"## audio metrics: {r['n_generated']} generated ({r['generated']}) "
          f"vs {r['n_reference']} reference ({r['reference']})\n")
    print("| generated | FD_openl3 | KL_passt | CLAP |\n|---|---|---|---|")
    print(f"| {r['generated']} | {cell('fd_openl3')} | {cell('kl_passt')} | {cell('clap')} |")


# -----------------------------------------------------------------------------
# stage 2: codebooks 1..K-1 restored from codebook 0


def val_codes(root, meta, split, seconds, n_clips):
    """The first `seconds` of up to `n_clips` clips of the split that are that long: (n, K, frames),
    all stored codebooks."""
    frames = round(seconds * meta["codec"]["frame_rate"])
    d = read_split(root, split, meta)
    picked = [(o, n) for o, n in d["clips"][:, :2].tolist() if n >= frames][:n_clips]
    if not picked:
        raise DataError(f"no {split} clip in {root} is {seconds} s long; lower --seconds")
    return torch.stack([torch.from_numpy(d["codes"][:, o:o + frames].astype(np.int64))
                        for o, _ in picked])


@torch.no_grad()
def scores(model, latent, truth):
    """Accuracy per codebook 1..K-1 after re-quantizing `latent`, and the latent MSE in units of the
    true latent's per-channel variance (1 = as far off as a guess of each channel's mean)."""
    codes = model.quantize(latent)
    acc = (codes[:, 1:] == truth[:, 1:]).float().mean((0, 2))  # (K-1,)
    true = model.latent(truth)  # (n, D, T)
    mse = (((latent - true) ** 2).mean((0, 2)) / true.var((0, 2))).mean().item()
    return dict(acc_mean=acc.mean().item(), acc_per_codebook=[round(a, 4) for a in acc.tolist()],
                latent_mse=mse)


def evaluate_stage2(s):
    """The stage-2 section for the run s.stage2_dir -> the result: a row for codebook 0 alone, then
    one per temperature in s.stage2_temperatures."""
    model, checkpoint, root = load_section_run(s, s.stage2_dir, "stage2", "stage2_dir")
    meta = checkpoint["data_meta"]
    truth = val_codes(root, meta, s.split, s.seconds, s.n_clips).to(s.device)  # (n, K, T)
    alone = model.latent(truth[:, :1])  # codebook 0's embedding: what stage 1 alone gives
    rows = [dict(method="codebook 0 only (no stage 2)", **scores(model, alone, truth))]
    for temp in s.stage2_temperatures:
        t0 = time.time()
        latent = model.sample(truth[:, 0], s.stage2_steps, temperature=temp,
                              generator=torch.Generator().manual_seed(s.seed))
        rows.append(dict(method=f"stage 2, {s.stage2_steps} steps, temperature {temp:g}",
                         **scores(model, latent, truth),
                         seconds_per_audio_second=(time.time() - t0) / (len(truth) * s.seconds)))
    return dict(section="stage2", checkpoint=checkpoint["path"], iter_num=checkpoint["iter_num"],
                split=s.split, n_clips=len(truth), seconds=s.seconds, device=s.device,
                codec_pretrained=meta["codec"]["pretrained"], rows=rows)


def print_stage2(r):
    print(f"## stage 2 on {r['n_clips']} {r['split']} clips x {r['seconds']} s "
          f"({r['checkpoint']}, iter {r['iter_num']})\n")
    print("| method | codebooks 1.. accuracy | per codebook | latent MSE | s per audio second |\n"
          "|---|---|---|---|---|")
    for row in r["rows"]:
        t = row.get("seconds_per_audio_second")
        print(f"| {row['method']} | {row['acc_mean']:.4f} | {row['acc_per_codebook']} | "
              f"{row['latent_mse']:.4f} | {'' if t is None else f'{t:.4f}'} |")


# -----------------------------------------------------------------------------
# comparison of runs
#
# A run's summary (run_summary) is one dict; a setting is the list of its runs (one per seed); a
# variant is one model design, trained at one or more settings (learning rates).


def read_log(run):
    path = os.path.join(run, "log.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


# the config keys that differ between the seeds of one setting
SEED_KEYS = ("seed", "out_dir", "init_from", "log_interval")


def run_summary(run):
    """What one run's checkpoint, log.csv and eval_*.json files say. DataError where run is not a
    train.py out_dir with val loss rows."""
    try:
        model, checkpoint = load_run(run, which="last")  # as the run stands: its config and size
    except ValueError as e:
        raise DataError(f"{e}; --runs takes train.py out_dirs") from None
    log = [r for r in read_log(run) if "val_loss" in r]
    if not log:
        raise DataError(f"{run}/log.csv has no val loss rows; --runs takes train.py out_dirs")
    evals = {}
    for name in ("offline", "audio"):
        p = os.path.join(run, f"eval_{name}.json")
        if os.path.exists(p):
            evals.update(json.load(open(p)))
    speeds = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
    return dict(run=run, config=checkpoint["config"], params=model.num_params(), log=log,
                tokens_per_s=float(np.median(speeds)) if speeds else None,
                text_gain=evals.get("text_gain", log[-1].get("text_gain")),
                text_gain_first_second=evals.get("text_gain_first_second"),
                probe=evals.get("probe_generated_mean"),
                probe_no_caption=evals.get("probe_generated_no_caption_mean"),
                probe_ceiling=evals.get("probe_ceiling_mean"),
                **{m: evals.get(m) for m in METRIC_MODELS})


def variant_names(settings):
    """A name per variant (settings without the learning rate): cond_block, plus the keys that tell
    apart variants whose cond_block is the same."""
    base = [f"{s.get('cond')}_{s.get('block')}" if s.get("model_type", "lm") == "lm" else "stage2"
            for s in settings]
    names = []
    for s, b in zip(settings, base):
        twins = [t for t, c in zip(settings, base) if c == b and t is not s]
        keys = sorted({k for t in twins for k in set(s) | set(t) if s.get(k) != t.get(k)})
        names.append(b + "".join(f" {k}={s.get(k)}" for k in keys))
    return names


def group_runs(rows):
    """Runs whose settings differ only in SEED_KEYS are seeds of one setting -> [[row, ...], ...]
    (first-seen order)."""
    groups = {}
    for r in rows:
        key = repr(sorted((k, v) for k, v in r["config"].items() if k not in SEED_KEYS))
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def group_variants(groups):
    """Settings -> {variant name: [setting, ...]}: the settings of a variant differ in the learning
    rate."""
    settings = [{k: v for k, v in g[0]["config"].items() if k not in SEED_KEYS + ("learning_rate",)}
                for g in groups]
    variants = {}
    for name, g in zip(variant_names(settings), groups):
        variants.setdefault(name, []).append(g)
    return variants


def at(row, x, budget):
    """The run's val loss at `budget` of x (iter, flops_seen or train_seconds), linear between its
    evals."""
    log = row["log"]
    return float(np.interp(budget, [p.get(x, 0.0) for p in log], [p["val_loss"] for p in log]))


def spread(values):
    """-> (mean, standard deviation over the seeds (None for one seed), n); values that are None are
    left out."""
    v = [x for x in values if x is not None]
    if not v:
        return None
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None, len(v)


def show(s, f=".4f"):
    if s is None:
        return ""
    mean, sd, _ = s
    return format(mean, f) + ("" if sd is None else " ± " + format(sd, f))


def stopped(g):
    """The last step of a setting's run that stopped before its max_iters (a diverged loss), else
    None."""
    return next((r["log"][-1]["iter"] for r in g
                 if r["log"][-1]["iter"] < r["config"]["max_iters"]), None)


def best_setting(gs):
    """A variant's settings -> the one with the lowest mean final val loss over the seeds that every
    setting has (seed 0 in a sweep: extra seeds at one rate do not decide between rates); a setting
    with a stopped run never wins."""
    shared = set.intersection(*({r["config"]["seed"] for r in g} for g in gs))

    def final(g):
        runs = [r for r in g if r["config"]["seed"] in shared] or g
        if stopped(g) is not None:
            return np.inf
        return spread([r["log"][-1]["val_loss"] for r in runs])[0]
    return min(gs, key=final)


def compare(run_dirs, out=""):
    """Group the runs' seeds; per variant, pick the learning rate with the lowest mean final val
    loss (over the seeds that every rate has, as sweep.py picks) and compare the variants there at
    equal steps, equal training FLOPs and equal training wall-clock (the least that every variant
    reached), with the text gain and the probe. Prints two Markdown tables, draws the curves with
    their spread (in out, default compare.png), returns the per-variant rows."""
    variants = group_variants(group_runs([run_summary(r) for r in run_dirs]))
    best = {name: best_setting(gs) for name, gs in variants.items()}
    print_settings(variants, best)
    budgets = {x: min(r["log"][-1].get(x, 0.0) for g in best.values() for r in g)
               for x in ("iter", "flops_seen", "train_seconds")}
    rows = [variant_row(name, g, budgets) for name, g in best.items()]
    print_comparison(rows, budgets)
    plot_curves(best, out or "compare.png")
    return rows


def variant_row(name, g, budgets):
    """A variant's row of the comparison from its best setting g (its runs): each number as spread
    gives it over the seeds, the val loss at each of the budgets {x: the least of x every variant
    reached}."""
    keys = ("text_gain", "text_gain_first_second", "probe", "probe_no_caption", "probe_ceiling",
            *METRIC_MODELS)
    return dict(variant=name, learning_rate=g[0]["config"]["learning_rate"], seeds=len(g),
                runs=[r["run"] for r in g], params=g[0]["params"],
                tokens_per_s=spread([r["tokens_per_s"] for r in g]),
                **{f"val_loss_at_{x}": spread([at(r, x, b) for r in g])
                   for x, b in budgets.items()},
                **{k: spread([r[k] for r in g]) for k in keys})


def print_settings(variants, best):
    """The table of every setting: its final val loss (mean ± sd over the seeds), which is the
    best."""
    print("Every setting: the final val loss, mean ± sd over the seeds.\n")
    print("| variant | learning rate | seeds | steps | final val loss | |")
    print("|---|---|---|---|---|---|")
    for name, gs in variants.items():
        gs = sorted(gs, key=lambda g: g[0]["config"]["learning_rate"])
        for g in gs:
            mark = ""
            if stopped(g) is not None:
                mark = f"stopped at step {stopped(g):.0f} of {g[0]['config']['max_iters']}"
            if g is best[name]:
                edge = len(gs) > 1 and g in (gs[0], gs[-1])
                mark = "best, at the edge of the grid" if edge else "best"
            final = show(spread([r["log"][-1]["val_loss"] for r in g]))
            print(f"| {name} | {g[0]['config']['learning_rate']:.3g} | {len(g)} | "
                  f"{int(g[0]['log'][-1]['iter'])} | {final} | {mark} |")


def print_comparison(rows, budgets):
    """The table of the variants at their best learning rates, at the budgets every variant
    reached."""
    print(f"\nEach variant at its best learning rate (mean ± sd over the seeds). Budgets: "
          f"{budgets['iter']:.0f} steps, {budgets['flops_seen']:.3g} training FLOPs, "
          f"{budgets['train_seconds']:.0f} s of training.\n")
    columns = {"val loss, equal steps": ("val_loss_at_iter", ".4f"),  # header: (row key, format)
               "equal FLOPs": ("val_loss_at_flops_seen", ".4f"),
               "equal wall-clock": ("val_loss_at_train_seconds", ".4f"),
               "text gain": ("text_gain", "+.4f"),
               "text gain, 1st s": ("text_gain_first_second", "+.4f"),
               "probe: generated": ("probe", ".3f"),
               "no caption": ("probe_no_caption", ".3f"),
               "ceiling": ("probe_ceiling", ".3f"),
               **{m: (m, ".3f") for m in METRIC_MODELS}}
    print("| variant | lr | seeds | params | tokens/s | " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|" + "---|" * len(columns))
    for r in rows:
        cells = " | ".join(show(r[k], f) for k, f in columns.values())
        print(f"| {r['variant']} | {r['learning_rate']:.3g} | {r['seeds']} | "
              f"{r['params'] / 1e6:.3f}M | {show(r['tokens_per_s'], ',.0f')} | " + cells + " |")


def plot_curves(best, path):
    """Val loss against steps, training FLOPs and training seconds, written to path (PNG): each
    variant's seeds at its best rate, their mean as a line and their range as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, g in best.items():
        n = min(len(r["log"]) for r in g)  # seeds of one setting evaluate at the same steps
        y = np.array([[p["val_loss"] for p in r["log"][:n]] for r in g])  # (seeds, evals)
        seeds = f"{len(g)} seed{'s' * (len(g) > 1)}"
        label = f"{name}, lr {g[0]['config']['learning_rate']:.3g} ({seeds})"
        for ax, x in zip(axes, ("iter", "flops_seen", "train_seconds")):
            xs = np.array([[p.get(x, 0.0) for p in r["log"][:n]] for r in g]).mean(0)  # (evals,)
            line, = ax.plot(xs, y.mean(0), marker=".", label=label)
            ax.fill_between(xs, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)
    for ax, label in zip(axes, ("steps", "training FLOPs", "training wall-clock (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("val loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    print(f"\nwrote {path}")


# -----------------------------------------------------------------------------


def main(argv):
    """The settings from argv (configurator.py; --runs DIR DIR ... takes the folders up to the next
    --flag) -> the section's result, or the --runs comparison's rows."""
    keep_freed_memory()
    s = types.SimpleNamespace(**configure(dict(DEFAULTS), argv, "evaluate.py", __doc__))
    try:
        return run_section(s)
    except DataError as e:
        sys.exit(f"evaluate.py: {e}")


def run_section(s):
    """The section the settings s ask for (or the --runs comparison) -> its result, also saved as
    JSON."""
    if s.runs:
        return compare(s.runs, s.out)
    sections = dict(offline=(evaluate_offline, print_offline, s.out_dir),
                    audio=(evaluate_audio, print_audio, None),
                    stage2=(evaluate_stage2, print_stage2, s.stage2_dir))
    if s.section not in sections:
        sys.exit(f"evaluate.py: unknown section {s.section!r}; available: {', '.join(sections)} "
                 f"(or --runs DIR ...)")
    if s.section == "offline" and not s.out_dir:
        sys.exit("evaluate.py: the offline section needs --out_dir=RUN (a train.py out_dir)")
    measure, report, folder = sections[s.section]
    result = measure(s)
    report(result)
    if not folder:  # audio: the run it generated from, else the generated folder
        folder = s.out_dir if s.section == "audio" and s.out_dir else result.get("generated")
    save_json(result, s.out or os.path.join(folder, f"eval_{s.section}.json"))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
