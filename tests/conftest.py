"""Without a GPU, run the Triton kernels in Triton's interpreter (must be set before triton is imported)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def build_tiny_dataset(tmp, *argv):
    """A tiny synthetic dataset at tmp/tiny: 2-second songs, one clip each, the untrained codec (no network)."""
    import prepare
    prepare.prepare(prepare.parse_args([f"--data_dir={tmp}", "--name=tiny", "--synth_seconds=2", "--clip_seconds=2",
                                        "--min_seconds=1", "--codec=untrained", *argv]))
    return tmp


def run_train(data_dir, out_dir, *argv, torchrun=False):
    """train.py (under torchrun with 2 processes, if asked) on build_tiny_dataset's data -> the finished process."""
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [])
    cmd += ["train.py", *argv, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, env=env,
                          timeout=600)
