"""Without a GPU, run the Triton kernels in Triton's interpreter (must be set before triton is
imported)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import data  # noqa: E402
import prepare  # noqa: E402

data.keep_freed_memory()  # as every script does first


def ssd_by_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, chunk_size=64,
               return_last_state=False):
    """scan.ssd_scan's function computed by scan.selective_scan_ref: A, dt and dt_bias repeated over
    each head's channels, (batch, L, heads, headdim) <-> (batch, dim, L)."""
    import scan
    batch, L, heads, P = x.shape

    def per_channel(t):  # (..., heads) -> (..., dim)
        return None if t is None else t.repeat_interleave(P, -1)

    def channels(t):  # (batch, L, heads, P) -> (batch, dim, L)
        return None if t is None else t.flatten(2).transpose(1, 2)

    out = scan.selective_scan_ref(channels(x), per_channel(dt).transpose(1, 2),
                                  per_channel(A)[:, None].expand(heads * P, B.shape[-1]),
                                  B.transpose(1, 2), C.transpose(1, 2), per_channel(D), channels(z),
                                  per_channel(dt_bias), dt_softplus, return_last_state=True)
    y = out[0].transpose(1, 2).unflatten(2, (heads, P))
    return (y, out[1].unflatten(1, (heads, P))) if return_last_state else y


def build_tiny_dataset(tmp, *argv):
    """A tiny synthetic dataset at tmp/tiny: 2-second songs, one clip each, the untrained codec (no
    network)."""
    prepare.prepare(prepare.parse_args([f"--data_dir={tmp}", "--name=tiny", "--synth_seconds=2",
                                        "--clip_seconds=2", "--min_seconds=1", "--codec=untrained",
                                        *argv]))
    return tmp


def run_train(data_dir, out_dir, *argv, torchrun=False):
    """train.py (under torchrun with 2 processes, if asked) on build_tiny_dataset's data -> the
    finished process."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                              if torchrun else [])
    cmd += ["train.py", *argv, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, env=env, timeout=600)
