"""Data: music + captions -> EnCodec tokens + text token states on disk.

    python prepare.py                                 # the built-in synthetic set -> data/synth
    python prepare.py --audio_dir=DIR --captions=musiccaps.csv --name=musiccaps   # a caption table
    python prepare.py --manifest=egs/mine/data.jsonl  # an audiocraft manifest, NAME.json per file
    python prepare.py --audio_dir=DIR --name=mine     # captions: NAME.json or NAME.txt per file

Inputs. Audio: every wav/flac/ogg/mp3 under --audio_dir, or every "path" of an audiocraft manifest
(jsonl, may be gzipped). Captions: a table (--captions: CSV, JSON or JSONL; MusicCaps, Song
Describer, Jamendo-style), else per file NAME.json (audiocraft's metadata: its "description", or
when it has none its genre, moods, instrument, keywords, bpm and key written out as
"genre: rock. moods: calm, dreamy. bpm: 120") or NAME.txt. Rows of a table that name the same file
are several captions of it (train.py draws one per example; evaluation uses the first). Rows with
start_s/end_s (MusicCaps) name a segment: only it is cut, and it is the source
"<file>@<start>-<end>".

What it writes under data/<name>/: the files data.py lists (its docstring) and reads (read_split).

Steps: list the sources and their captions; read each source a block at a time (soundfile; mono;
resampled to 24 kHz with soxr's streaming resampler; memory bounded by --block_seconds, not by the
file), cut it into clips of --clip_seconds (the tail is kept if at least --min_seconds), encode the
clips with EnCodec, and keep the result in a work folder, one file per source, so a killed run
resumes where it stopped. Then the splits (by file, so no song is in both), the text states
(captions as the table or sidecars hold them now: fixing a caption and running again re-encodes no
audio), and the final files, each written under a temporary name and renamed.

Codec: EnCodec 24 kHz at --bandwidth kbps (6 -> 8 codebooks stored; the LM reads the first 4, the
two-stage LM the first 1). Its weights are downloaded by the encodec package or read from
--codec_ckpt. Where neither works (an offline machine), the same architecture is used untrained, its
residual codebooks set by k-means on the data's own latents: the tokens are learnable, but decoded
audio is not music. meta.json then says "pretrained": false and every later script warns.

Text: MiniLM (shipped in a wheel, works offline) or FLAN-T5-base (the paper's:
--text_encoder=flan-t5-base), token states up to --max_text_tokens (128: the paper's 30-77-word
captions take up to about 105 FLAN-T5 tokens); the captions cut at the limit are counted in the
summary line and in meta.json.
"""
import csv
import gzip
import hashlib
import itertools
import json
import os
import random
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from configurator import configure
from data import (AUDIO_EXTENSIONS, CODEBOOK_SIZE, FRAME_RATE, LAYOUT_VERSION, SAMPLE_RATE,
                  DataError, atomic_write, keep_freed_memory, load_codec, load_text_encoder,
                  n_codebooks_for)
from synth import synth_song



# -----------------------------------------------------------------------------
# settings: python prepare.py --key=value ... (configurator.py; --help lists them)
DEFAULTS = dict(
    audio_dir="",  # folder of audio files (searched recursively); empty: the built-in synthetic set
    manifest="",  # instead of audio_dir: an audiocraft manifest, data.jsonl or data.jsonl.gz
    captions="",  # CSV, JSON or JSONL of captions; empty: NAME.json or NAME.txt beside each file
    id_key="",  # caption table: the field naming the audio (empty: ytid, path or id)
    caption_key="caption",  # caption table: the field holding the caption
    start_key="start_s",  # caption table: a segment's start second (MusicCaps); empty: whole files
    end_key="end_s",  # caption table: the segment's end second
    name="",  # writes data_dir/name (empty: synth, the audio folder's or manifest folder's name)
    data_dir="data",
    clip_seconds=30.0,  # clip length (the paper: 30 s)
    min_seconds=5.0,  # a file's last clip is kept if at least this long
    val_fraction=0.1,  # fraction of source files held out
    seed=0,
    codec="encodec",  # encodec (pretrained) | untrained (its architecture, k-means codebooks)
    codec_ckpt="",  # a local EnCodec 24 kHz state dict (encodec_24khz-d7cc33bc.th)
    bandwidth=6.0,  # kbps: 1.5, 3, 6, 12 or 24; codebooks stored = bandwidth / 0.75
    text_encoder="minilm",  # minilm | flan-t5-base (the paper's)
    max_text_tokens=128,  # caption tokens kept (77 words: ~105 FLAN-T5 tokens); longer cut, counted
    synth_songs=60,  # synthetic set: number of songs
    synth_seconds=60.0,  # synthetic set: length of each song
    batch_size=0,  # clips encoded at once (0: 8 on CUDA; 1 on a CPU, where batches gain ~5%)
    block_seconds=60.0,  # audio read and resampled at once: memory is bounded by this, not the file
    device="cuda" if torch.cuda.is_available() else "cpu",
)
CHOICES = dict(codec=("encodec", "untrained"), bandwidth=(1.5, 3.0, 6.0, 12.0, 24.0),
               text_encoder=("minilm", "flan-t5-base"))
