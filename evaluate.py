"""Measurement: numbers about trained models, printed as a table and saved as JSON.

    python evaluate.py --section=stage2 --stage2_dir=out-stage2-diffusion

stage2: how well the stage-2 diffusion model restores the full codec latent from codebook-0 tokens, with no
pretrained evaluator. For val clips, the ground-truth codebook-0 tokens go in; the generated latent is
quantized back with the codec's codebooks and compared with the truth: accuracy of codebooks 1..K-1 and the
latent's mean squared error (relative to each channel's variance). The baseline is what stage 1 alone gives:
the codebook-0 embedding with nothing added (no diffusion).
"""
import json
import os
import sys
import time

import numpy as np
import torch

from configurator import configure
from model import Stage2Diffusion, from_checkpoint
from prepare import read_split

# -----------------------------------------------------------------------------
section = "stage2"
stage2_dir = "out-stage2-diffusion"
data_dir = ""  # default: where the checkpoint's training data was
split = "val"
clips = 16  # val clips to evaluate (their first seconds)
seconds = 5.0
stage2_steps = 25
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
out = ""  # default: <stage2_dir>/eval_stage2.json
# -----------------------------------------------------------------------------


def load_stage2(path):
    if not os.path.isfile(path):
        sys.exit(f"evaluate.py: no stage-2 checkpoint at {path}; set --stage2_dir")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = from_checkpoint(ckpt)
    if not isinstance(model, Stage2Diffusion):
        sys.exit(f"evaluate.py: {path} holds a language model, not a stage-2 diffusion model; set --stage2_dir")
    return model.to(device).eval(), ckpt


def val_codes(ckpt, frames):
    """The first `frames` frames of up to `clips` val clips: (n, K, frames), all stored codebooks."""
    config = ckpt["config"]
    root = os.path.join(data_dir or config["data_dir"], config["dataset"])
    d = read_split(root, split, ckpt["data_meta"])
    codes = d["codes"]
    picked = [(o, n) for o, n in d["clips"] if n >= frames][:clips]
    if not picked:
        sys.exit(f"evaluate.py: no {split} clip in {root} is {seconds} s long; lower --seconds")
    return torch.stack([torch.from_numpy(codes[:, o:o + frames].astype(np.int64)) for o, _ in picked])


@torch.no_grad()
def scores(model, latent, truth):
    """Accuracy per codebook 1..K-1 after re-quantizing `latent`, and the latent MSE in units of the true
    latent's per-channel variance (1 = as far off as a guess of each channel's mean)."""
    codes = model.quantize(latent)
    acc = (codes[:, 1:] == truth[:, 1:]).float().mean((0, 2))  # (K-1,)
    true = model.latent(truth)  # (n, D, T)
    mse = (((latent - true) ** 2).mean((0, 2)) / true.var((0, 2))).mean().item()
    return dict(acc_mean=acc.mean().item(), acc_per_codebook=[round(a, 4) for a in acc.tolist()], latent_mse=mse)


def evaluate_stage2():
    model, ckpt = load_stage2(os.path.join(stage2_dir, "ckpt.pt"))
    frame_rate = ckpt["data_meta"]["codec"]["frame_rate"]
    truth = val_codes(ckpt, round(seconds * frame_rate)).to(device)  # (n, K, T)
    t0 = time.time()
    generated = model.sample(truth[:, 0], stage2_steps, generator=torch.Generator().manual_seed(seed))
    sample_time = time.time() - t0
    coarse = model.latent(truth[:, :1])  # stage 1 alone: the codebook-0 embedding
    rows = [dict(method="codebook 0 only (no stage 2)", **scores(model, coarse, truth)),
            dict(method=f"stage 2, {stage2_steps} steps", **scores(model, generated, truth),
                 seconds_per_audio_second=sample_time / (len(truth) * seconds))]
    return dict(section="stage2", checkpoint=os.path.join(stage2_dir, "ckpt.pt"), iter_num=ckpt["iter_num"],
                split=split, clips=len(truth), seconds=seconds, device=device,
                codec_pretrained=ckpt["data_meta"]["codec"]["pretrained"], rows=rows)


def main(argv):
    configure(globals(), argv, "evaluate.py")
    if section != "stage2":
        sys.exit(f"evaluate.py: unknown section {section!r}; available: stage2")
    result = evaluate_stage2()
    print(f"## stage 2 on {result['clips']} {split} clips x {seconds} s ({result['checkpoint']}, iter {result['iter_num']})\n")
    print("| method | codebooks 1.. accuracy | per codebook | latent MSE | s per audio second |")
    print("|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['method']} | {r['acc_mean']:.4f} | {r['acc_per_codebook']} | {r['latent_mse']:.4f} | "
              f"{r.get('seconds_per_audio_second', ''):{'.4f' if 'seconds_per_audio_second' in r else ''}} |")
    path = out or os.path.join(stage2_dir, "eval_stage2.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
