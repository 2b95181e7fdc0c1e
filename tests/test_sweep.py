"""sweep.py, smoke-sized: two variants, a grid of two rates that grows by one, two seeds, the
offline evaluation of the best-rate runs and the grouped comparison, two runs at a time; a second
call does nothing new; an interrupted run is resumed."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import build_tiny_dataset

ROOT = Path(__file__).resolve().parent.parent


TRAIN = ("--dataset=tiny", "--seq_len=48", "--batch_size=4", "--eval_iters=1", "--warmup_iters=2",
         "--max_iters=4", "--lr_decay_iters=4", "--eval_interval=2", "--log_interval=1000")


def sweep(data_dir, out_root):
    cmd = [sys.executable, "sweep.py", "--variants=('prefix_simba', 'prefix_transformer')",
           "--learning_rates=(1e-3, 1e-2)", "--max_widen=1", "--seeds=2", "--jobs=2",
           f"--out_root={out_root}",
           f"--train_args={(f'--data_dir={data_dir}', *TRAIN)!r}",
           "--eval_args=('--probe_seconds=1.0', '--probe_iters=10', '--gen_per_caption=1')"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def final_val_loss(run):
    return float(list(csv.DictReader(open(run / "log.csv")))[-1]["val_loss"])


def test_sweep_smoke(tmp_path):
    build_tiny_dataset(tmp_path, "--synth_songs=6", "--max_text_tokens=8", "--val_fraction=0.34")
    out_root = tmp_path / "sweep"
    printed = sweep(tmp_path, out_root)
    runs = sorted(p.name for p in out_root.iterdir() if p.is_dir())
    for variant in ("prefix_simba", "prefix_transformer"):
        grid = [name for name in runs if name.startswith(variant + "-") and name.endswith("-s0")]
        assert len(grid) == 3  # two rates; the best of two is at an edge, so a third on its side
        [best] = [name[:-3] for name in runs
                  if name.startswith(variant + "-") and name.endswith("-s1")]
        assert f"{variant}: best learning rate {best.split('-lr')[1]}" in printed
        for seed in (0, 1):
            run = out_root / f"{best}-s{seed}"
            assert torch.load(run / "ckpt.pt", weights_only=True)["iter_num"] == 4
            assert (run / "eval_offline.json").exists()
    table = (out_root / "compare.md").read_text()
    assert table.count(" | 2 | ") == 4  # each variant's best setting has two seeds, in both tables
    assert " ± " in table and (out_root / "compare.png").stat().st_size > 10_000

    # a run stopped after step 2 of 4 (its checkpoint made so: the first 2 steps of the same run,
    # with the same learning-rate schedule) is resumed and ends where the uninterrupted run ended;
    # nothing else runs again
    stamps = {p: p.stat().st_mtime_ns for p in out_root.glob("*/ckpt.pt")}
    cut = out_root / f"{best}-s1"
    expected = final_val_loss(cut)
    lr = torch.load(cut / "ckpt.pt", weights_only=True)["config"]["learning_rate"]
    shutil.rmtree(cut)
    threads = str(max(1, (os.cpu_count() or 1) // 2))  # what sweep.py --jobs=2 gives a run
    r = subprocess.run([sys.executable, "train.py", "configs/prefix_transformer.py",
                        "configs/tiny.py", f"--data_dir={tmp_path}", *TRAIN, "--max_iters=2",
                        f"--learning_rate={lr}", "--seed=1", f"--out_dir={cut}"],
                       cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS=threads))
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(cut / "ckpt.pt", weights_only=True)
    ckpt["config"]["max_iters"] = 4
    torch.save(ckpt, cut / "ckpt.pt")
    sweep(tmp_path, out_root)
    assert [row["iter"] for row in csv.DictReader(open(cut / "log.csv"))] == ["0", "2", "4"]
    assert final_val_loss(cut) == expected
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.parent != cut)
