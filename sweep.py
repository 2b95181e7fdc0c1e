"""The SSM-vs-Transformer comparison, rerun with one command:

    python sweep.py  # the five paper variants, tiny, on data/synth (CPU: hours)
    python sweep.py --variants="('prefix_simba', 'prefix_transformer')" --seeds=5

Every run is `train.py configs/<variant>.py configs/tiny.py --learning_rate=<lr> --seed=<s>`: the
same data, steps, batch and schedule for every variant; only the variant, the learning rate and the
seed change.
1. Each variant trains at every rate of `learning_rates` (seed 0). Where its best final val loss
   sits at the edge of the grid, the grid grows by one rate on that side (`lr_step` apart), up to
   `max_widen` times.
2. Each variant's best rate trains again with seeds 1 .. seeds-1. Where one of them stops early (its
   loss diverged), that rate is dropped and the next-best one gets the seeds instead.
3. evaluate.py's offline section (val NLL, text gain, the text-adherence probe) on every run at a
   best rate.
4. `evaluate.py --runs` on all runs: the seeds of a setting grouped, each variant at its best rate
   compared at equal steps, FLOPs and wall-clock, in out_root/compare.md and out_root/compare.png.

Runs land in out_root/<variant>-lr<lr>-s<seed>/. A finished run is skipped and an interrupted one
resumed (train.py --init_from=resume), so the sweep can be stopped and started again at any time.
"""
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from bench import commit, machine
from configurator import configure
from data import atomic_write

# -----------------------------------------------------------------------------
variants = ("prefix_simba", "prefix_mamba", "cross_simba", "prefix_transformer",
            "cross_transformer")
learning_rates = (2e-3, 5e-3, 1.25e-2)  # the starting grid
lr_step = 2.5  # the ratio between neighbouring rates when the grid grows
max_widen = 2  # at most this many rates added per variant
seeds = 3  # runs at each variant's best rate (seed 0 is the grid's run)
out_root = "out-sweep"
train_args = ("--eval_interval=50",)  # train.py flags after every run's configs (finer val curves)
eval_args = ()  # more evaluate.py flags for the offline section
jobs = 1  # runs at once; the CPU threads are shared out among them
# -----------------------------------------------------------------------------


def run_dir(variant, lr, seed):
    return os.path.join(out_root, f"{variant}-lr{lr:.3g}-s{seed}")


def finished(path):
    """-> True when the run's checkpoint has reached its max_iters."""
    ckpt_path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        return False
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    return ckpt["iter_num"] >= ckpt["config"]["max_iters"]


def final_val_loss(path):
    """The val loss in the last row of the run's log.csv (inf for a run that failed or diverged)."""
    try:
        with open(os.path.join(path, "log.csv")) as f:
            header, *rows = [line.rstrip("\n").split(",") for line in f]
        return float(rows[-1][header.index("val_loss")]) if finished(path) else float("inf")
    except (OSError, ValueError, IndexError):
        return float("inf")


def subprocess_env():
    threads = max(1, (os.cpu_count() or 1) // jobs)
    return dict(os.environ, OMP_NUM_THREADS=str(threads)) if jobs > 1 else dict(os.environ)


def train(variant, lr, seed):
    """One train.py run (resumed if it was interrupted; skipped if it finished) -> its folder."""
    path = run_dir(variant, lr, seed)
    if finished(path):
        return path
    resume = ["--init_from=resume"] if os.path.exists(os.path.join(path, "ckpt.pt")) else []
    cmd = [sys.executable, "train.py", f"configs/{variant}.py", "configs/tiny.py", *train_args,
           f"--learning_rate={lr}", f"--seed={seed}", f"--out_dir={path}", *resume]
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "train.log"), "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env=subprocess_env()).returncode
    if code:
        tqdm.write(
            f"sweep.py: {path} stopped with exit code {code} (last lines in {path}/train.log)")
    return path


def run_all(tasks, desc):
    """Run (fn, args) tasks, `jobs` at a time, with one progress bar -> their results in order."""
    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(tasks), desc=desc) as bar:
        futures = [pool.submit(fn, *args) for fn, *args in tasks]
        for f in futures:
            f.add_done_callback(lambda _: bar.update())
        return [f.result() for f in futures]


