r"""Generation: a trained run and text prompts -> wav files; loading and exporting a run.

    python sample.py --out_dir=out-prefix-simba --prompt="a calm solo piano in A minor"
    python sample.py --out_dir=out-prefix-simba --prompts_file=prompts.txt --seconds=30 \
        --num_samples=2

Each prompt is embedded with the text encoder recorded in the checkpoint's data meta, the LM samples
codec tokens one frame at a time (cached, with classifier-free guidance), and the codec recorded
there decodes them. Writes <samples_dir>/<prompt-slug>_<n>.wav (16-bit PCM at the codec's rate) and
one row per file in <samples_dir>/index.jsonl. Existing files are never overwritten unless
--overwrite; each file is written under a temporary name and renamed, so Ctrl-C leaves only
complete files behind.
"""
import json
import os
import re
import sys
import time
import types
from pathlib import Path

import torch
from tqdm import tqdm

from configurator import configure
from data import (DataError, atomic_write, keep_freed_memory, load_dataset_codec, load_text_encoder,
                  pad_text)
from model import ModelConfig, MusicLM
from prepare import read_captions
from stage2 import Stage2Config, Stage2Diffusion

# -----------------------------------------------------------------------------
# settings: python sample.py --key=value ... (configurator.py; --help lists them)
DEFAULTS = dict(
    out_dir="out",  # the training run
    ckpt="best",  # which checkpoint: best (best.pt, else the latest) | last (ckpt.pt) | a file
    ema=True,  # the run's EMA weights where it kept them (train.py ema_decay); False: raw weights
    export="",  # a folder: write the checkpoint there as model.safetensors + model.json, then stop
    samples_dir="",  # default: out_dir/samples
    prompt="",
    prompts_file="",  # one prompt per line, or a CSV/JSON/JSONL caption file as prepare.py reads
    seconds=10.0,
    num_samples=1,  # files per prompt
    cfg_scale=3.0,  # classifier-free guidance scale; 1 = the conditional model alone
    temperature=1.0,
    top_k=250,
    top_p=0.0,
    seed=1337,
    batch_size=8,
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="float32",
    cuda_graph=True,  # on CUDA, replay each decoding step from a captured graph (MusicLM.generate)
    overwrite=False,
    stage2_dir="",  # two-stage: a stage-2 run (configs/stage2_diffusion.py); out_dir is stage 1
    stage2_steps=25,  # DPM-Solver++ steps
    stage2_temperature=1.0,  # scale of stage 2's starting noise (stage2.Stage2Diffusion.sample)
)
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# a trained run: which checkpoint file, loading it, exporting it


def checkpoint_file(run, which="best"):
    """Which checkpoint file a script reads. run: a train.py out_dir, or a checkpoint file (taken as
    it is). which: "best" (run/best.pt, the lowest val loss, where the run has one; else the
    latest), "last" (run/ckpt.pt, the latest) or a file's path. Raises ValueError with a one-line
    message where there is none."""
    if os.path.isfile(run):
        return run
    if which not in ("best", "last"):
        if not os.path.isfile(which):
            raise ValueError(
                f"no checkpoint file {which} (expected last, best or a checkpoint file)")
        return which
    best, last = os.path.join(run, "best.pt"), os.path.join(run, "ckpt.pt")
    path = best if which == "best" and os.path.isfile(best) else last
    if not os.path.isfile(path) and os.path.isfile(os.path.join(run, "model.json")):
        return os.path.join(run, "model.json")  # a folder that export_run wrote
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    return path