# -----------------------------------------------------------------------------


def parse_args(argv=()):
    """--key=value arguments over DEFAULTS -> the settings as a namespace, checked
    (one-line exits)."""
    args = types.SimpleNamespace(**configure(dict(DEFAULTS), list(argv), "prepare.py", __doc__,
                                             CHOICES))
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


# -----------------------------------------------------------------------------
# inputs: which audio files, which part of each, and their captions


def read_manifest(path):
    """An audiocraft manifest (data.jsonl or data.jsonl.gz: one {"path": ..., "duration": ..., ...}
    per line) -> ([(source id, file)], [(id, reason)] for lines that name no file). Relative paths
    are read from the current folder, as audiocraft reads them."""
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

    Each row: dict(id=as the table names the audio, names=the names it may match a file by (the id,
    its file name and stem), captions=[caption], segment=(start s, end s) or None). Rows naming the
    same file and segment are one row with several captions (Song Describer). Fits MusicCaps
    (ytid, caption, start_s, end_s), Song Describer (path, caption) and Jamendo-style JSON
    ({id: {path, caption}}). Empty start_key/end_key: no segments."""
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
    if not any(isinstance(r, dict) and caption_key in r and any(r.get(k) for k in keys)
               for r in table):
        raise DataError(f"--captions={path}: no row has the fields {id_key or 'ytid/path/id'} and "
                        f"{caption_key!r} (set --id_key / --caption_key); first row: "
                        f"{str(table[:1])[:200]}")
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
            bad.append((name, f"{start_key}/{end_key} are not numbers: "
                              f"{row[start_key]!r}, {row[end_key]!r}"))
            continue
        if key is None or not caption:
            bad.append((name, f"row {n} has no {'caption' if key else 'id'}"))
        elif segment and segment[0] >= segment[1]:
            bad.append((name,
                        f"segment starts at {segment[0]:g} s, not before its end {segment[1]:g} s"))
        else:
            names = {name, Path(name).name, Path(name).stem}
            # Jamendo-style: the entry's path names the file too
            if key == "_key" and row.get("path"):
                names |= {Path(row["path"]).name, Path(row["path"]).stem}
            entry = rows.setdefault((name, segment),
                                    dict(id=name, names=names, captions=[], segment=segment))
            entry["captions"].append(caption)
    return list(rows.values()), bad


# audiocraft's metadata fields
SIDECAR_FIELDS = ("genre", "moods", "instrument", "keywords", "bpm", "key")


def field_text(value):
    """A sidecar field as audiocraft writes it into a caption: a list joined with commas,
    96.0 as 96."""
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def sidecar_captions(path):
    """The captions an audio file carries beside it: NAME.json (audiocraft's metadata: its
    "description", a string or a list of them; without one, its metadata fields written out as
    audiocraft merges them into a description, "genre: rock. moods: calm, dreamy. bpm: 120"), else
    NAME.txt (one caption). Raises Skip."""
    info, txt = Path(path).with_suffix(".json"), Path(path).with_suffix(".txt")
    if info.exists():
        try:
            meta = json.loads(info.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise Skip(f"{info.name} is not JSON: {e}")
        if not isinstance(meta, dict):
            raise Skip(f"{info.name} is not a JSON object")
        description = meta.get("description")
        captions = [d.strip()
                    for d in (description if isinstance(description, list) else [description])
                    if isinstance(d, str) and d.strip()]
        if not captions:
            text = ". ".join(f"{k}: {field_text(meta[k])}" for k in SIDECAR_FIELDS
                             if meta.get(k) not in (None, "", []))
            captions = [text] if text else []
    else:
        captions = [txt.read_text(encoding="utf-8").strip()] if txt.exists() else []
    if not captions or not all(captions):
        raise Skip("no caption")
    return captions


def read_clips(path, clip_seconds, min_seconds, segment=None, block_seconds=60.0):
    """An audio file (or its segment (start s, end s)) -> its clips [(start second, float32 mono
    24 kHz waveform)]: full clips of clip_seconds, then the tail if it is at least min_seconds.
    Read, mixed down and resampled a block of block_seconds at a time (soundfile, soxr's streaming
    resampler), so memory holds one block and one clip whatever the file's length. Raises Skip
    (unreadable, too short, segment outside the file, silent)."""
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
                raise Skip(
                    f"segment {start:g}-{end:g} s is past the end of the {frames / sr:.1f} s file "
                    f"(files that hold only their segment: --start_key= --end_key=)")
            first, last = round(start * sr), min(frames, round(end * sr))
        if last - first < min_seconds * sr:
            raise Skip(
                f"too short: {(last - first) / max(sr, 1):.2f} s < --min_seconds={min_seconds}")
        f.seek(first)
        resampler = (soxr.ResampleStream(sr, SAMPLE_RATE, 1, dtype="float32")
                     if sr != SAMPLE_RATE else None)
        step, block = int(clip_seconds * SAMPLE_RATE), max(1, int(block_seconds * sr))
        pending, clip_start, peak, position = np.zeros(0, np.float32), first / sr, 0.0, first
        while position < last:
            try:
                x = f.read(min(block, last - position), dtype="float32",
                           always_2d=True).mean(axis=1)  # mono mixdown
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
    """A waveform in memory -> [(start_second, waveform)]: full clips, plus the tail if it is at
    least min_seconds."""
    n, step = len(wav), int(clip_seconds * SAMPLE_RATE)
    return [(s / SAMPLE_RATE, wav[s:s + step]) for s in range(0, n, step)
            if n - s >= min(step, min_seconds * SAMPLE_RATE)]


# -----------------------------------------------------------------------------
# encoding: an untrained codec's codebooks, clips -> tokens


def kmeans(x, k, iters, generator):
    """Plain k-means: x (n, dim) -> centroids (k, dim), starting from k random points."""
    centroids = x[torch.randint(0, len(x), (k,), generator=generator)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)  # (n,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)[:, None]
        # empty clusters stay
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


@torch.no_grad()
def kmeans_init_codebooks(model, wavs, iters=10, seed=0):
    """Set each residual codebook of an untrained codec to k-means centroids of the data's latents
    (and of the residuals left by the codebooks before it): what encodec's quantizer does on its
    first training batch."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    latents = torch.cat([encoder_latent(model, torch.from_numpy(w)[None, None].to(device))
                         for w in wavs], dim=-1)
    residual = latents[0].T.cpu()  # (frames, 128)
    for layer in model.quantizer.vq.layers[:n_codebooks_for(model.bandwidth)]:
        book = layer._codebook
        centroids = kmeans(residual, book.codebook_size, iters, g)
        book.embed.copy_(centroids)
        book.embed_avg.copy_(centroids)
        book.inited.fill_(1)
        residual = residual - centroids[torch.cdist(residual, centroids).argmin(1)]


