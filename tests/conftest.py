"""Without a GPU, run the Triton kernels in Triton's interpreter (must be set before triton is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def build_tiny_dataset(tmp, *argv):
    """A tiny synthetic dataset at tmp/tiny: 2-second songs, one clip each, the untrained codec (no network)."""
    import prepare
    prepare.prepare(prepare.parse_args([f"--data_dir={tmp}", "--name=tiny", "--synth_seconds=2", "--clip_seconds=2",
                                        "--min_seconds=1", "--codec=untrained", *argv]))
    return tmp