def load_run(run_dir, kind=None, which="best", ema=True):
    """A train.py run's model -> (model on the CPU, in eval mode, the checkpoint dict without the
    weights). which: the checkpoint (checkpoint_file); ema=True takes the run's exponential moving
    average of the weights where it kept one.

    The model is the LM, or the stage-2 diffusion model where the run had model_type = "stage2";
    kind ("lm" or "stage2") says which the caller needs. A missing or unreadable file, or the other
    kind of model, raises ValueError with a one-line message for the calling script to print."""
    path = checkpoint_file(run_dir, which)
    try:
        # an exported model: its settings in JSON, its weights beside them
        if path.endswith(".json"):
            from safetensors.torch import load_file
            with open(path) as f:
                ckpt = json.load(f)
            weights = load_file(os.path.join(os.path.dirname(path), "model.safetensors"))
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            ckpt["weights"] = "ema" if ema and ckpt.get("ema") is not None else "raw"
            weights = ckpt["ema"] if ckpt["weights"] == "ema" else ckpt["model"]
        # JSON has no tuples
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["model_args"].items()}
        ckpt["model_args"] = args
        stage2 = ckpt["config"].get("model_type") == "stage2"
        model = Stage2Diffusion(Stage2Config(**args)) if stage2 else MusicLM(ModelConfig(**args))
        model.load_state_dict(weights)
    except Exception as e:
        raise ValueError(
            f"cannot read the checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
    if kind is not None and kind != ("stage2" if stage2 else "lm"):
        raise ValueError(
            f"{path} holds {'a stage-2 diffusion model' if stage2 else 'a language model'}")
    ckpt["path"] = path
    for key in ("model", "ema", "optimizer"):  # the weights are in the model now
        ckpt.pop(key, None)
    return model.eval(), ckpt


def export_run(run_dir, folder, which="best", ema=True):
    """A run's model as a folder anyone can share and load without our training state:
    folder/model.safetensors (the weights: the EMA where the run kept one and ema=True) and
    folder/model.json (the model's settings, the training config and the data's meta: which codec
    and text encoder it was trained with). load_run, and so sample.py and evaluate.py, take the
    folder as they take a run. -> the folder."""
    from safetensors.torch import save_file
    model, ckpt = load_run(run_dir, None, which, ema)
    info = dict(model_args=ckpt["model_args"], config=ckpt["config"], data_meta=ckpt["data_meta"],
                iter_num=ckpt["iter_num"], best_val_loss=ckpt["best_val_loss"],
                exported_from=ckpt["path"], weights=ckpt["weights"])
    os.makedirs(folder, exist_ok=True)
    weights, settings = (os.path.join(folder, "model.safetensors"),
                         os.path.join(folder, "model.json"))
    save_file(model.state_dict(), weights + ".tmp")
    with open(settings + ".tmp", "w") as f:
        json.dump(info, f, indent=1)
    # renamed once both are whole: a kill never leaves a half-written file
    for path in (weights, settings):
        os.replace(path + ".tmp", path)
    return folder


# -----------------------------------------------------------------------------
# generation


def read_prompts(prompt, prompts_file):
    """-> [prompt]: --prompt, or every line / caption of --prompts_file."""
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            sys.exit(f"sample.py: --prompts_file={prompts_file} does not exist")
        if path.suffix.lower() in (".csv", ".json", ".jsonl"):
            try:
                rows, _ = read_captions(path)
                # each caption once
                prompts = list(dict.fromkeys(c for row in rows for c in row["captions"]))
            except DataError as e:
                sys.exit(f"sample.py: --prompts_file: {e}")
        else:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p]
        if not prompts:
            sys.exit(f"sample.py: --prompts_file={prompts_file} holds no prompts")
        return prompts
    if not prompt.strip():
        sys.exit("sample.py: empty prompt; pass --prompt=\"...\" or --prompts_file=FILE")
    return [prompt.strip()]


def slug(text, n=48):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].strip("-") or "prompt"


def write_wav(path, wav, sample_rate):
    import soundfile as sf
    atomic_write(path, lambda tmp: sf.write(tmp, wav, sample_rate, subtype="PCM_16", format="WAV"))


def main(argv):
    keep_freed_memory()
    return run(types.SimpleNamespace(**configure(dict(DEFAULTS), argv, "sample.py", __doc__)))


def run(s):
    """The settings (a namespace of DEFAULTS' keys) -> the wav files and their index rows; -> the
    settings."""
    if s.export:
        try:
            print(f"sample.py: exported {export_run(s.out_dir, s.export, s.ckpt, s.ema)}")
        except ValueError as e:
            sys.exit(f"sample.py: {e}; set --out_dir to a train.py run (and --ckpt)")
        return vars(s)
    if s.seconds <= 0:
        sys.exit(f"sample.py: --seconds={s.seconds} must be positive")
    prompts = read_prompts(s.prompt, s.prompts_file)
    try:
        model, checkpoint = load_run(s.out_dir, "lm", s.ckpt, s.ema)
    except ValueError as e:
        sys.exit(f"sample.py: {e}; set --out_dir to a train.py out_dir of a language model")
    model = model.to(s.device, getattr(torch, s.dtype))
    data_meta = checkpoint["data_meta"]
    stage2 = None
    if s.stage2_dir:
        try:
            stage2, _ = load_run(s.stage2_dir, "stage2", "best", s.ema)
        except ValueError as e:
            sys.exit(f"sample.py: {e}; "
                     "set --stage2_dir to a train.py out_dir of configs/stage2_diffusion.py")
        stage2 = stage2.to(s.device)
        if model.config.n_codebooks != 1:
            sys.exit("sample.py: --stage2_dir needs a stage-1 model of codebook 0 only "
                     f"(configs/two_stage_simba.py); {s.out_dir} writes "
                     f"{model.config.n_codebooks} codebooks")
    out = Path(s.samples_dir or os.path.join(s.out_dir, "samples"))
    jobs = [(p, n, out / f"{slug(p)}_{n}.wav") for p in prompts for n in range(s.num_samples)]
    existing = [str(path) for _, _, path in jobs if path.exists()]
    if existing and not s.overwrite:
        sys.exit(f"sample.py: {existing[0]} exists ({len(existing)} of the files would be "
                 "overwritten); pass --overwrite")
    if not data_meta["codec"]["pretrained"]:
        print("sample.py: WARNING: this model was trained on tokens of an UNTRAINED codec; "
              "the files will not sound like music", file=sys.stderr)

    embed, _ = load_text_encoder(data_meta["text_encoder"]["name"], s.device)
    trained_on = os.path.join(checkpoint["config"]["data_dir"], checkpoint["config"]["dataset"])
    try:
        codec = load_dataset_codec(data_meta["codec"], trained_on, s.device)
    except DataError as e:
        sys.exit(f"sample.py: {e}")
    out.mkdir(parents=True, exist_ok=True)
    cut = set()  # prompts longer than the model reads, reported once
    for b in range(0, len(jobs), s.batch_size):
        write_batch(s, jobs[b:b + s.batch_size], b, model, stage2, embed, codec, checkpoint, cut)
    print(f"sample.py: wrote {len(jobs)} files to {out}")
    return vars(s)