ENCODER_CONTEXT = 960  # samples: 3 frames; the encoder's convolutions see 798 samples back
ENCODER_WINDOW = 3.0  # seconds of audio through the encoder's convolutions at once


@torch.no_grad()
def encoder_latent(model, x, window_seconds=ENCODER_WINDOW):
    """EnCodec's encoder on waveforms x (b, 1, samples) -> latents (b, 128, samples / 320): what
    model.encoder(x) gives (to float rounding), in a fraction of its working memory.

    The 24 kHz encoder is causal: convolutions (strides 2, 4, 5, 8: one frame per 320 samples) whose
    output at a frame depends on the 798 samples before it, then an LSTM and a last convolution over
    the frames. The convolutions run window by window, each window starting ENCODER_CONTEXT samples
    early (a whole number of frames) so that its first kept frame sees what it sees in one pass; the
    LSTM and the last convolution run on the whole latent, 320 times shorter than the audio."""
    layers = list(model.encoder.model)
    lstm = next(i for i, layer in enumerate(layers) if type(layer).__name__ == "SLSTM")
    convs, rest = nn.Sequential(*layers[:lstm]), nn.Sequential(*layers[lstm:])
    hop = int(model.encoder.hop_length)  # 320
    window = round(window_seconds * SAMPLE_RATE / hop) * hop
    pieces = []
    for start in range(0, x.shape[-1], window):
        first = max(0, start - ENCODER_CONTEXT)
        pieces.append(convs(x[..., first:start + window])[..., (start - first) // hop:])
    return rest(torch.cat(pieces, dim=-1))


def encode_batch_size(device):
    """Clips encoded at once by default: 8 on CUDA; 1 on a CPU, where a second clip in the batch
    adds about 280 MiB of working memory and saves about 5% of the time (README, "Data")."""
    return 8 if str(device).startswith("cuda") else 1


@torch.no_grad()
def encode_clips(model, clips, batch_size):
    """[waveform] -> [codes (n_codebooks, frames) int16]; clips of equal length are encoded
    in batches."""
    device = next(model.parameters()).device
    out = [None] * len(clips)
    by_length = {}
    for i, w in enumerate(clips):
        by_length.setdefault(len(w), []).append(i)
    for idx in by_length.values():
        for s in range(0, len(idx), batch_size):
            group = idx[s:s + batch_size]
            # (b, 1, samples)
            x = torch.from_numpy(np.stack([clips[i] for i in group]))[:, None].to(device)
            # (b, n_codebooks, frames): model.encode(x) (for 24 kHz: no segments, no
            # normalization), its encoder run a window at a time
            codes = model.quantizer.encode(encoder_latent(model, x), model.frame_rate,
                                           model.bandwidth).transpose(0, 1)
            for j, i in enumerate(group):
                out[i] = codes[j].cpu().to(torch.int16)  # < 1024
    return out


# -----------------------------------------------------------------------------
# the build: sources -> work folder (resumable) -> splits -> final files (atomic)


def list_sources(args):
    """-> ([(source id, file id, captions or None, open)], [(id, reason)] skipped before reading any
    audio). open() -> (captions, attributes, clips iterator) or raises Skip; captions is None where
    they come with the audio (synth). A file with a segment in the caption table is the source
    "<file>@<start>-<end>"."""
    if not (args.audio_dir or args.manifest):
        return [(f"synth_{i:04d}", f"synth_{i:04d}", None, lambda i=i: synth_source(i, args))
                for i in range(args.synth_songs)], []
    if args.manifest:
        files, skipped = read_manifest(args.manifest)
    else:
        files, skipped = [(str(p.relative_to(args.audio_dir)), p)
                          for p in sorted(Path(args.audio_dir).rglob("*"))
                          if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS], []
    if not files:
        raise DataError(
            f"no {'/'.join(AUDIO_EXTENSIONS)} files in "
            f"{f'--manifest={args.manifest}' if args.manifest else f'--audio_dir={args.audio_dir}'}"
        )

    def source(name, path, captions, segment=None):
        return (name + (f"@{segment[0]:g}-{segment[1]:g}" if segment else ""), name, captions,
                lambda: (captions, {}, read_clips(path, args.clip_seconds, args.min_seconds,
                                                  segment, args.block_seconds)))

    sources = []
    if not args.captions:  # the captions beside each file
        for name, path in files:
            try:
                sources.append(source(name, path, sidecar_captions(path)))
            except Skip as e:
                skipped.append((name, str(e)))
        return sources, skipped
    rows, bad = read_captions(args.captions, args.id_key, args.caption_key, args.start_key,
                              args.end_key)
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
        sources += [source(name, path, captions, segment)
                    for segment, captions in per_segment.items()]
        used.update(matched)
    skipped += bad + [(r["id"], "no audio file for this caption row")
                      for i, r in enumerate(rows) if i not in used]
    return sources, skipped


def synth_source(index, args):
    wav, caption, attributes = synth_song(index, args.synth_seconds, args.seed)
    return [caption], attributes, iter(cut_clips(wav, args.clip_seconds, args.min_seconds))


def work_folder(out, args):
    """The folder of finished sources for these settings (one file each; a killed run resumes from
    it). Settings that change the tokens get another folder (the batch and the encoder's window
    too: they change float rounding, so a few tokens); the captions, the split and the text encoder
    are not among them."""
    settings = dict(clip=args.clip_seconds, min=args.min_seconds, codec=args.codec,
                    ckpt=args.codec_ckpt or None, bw=args.bandwidth, seed=args.seed, layout=2,
                    synth=None if args.audio_dir or args.manifest else args.synth_seconds,
                    batch=args.batch_size, window=ENCODER_WINDOW)
    work = out / (
        f".work-{hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]}")
    work.mkdir(parents=True, exist_ok=True)
    return work


def data_codec(args, sources, work):
    """-> (the codec, pretrained?): the pretrained EnCodec, or the untrained one with codebooks
    fitted by k-means to the first clips of the data (fitted once, kept in the work folder as
    codec.pt)."""
    torch.manual_seed(args.seed)  # the untrained codec's weights
    codec, pretrained = load_codec(args.codec, args.codec_ckpt, args.bandwidth, args.device)
    state = work / "codec.pt"
    if not pretrained and state.exists():
        codec.load_state_dict(torch.load(state, weights_only=True))
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
            raise DataError(f"nothing usable in {args.audio_dir or args.manifest}: "
                            f"no file could be read as audio")
        kmeans_init_codebooks(codec, sample, seed=args.seed)
        atomic_write(state, lambda tmp: torch.save(codec.state_dict(), tmp))
    return codec, pretrained


def encode_source(source, listed, open_source, codec, batch_size):
    """One source -> its record: its clips' start seconds and tokens, its attributes (and, for the
    synthetic set, its captions, which come with its audio), or the reason it was skipped."""
    try:
        captions, attributes, clips = open_source()
        starts, codes = [], []
        # until a batch is empty
        for batch in iter(lambda: list(itertools.islice(clips, batch_size)), []):
            starts += [s for s, _ in batch]
            codes += encode_clips(codec, [w for _, w in batch], batch_size)
    except Skip as e:
        return dict(source=source, skipped=str(e))
    record = dict(source=source, attributes=attributes, starts=starts, codes=codes)
    # the other sources' captions are read again at every run (fixing one re-encodes nothing)
    if listed is None:
        record["captions"] = captions
    return record


def encode_sources(sources, codec, work, batch_size):
    """Encode every source not yet in the work folder, one file per source -> the records of all
    sources, with the captions as the table or sidecars hold them now."""
    def entry(source):  # the work file holding one source's record
        return work / (hashlib.sha1(source.encode()).hexdigest()[:16] + ".pt")

    for source, _, listed, open_source in tqdm(sources, desc="encoding", unit="source"):
        if not entry(source).exists():  # else finished in an earlier run
            record = encode_source(source, listed, open_source, codec, batch_size)
            atomic_write(entry(source), lambda tmp: torch.save(record, tmp))
    records = [torch.load(entry(s), weights_only=True) for s, *_ in sources]
    for r, (_, _, captions, _) in zip(records, sources):
        if captions is not None:
            r["captions"] = captions
    return records


def split_by_file(good, sources, val_fraction, seed, out):
    """{"val": records, "train": records}, split by source file: every clip of a song (all its
    segments too) lands in the same split."""
    file_of = {source: name for source, name, _, _ in sources}
    files = sorted({file_of[r["source"]] for r in good})
    if len(files) < 2:
        raise DataError(f"only one usable file ({files[0]}); a dataset needs two or more, one of "
                        f"them for val (the others were skipped: {out / 'skipped.jsonl'})")
    random.Random(seed).shuffle(files)
    n_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    in_val = set(files[:n_val])
    return {"val": [r for r in good if file_of[r["source"]] in in_val],
            "train": [r for r in good if file_of[r["source"]] not in in_val]}


def write_split(out, split, chosen, K, embed, text_dim, max_tokens, cut):
    """The files of one split (data.py lists them) from its sources' records -> its entry in
    meta.json. Appends the token count of every caption longer than max_tokens to `cut`."""
    clips = [(j, start, c) for j, r in enumerate(chosen)
             for start, c in zip(r["starts"], r["codes"])]
    lengths = np.array([c.shape[1] for _, _, c in clips], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    total = int(lengths.sum())
    # all clips of a source share them
    n_captions = np.array([len(r["captions"]) for r in chosen], dtype=np.int64)
    first_caption = np.concatenate([[0], np.cumsum(n_captions)[:-1]]).astype(np.int64)  # per source

    def write_codes(tmp):
        mm = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(K, max(total, 1)))
        for (_, _, c), o in zip(clips, offsets):
            mm[:, o:o + c.shape[1]] = c.numpy().astype(np.uint16)
        mm.flush()

    # every caption's token states end to end; their offsets and lengths -> text_index
    def write_text(tmp):
        index = []
        with open(tmp, "wb") as f:
            for states, n_tokens in embed([c for r in chosen for c in r["captions"]], max_tokens):
                index.append((f.tell() // (2 * text_dim), len(states)))
                f.write(states.tobytes())
                if n_tokens > max_tokens:
                    cut.append(n_tokens)
        atomic_write(out / f"{split}_text_index.npy",
                     lambda t: np.save(open(t, "wb"), np.array(index, np.int64)))

    atomic_write(out / f"{split}_codes.bin", write_codes)
    atomic_write(out / f"{split}_text.bin", write_text)
    source = np.array([j for j, _, _ in clips], dtype=np.int64)
    # (n_clips, 4)
    table = np.stack([offsets, lengths, first_caption[source], n_captions[source]], 1)
    atomic_write(out / f"{split}_clips.npy", lambda tmp: np.save(open(tmp, "wb"), table))
    rows = [json.dumps(dict(captions=chosen[j]["captions"], source=chosen[j]["source"],
                            start_second=s, attributes=chosen[j]["attributes"]))
            for j, s, _ in clips]
    atomic_write(out / f"{split}_captions.jsonl",
                 lambda tmp: Path(tmp).write_text("".join(x + "\n" for x in rows)))
    return dict(clips=len(clips), captions=int(n_captions.sum()), frames=total,
                hours=total / FRAME_RATE / 3600, sources=len(chosen))


def prepare(args):
    """Build data/<name> -> its meta.json dict: encode every source into the work folder, then write
    the splits, the text states, skipped.jsonl and, last, meta.json."""
    out = Path(args.data_dir) / args.name
    work = work_folder(out, args)
    sources, skipped = list_sources(args)
    codec, pretrained = data_codec(args, sources, work)
    records = encode_sources(sources, codec, work, args.batch_size)
    skipped = [dict(source=s, reason=reason) for s, reason in skipped]
    skipped += [dict(source=r["source"], reason=r["skipped"]) for r in records if "skipped" in r]
    good = [r for r in records if "skipped" not in r and r["codes"]]
    atomic_write(out / "skipped.jsonl",
                 lambda tmp: Path(tmp).write_text("".join(json.dumps(s) + "\n" for s in skipped)))
    if not good:
        raise DataError(f"nothing usable in {args.audio_dir or args.manifest or 'synth'}: all "
                        f"{len(skipped)} inputs were skipped (reasons in {out / 'skipped.jsonl'})")
    splits = split_by_file(good, sources, args.val_fraction, args.seed, out)
    embed, text_dim = load_text_encoder(args.text_encoder, args.device)
    K, cut = n_codebooks_for(args.bandwidth), []
    meta_splits = {split: write_split(out, split, chosen, K, embed, text_dim,
                                      args.max_text_tokens, cut)
                   for split, chosen in splits.items()}
    if not pretrained:  # sample.py decodes with this very codec
        atomic_write(out / "codec.pt", lambda tmp: shutil.copyfile(work / "codec.pt", tmp))
    meta = dict(layout=LAYOUT_VERSION,
                codec=dict(name="encodec_24khz", sample_rate=SAMPLE_RATE, frame_rate=FRAME_RATE,
                           codebook_size=CODEBOOK_SIZE, n_codebooks=K, bandwidth=args.bandwidth,
                           pretrained=pretrained, checkpoint=None if pretrained else "codec.pt"),
                text_encoder=dict(name=args.text_encoder, dim=text_dim,
                                  max_tokens=args.max_text_tokens, captions_cut=len(cut)),
                splits=meta_splits, clip_seconds=args.clip_seconds,
                source=args.audio_dir or args.manifest or "synth", skipped=len(skipped))
    atomic_write(out / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    print(summary(out, meta, cut))
    return meta


def summary(out, meta, cut):
    """The line prepare.py ends with: clips, hours, captions, what was skipped or cut."""
    splits, limit = meta["splits"], meta["text_encoder"]["max_tokens"]
    hours = sum(s["hours"] for s in splits.values())
    return (f"prepare.py: wrote {out}: {sum(s['clips'] for s in splits.values())} clips, "
            f"{hours:.2f} h (train {splits['train']['clips']}, val {splits['val']['clips']}), "
            f"{sum(s['captions'] for s in splits.values())} captions, skipped {meta['skipped']}"
            + (f"; {len(cut)} captions longer than --max_text_tokens={limit} were cut "
               f"(the longest: {max(cut)} tokens)" if cut else "")
            + (" -- the codec is UNTRAINED" if not meta["codec"]["pretrained"] else ""))


if __name__ == "__main__":
    keep_freed_memory()
    try:
        prepare(parse_args(sys.argv[1:]))
    except DataError as e:
        sys.exit(f"prepare.py: {e}")
