"""Generation: a checkpoint and text prompts -> wav files.

    python sample.py --out_dir=out-prefix-simba --prompt="a calm solo piano in A minor"
    python sample.py --out_dir=out-prefix-simba --prompts_file=prompts.txt --seconds=30 --num_samples=2

Each prompt is embedded with the text encoder recorded in the checkpoint's data meta, the LM samples codec
tokens one frame at a time (cached, with classifier-free guidance), and the codec recorded there decodes them.
Writes <samples_dir>/<prompt-slug>_<n>.wav (16-bit PCM at the codec's rate) and one row per file in
<samples_dir>/index.jsonl. Existing files are never overwritten unless --overwrite; each file is written under
a temporary name and renamed, so Ctrl-C leaves only complete files behind.
"""
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configurator import configure
from model import ModelConfig, MusicLM

# -----------------------------------------------------------------------------
out_dir = "out"  # the training run: reads out_dir/ckpt.pt
samples_dir = ""  # default: out_dir/samples
prompt = ""
prompts_file = ""  # one prompt per line, or a CSV/JSON/JSONL caption file as prepare.py reads
seconds = 10.0
num_samples = 1  # files per prompt
cfg = 3.0  # classifier-free guidance scale; 1 = the conditional model alone
temperature = 1.0
top_k = 250
top_p = 0.0
seed = 1337
batch_size = 8
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "float32"
overwrite = False
stage2_dir = ""  # two-stage: a stage-2 diffusion run (not available yet)
# -----------------------------------------------------------------------------


def read_prompts(prompt, prompts_file):
    """-> [prompt]: --prompt, or every line / caption of --prompts_file."""
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            sys.exit(f"sample.py: --prompts_file={prompts_file} does not exist")
        if path.suffix.lower() in (".csv", ".json", ".jsonl"):
            import prepare
            try:
                prompts = list(dict.fromkeys(prepare.read_captions(path).values()))  # names -> caption: keep each once
            except SystemExit as e:
                sys.exit(f"sample.py: --prompts_file={prompts_file} does not parse ({str(e).split(': ', 2)[-1]})")
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


def load_model(ckpt_path, device, dtype):
    """-> (model, checkpoint without its weights)."""
    if not os.path.isfile(ckpt_path):
        sys.exit(f"sample.py: no checkpoint at {ckpt_path}; train one or set --out_dir")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model = MusicLM(ModelConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    except Exception as e:
        sys.exit(f"sample.py: cannot read the checkpoint {ckpt_path}: {str(e).splitlines()[0][:200]}")
    ckpt.pop("model")
    ckpt.pop("optimizer", None)
    return model.to(device, getattr(torch, dtype)).eval(), ckpt


def load_decoder(ckpt, device):
    """The codec the training data was encoded with: pretrained EnCodec, or the untrained one saved with the data."""
    import prepare
    meta, config = ckpt["data_meta"]["codec"], ckpt["config"]
    if meta["pretrained"]:
        codec, pretrained = prepare.load_codec("encodec", None, meta["bandwidth"], device)
        if not pretrained:
            sys.exit("sample.py: the model was trained on pretrained EnCodec tokens, whose weights cannot be loaded here")
        return codec
    path = os.path.join(config["data_dir"], config["dataset"], meta["checkpoint"])
    if not os.path.isfile(path):
        sys.exit(f"sample.py: the untrained codec of the training data is missing: {path}")
    codec, _ = prepare.load_codec("untrained", None, meta["bandwidth"], device)  # repeats the warning
    codec.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return codec.to(device).eval()


def write_wav(path, wav, sample_rate):
    import soundfile as sf
    tmp = f"{path}.tmp.wav"
    sf.write(tmp, wav, sample_rate, subtype="PCM_16")
    os.replace(tmp, path)


def main(argv):
    config = configure(globals(), argv, "sample.py")
    if seconds <= 0:
        sys.exit(f"sample.py: --seconds={seconds} must be positive")
    if stage2_dir:
        sys.exit("sample.py: --stage2_dir: the two-stage diffusion model is not implemented yet (issue 7)")
    prompts = read_prompts(prompt, prompts_file)
    model, ckpt = load_model(os.path.join(out_dir, "ckpt.pt"), device, dtype)
    data_meta = ckpt["data_meta"]
    sr, frame_rate = data_meta["codec"]["sample_rate"], data_meta["codec"]["frame_rate"]
    steps = max(1, round(seconds * frame_rate))
    out = Path(samples_dir or os.path.join(out_dir, "samples"))
    jobs = [(p, n, out / f"{slug(p)}_{n}.wav") for p in prompts for n in range(num_samples)]
    existing = [str(path) for _, _, path in jobs if path.exists()]
    if existing and not overwrite:
        sys.exit(f"sample.py: {existing[0]} exists ({len(existing)} of the files would be overwritten); pass --overwrite")
    if not data_meta["codec"]["pretrained"]:
        print("sample.py: WARNING: this model was trained on tokens of an UNTRAINED codec; the files will not sound "
              "like music", file=sys.stderr)

    import prepare
    embed, _ = prepare.load_text_encoder(data_meta["text_encoder"]["name"], device)
    codec = load_decoder(ckpt, device)
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p, dtype=dtype)
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b:b + batch_size]
        text, lengths = embed([p for p, _, _ in batch], data_meta["text_encoder"]["max_tokens"])
        text = torch.from_numpy(text.astype(np.float32)).to(device, getattr(torch, dtype))
        mask = torch.arange(text.shape[1], device=device)[None] < torch.from_numpy(lengths).to(device)[:, None]
        batch_seed = seed + b
        gen = torch.Generator(device).manual_seed(batch_seed)
        t0 = time.time()
        codes = model.generate(text, mask, steps, cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=gen, progress=lambda r: tqdm(r, desc=f"batch {b // batch_size + 1}", leave=False))
        gen_time = time.time() - t0
        with torch.no_grad():
            wavs = codec.decode([(codes, None)])[:, 0, :round(seconds * sr)].float().cpu().numpy()  # (B, samples)
        print(f"sample.py: batch {b // batch_size + 1}: {len(batch)} x {steps} frames, "
              f"{(steps + model.config.n_codebooks - 1) / gen_time:.1f} steps/s, real-time factor "
              f"{gen_time / (seconds * len(batch)):.3f} ({gen_time:.1f} s for {seconds * len(batch):.1f} s of audio)")
        for i, ((p, n, path), wav) in enumerate(zip(batch, wavs)):
            write_wav(path, wav, sr)
            row = dict(file=path.name, prompt=p, sample=n, seed=batch_seed, row_in_batch=i,
                       seconds=len(wav) / sr, generation_seconds=gen_time / len(batch), checkpoint=os.path.join(out_dir, "ckpt.pt"),
                       iter_num=ckpt["iter_num"], codec_pretrained=data_meta["codec"]["pretrained"], **settings)
            with open(out / "index.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"sample.py: wrote {len(jobs)} files to {out}")
    return config


if __name__ == "__main__":
    main(sys.argv[1:])