def write_batch(s, batch, b, model, stage2, embed, codec, checkpoint, cut):
    """One batch of jobs [(prompt, sample number, path)], the b-th job first: generate (stage 2
    too, with stage2), decode, write the wav files and append their rows to index.jsonl."""
    data_meta = checkpoint["data_meta"]
    sr, frame_rate = data_meta["codec"]["sample_rate"], data_meta["codec"]["frame_rate"]
    steps, max_tokens = (max(1, round(s.seconds * frame_rate)),
                         data_meta["text_encoder"]["max_tokens"])
    states = list(embed([p for p, _, _ in batch], max_tokens))
    for (p, _, _), (_, whole) in zip(batch, states):
        if whole > max_tokens and p not in cut:
            cut.add(p)
            print(f"sample.py: the prompt {p[:40]!r}... is {whole} tokens; "
                  f"the model reads its first {max_tokens}", file=sys.stderr)
    text, mask = pad_text([x for x, _ in states])
    text, mask = text.to(s.device, getattr(torch, s.dtype)), mask.to(s.device)
    batch_seed = s.seed + b
    gen = torch.Generator(s.device).manual_seed(batch_seed)
    t0 = time.time()
    codes = model.generate(text, mask, steps, cfg_scale=s.cfg_scale, temperature=s.temperature,
                           top_k=s.top_k, top_p=s.top_p, generator=gen, cuda_graph=s.cuda_graph,
                           progress=lambda r: tqdm(r, desc=f"batch {b // s.batch_size + 1}",
                                                   leave=False))
    gen_time = time.time() - t0
    t1 = time.time()
    with torch.no_grad():
        if stage2 is None:  # the codec decodes the LM's codebooks
            wavs = codec.decode([(codes, None)])
        else:  # two-stage: codebook 0 -> the full latent by diffusion -> the codec's decoder
            wavs = codec.decoder(stage2.sample(codes[:, 0], s.stage2_steps, s.stage2_temperature,
                                               generator=gen))
        wavs = wavs[:, 0, :round(s.seconds * sr)].float().cpu().numpy()  # (B, samples)
    audio_seconds = s.seconds * len(batch)
    if stage2 is not None:
        print(f"sample.py: stage 2: {s.stage2_steps} steps in {time.time() - t1:.2f} s "
              f"({(time.time() - t1) / audio_seconds:.3f} s per second of audio, "
              "decoding included)")
    print(f"sample.py: batch {b // s.batch_size + 1}: {len(batch)} x {steps} frames, "
          f"{(steps + model.config.n_codebooks - 1) / gen_time:.1f} steps/s, real-time factor "
          f"{gen_time / audio_seconds:.3f} ({gen_time:.1f} s for {audio_seconds:.1f} s of audio)")
    settings = dict(cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                    dtype=s.dtype, stage2_dir=s.stage2_dir or None,
                    stage2_steps=s.stage2_steps if s.stage2_dir else None,
                    stage2_temperature=s.stage2_temperature if s.stage2_dir else None)
    for i, ((p, n, path), wav) in enumerate(zip(batch, wavs)):
        write_wav(path, wav, sr)
        row = dict(file=path.name, prompt=p, sample=n, seed=batch_seed, row_in_batch=i,
                   seconds=len(wav) / sr, generation_seconds=gen_time / len(batch),
                   checkpoint=checkpoint["path"], iter_num=checkpoint["iter_num"],
                   codec_pretrained=data_meta["codec"]["pretrained"], **settings)
        with open(path.parent / "index.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