def grids_of_rates():
    """Step 1: train every variant over its grid (seed 0), growing the grid while the best rate is
    at its edge -> {variant: [learning rates]}."""
    grids = {v: sorted(learning_rates) for v in variants}
    widened = dict.fromkeys(variants, 0)
    todo = [(v, lr) for v in variants for lr in grids[v]]
    while todo:
        run_all([(train, v, lr, 0) for v, lr in todo], "sweep: learning rates")
        todo = []
        for v in variants:
            losses = [final_val_loss(run_dir(v, lr, 0)) for lr in grids[v]]
            best = losses.index(min(losses))
            if best in (0, len(losses) - 1) and widened[v] < max_widen and len(losses) > 1:
                lr = grids[v][0] / lr_step if best == 0 else grids[v][-1] * lr_step
                grids[v] = sorted(grids[v] + [lr])
                widened[v] += 1
                todo.append((v, lr))
    return grids


def best_rate(v, grid, unstable):
    """A variant's best rate: the lowest seed-0 final val loss among the rates where no seed stopped
    early (evaluate.py --runs ranks settings the same way: by the seeds all of them share, a setting
    with a stopped run never best)."""
    losses = [final_val_loss(run_dir(v, lr, 0)) if lr not in unstable else float("inf")
              for lr in grid]
    if min(losses) == float("inf"):
        sys.exit(f"sweep.py: {v}: no learning rate of {grid} finished every seed; "
                 f"see the train.log files in {out_root}")
    best = grid[losses.index(min(losses))]
    edge = " (at the edge of its grid)" if best in (grid[0], grid[-1]) else ""
    print(f"sweep.py: {v}: best learning rate {best:.3g}{edge}; final val loss by rate (seed 0): "
          + ", ".join(f"{lr:.3g}: {x:.4f}" for lr, x in zip(grid, losses)))
    return best


def evaluate_offline(path):
    """evaluate.py's offline section on a run, unless its eval_offline.json is newer than its
    checkpoint."""
    result = os.path.join(path, "eval_offline.json")
    if (os.path.exists(result)
            and os.path.getmtime(result) > os.path.getmtime(os.path.join(path, "ckpt.pt"))):
        return
    with open(os.path.join(path, "evaluate.log"), "w") as log:
        code = subprocess.run([sys.executable, "evaluate.py", "--section=offline",
                               f"--out_dir={path}", *eval_args],
                              stdout=log, stderr=subprocess.STDOUT, env=subprocess_env()).returncode
    if code:
        tqdm.write(
            f"sweep.py: evaluating {path} failed with exit code {code} (see {path}/evaluate.log)")


def main(argv):
    configure(globals(), argv, "sweep.py")
    started = time.time()
    for v in variants:
        if not os.path.exists(f"configs/{v}.py"):
            sys.exit(f"sweep.py: variants: no config file configs/{v}.py")
    grids = grids_of_rates()
    unstable = {v: set() for v in variants}  # rates where a seed stopped early (its loss diverged)
    while True:  # step 2, moving to the next-best rate where a seed at the best one diverged
        best = {v: best_rate(v, grids[v], unstable[v]) for v in variants}
        run_all([(train, v, best[v], s) for v in variants for s in range(1, seeds)], "sweep: seeds")
        runs = [run_dir(v, best[v], s) for v in variants for s in range(seeds)]
        stopped = [(v, best[v]) for v in variants
                   if not all(finished(run_dir(v, best[v], s)) for s in range(seeds))]
        for v, lr in stopped:
            print(f"sweep.py: {v}: a seed at learning rate {lr:.3g} stopped early; "
                  "trying the next-best rate")
            unstable[v].add(lr)
        if not stopped:
            break
    run_all([(evaluate_offline, r) for r in runs if finished(r)], "sweep: offline evaluation")
    every_run = sorted(os.path.join(out_root, d) for d in os.listdir(out_root)
                       if os.path.exists(os.path.join(out_root, d, "ckpt.pt")))
    table = subprocess.run([sys.executable, "evaluate.py", "--runs", *every_run,
                            f"--out={os.path.join(out_root, 'compare.png')}"],
                           capture_output=True, text=True)
    if table.returncode:
        sys.exit(f"sweep.py: evaluate.py --runs failed: {table.stderr.strip().splitlines()[-1]}")
    trained = sum(torch.load(os.path.join(r, "ckpt.pt"), weights_only=True)["train_seconds"]
                  for r in every_run)
    header = (f"sweep.py at commit {commit()} "
              f"on {machine('cuda' if torch.cuda.is_available() else 'cpu')}, "
              f"{jobs} run(s) at a time: {len(every_run)} runs, "
              f"{trained / 3600:.2f} h of training in all; "
              f"this call took {(time.time() - started) / 3600:.2f} h.\n\n")
    atomic_write(os.path.join(out_root, "compare.md"),
                 lambda tmp: Path(tmp).write_text(header + table.stdout))
    print(header + table.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
