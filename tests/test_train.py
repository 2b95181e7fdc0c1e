"""train.py on a tiny synthetic dataset built here: every paper variant learns, resume is exact (EMA
included), fine-tuning starts from another run, best and periodic checkpoints, torchrun with two CPU
processes works, bad configs give one-line errors, a NaN loss stops the run cleanly."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import build_tiny_dataset, run_train as train

import model
import sample
import stage2

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["prefix_simba", "prefix_mamba", "cross_simba", "prefix_transformer",
            "cross_transformer", "two_stage_simba"]
FAST = ["--seq_len=48", "--batch_size=4", "--eval_iters=2", "--warmup_iters=5",
        "--learning_rate=3e-3", "--log_interval=1000"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    build_tiny_dataset(tmp, "--synth_songs=16", "--max_text_tokens=16", "--val_fraction=0.25")
    return tmp


def log_rows(out_dir):
    return list(csv.DictReader(open(out_dir / "log.csv")))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_learns(data_dir, tmp_path, variant):
    r = train(data_dir, tmp_path, f"configs/{variant}.py", "configs/tiny.py", *FAST,
              "--max_iters=40", "--eval_interval=20")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = log_rows(tmp_path)
    assert [int(row["iter"]) for row in rows] == [0, 20, 40]
    if variant == "two_stage_simba":
        # Codebook 0 alone: on 12 training songs the untrained codec's coarsest codes are
        # song-specific, so its val loss rises for every variant (see val_loss_cb0 of the others);
        # the check is the training loss.
        assert float(rows[-1]["train_loss"]) < float(rows[1]["train_loss"]) - 0.2
    else:
        assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 0.5
    assert float(rows[-1]["flops_seen"]) > 0 and float(rows[-1]["tokens_per_s"]) > 0
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert (ckpt["iter_num"] == 40
            and ckpt["model_args"]["block"] in ("mamba", "simba", "transformer"))
    assert {"model", "optimizer", "config", "data_meta", "tokens_seen", "flops_seen",
            "best_val_loss", "rng"} <= set(ckpt)
    # what sample.py and evaluate.py load with --ckpt=last
    m, _ = sample.load_run(tmp_path, "lm", "last")
    assert (isinstance(m, model.MusicLM)
            and all(torch.equal(v, ckpt["model"][k]) for k, v in m.state_dict().items()))
    with pytest.raises(ValueError, match="ckpt.pt holds a language model$"):
        sample.load_run(tmp_path, "stage2", "last")


def test_stage2_trains_through_the_same_loop(data_dir, tmp_path):
    r = train(data_dir, tmp_path, "configs/stage2_diffusion.py", "--unet_channels=(32,32,64)",
              "--seq_len=32", "--batch_size=8", "--max_iters=40", "--eval_interval=20",
              "--eval_iters=2", "--learning_rate=2e-3", "--warmup_iters=5",
              "--gradient_accumulation_steps=1")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = log_rows(tmp_path)
    assert list(rows[0])[6] == "val_loss" and "text_gain" not in rows[0]
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 0.2
    assert float(rows[-1]["train_loss"]) < float(rows[1]["train_loss"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert (ckpt["model"]["codebooks"].shape == (8, 1024, 128)
            and ckpt["model"]["codebooks"].abs().sum() > 0)
    assert isinstance(sample.load_run(tmp_path, "stage2")[0], stage2.Stage2Diffusion)
    with pytest.raises(ValueError, match="best.pt holds a stage-2 diffusion model$"):
        sample.load_run(tmp_path, "lm")


def test_resume_is_exact(data_dir, tmp_path):
    argv = ["configs/prefix_simba.py", "configs/tiny.py", *FAST, "--dropout=0.1",
            "--eval_interval=6", "--caption_dropout=0.3", "--word_dropout=0.2", "--ema_decay=0.9"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(data_dir, a, *argv, "--max_iters=12").returncode == 0
    assert train(data_dir, b, *argv, "--max_iters=6").returncode == 0
    r = train(data_dir, b, *argv, "--max_iters=12", "--init_from=resume")
    assert r.returncode == 0, r.stderr[-2000:]
    ca, cb = (torch.load(run / "ckpt.pt", weights_only=True) for run in (a, b))
    for weights in ("model", "ema"):  # bit for bit, the moving average too
        assert all(torch.equal(ca[weights][k], cb[weights][k]) for k in ca[weights]), weights
    # an average, not a copy
    assert any(not torch.equal(ca["ema"][k], ca["model"][k]) for k in ca["model"])
    # all but the times
    columns = ("iter", "flops_seen", "lr", "train_loss", "val_loss", "text_gain")
    assert ([[row[c] for c in columns] for row in log_rows(b)]
            == [[row[c] for c in columns] for row in log_rows(a)])


def test_fine_tune_from_a_run(data_dir, tmp_path):
    """init_from=<run dir>: a new run from the source's best weights at step 0 with a fresh
    optimizer; the source is left as it was; a model of another shape stops with one line naming
    the keys that differ."""
    argv = ["configs/prefix_simba.py", "configs/tiny.py", *FAST, "--eval_interval=3"]
    src, tuned = tmp_path / "src", tmp_path / "tuned"
    assert train(data_dir, src, *argv, "--max_iters=6").returncode == 0
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}  # its export/ folder too
    r = train(data_dir, tuned, *argv, "--max_iters=3", f"--init_from={src}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    rows = log_rows(tuned)
    assert [int(row["iter"]) for row in rows] == [0, 3]
    # step 0 scores the source's best weights on the same val batches: the source's best val loss
    assert float(rows[0]["val_loss"]) == pytest.approx(
        torch.load(src / "best.pt", weights_only=True)["best_val_loss"], abs=1e-4)
    ckpt = torch.load(tuned / "ckpt.pt", weights_only=True)
    assert (ckpt["iter_num"] == 3
            and all(s["step"].item() == 3 for s in ckpt["optimizer"]["state"].values()))
    n_layer = ckpt["model_args"]["n_layer"]
    r = train(data_dir, tmp_path / "other", *argv, f"--n_layer={n_layer + 1}", f"--init_from={src}")
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1] == (
        f"train.py: init_from={src}: {src / 'best.pt'} holds another model: "
        f"n_layer ({n_layer} there, {n_layer + 1} here)")
    r = train(data_dir, tmp_path / "other", *argv, f"--init_from={tmp_path / 'nothing'}")
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(
        f"train.py: init_from={tmp_path / 'nothing'}: no checkpoint at")


def test_best_and_periodic_checkpoints(data_dir, tmp_path):
    r = train(data_dir, tmp_path, "configs/prefix_transformer.py", "configs/tiny.py", *FAST,
              "--max_iters=12", "--eval_interval=3", "--keep_every=6", "--learning_rate=5e-2")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = log_rows(tmp_path)
    losses = [float(row["val_loss"]) for row in rows]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert (best["iter_num"] == int(rows[losses.index(min(losses))]["iter"])
            and "optimizer" not in best)
    assert best["best_val_loss"] == pytest.approx(min(losses), rel=1e-5)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_12.pt", "ckpt_6.pt"]
    assert torch.load(tmp_path / "ckpt_6.pt", weights_only=True)["iter_num"] == 6
    # sample.py's and evaluate.py's default
    assert sample.checkpoint_file(str(tmp_path)) == str(tmp_path / "best.pt")
    assert sample.checkpoint_file(str(tmp_path), "last") == str(tmp_path / "ckpt.pt")
    r = train(data_dir, tmp_path / "bad", "configs/prefix_transformer.py", "configs/tiny.py", *FAST,
              "--eval_interval=3", "--keep_every=4")
    assert r.returncode != 0 and r.stderr.strip() == (
        "train.py: keep_every=4 must be a multiple of eval_interval=3 "
        "(checkpoints are written at evals)")


WANDB_STUB = """
import json, os
class Audio:
    def __init__(self, data, sample_rate, caption):
        self.caption = caption
class Run:
    def log(self, values, step):
        with open(os.environ["WANDB_STUB_LOG"], "a") as f:
            row = {k: v.caption if isinstance(v, Audio) else v for k, v in values.items()}
            f.write(json.dumps(dict(step=step, **row)) + "\\n")
def init(project, name, config):
    with open(os.environ["WANDB_STUB_LOG"], "a") as f:
        f.write(json.dumps(dict(project=project, name=name, max_iters=config["max_iters"])) + "\\n")
    return Run()
"""


def train_with(data_dir, out_dir, stub, *argv):
    """train.py with a stand-in wandb package first on the path (it writes what it is given to
    out_dir/wandb.jsonl)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(stub),
               WANDB_STUB_LOG=str(out_dir / "wandb.jsonl"))
    return subprocess.run([sys.executable, "train.py", "configs/prefix_simba.py", "configs/tiny.py",
                           *FAST, *argv, f"--data_dir={data_dir}", "--dataset=tiny",
                           f"--out_dir={out_dir}"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_loggers_and_samples_while_training(data_dir, tmp_path):
    """wandb (a stand-in that records its calls) and TensorBoard (the real package, read back) get
    every eval's values and the clips sampled every sample_interval evals, which land in
    out_dir/samples/iter_<N>/ with their captions; a missing package stops the run with one line."""
    (tmp_path / "stub" / "wandb").mkdir(parents=True)
    (tmp_path / "stub" / "wandb" / "__init__.py").write_text(WANDB_STUB)
    out = tmp_path / "run"
    out.mkdir()
    r = train_with(data_dir, out, tmp_path / "stub", "--max_iters=6", "--eval_interval=2",
                   "--wandb_log=True", "--tensorboard_log=True", "--sample_interval=2",
                   "--sample_clips=2", "--sample_seconds=0.2")
    assert r.returncode == 0, r.stderr[-2000:]
    captions = [json.loads(line)["captions"][0]
                for line in (data_dir / "tiny" / "val_captions.jsonl").open()][:2]
    # evals 0, 2, 4, 6: every 2nd, not 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["iter_4"]
    index = [json.loads(line) for line in (out / "samples" / "iter_4" / "captions.jsonl").open()]
    assert [row["caption"] for row in index] == captions
    for row in index:
        wav, rate = sf.read(out / "samples" / "iter_4" / row["file"])
        assert rate == 24000 and abs(len(wav) / rate - 0.2) <= 1 / 75
    log = [{k: float(v) for k, v in row.items() if v} for row in log_rows(out)]
    calls = [json.loads(line) for line in (out / "wandb.jsonl").open()]
    assert calls[0] == dict(project="ssm-ttm", name="run", max_iters=6)
    assert [c["step"] for c in calls[1:]] == [0, 2, 4, 6]
    assert ([c["val_loss"] for c in calls[1:]]
            == pytest.approx([row["val_loss"] for row in log], rel=1e-5))
    assert [c.get("sample_1") for c in calls[1:]] == [None, None, captions[1], None]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"audio": 0, "scalars": 0})
    events.Reload()
    scalars = events.Scalars("val_loss")
    assert [e.step for e in scalars] == [0, 2, 4, 6]
    assert [e.value for e in scalars] == pytest.approx([row["val_loss"] for row in log], rel=1e-5)
    assert [e.step for e in events.Audio("sample_0")] == [4]
    (tmp_path / "stub" / "wandb" / "__init__.py").write_text("raise ImportError('not installed')")
    r = train_with(data_dir, tmp_path / "missing", tmp_path / "stub", "--max_iters=2",
                   "--wandb_log=True")
    assert r.returncode != 0 and r.stderr.strip() == (
        "train.py: wandb_log=True but the wandb package is not installed: pip install wandb")


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="float16 autocast and its gradient scaler need a GPU")
def test_float16_trains_with_a_gradient_scaler_on_a_gpu(data_dir, tmp_path):
    r = train(data_dir, tmp_path, "configs/prefix_transformer.py", "configs/tiny.py", *FAST,
              "--max_iters=6", "--eval_interval=3", "--device=cuda", "--dtype=float16")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert (ckpt["scaler"]["scale"] > 0
            and all(torch.isfinite(v).all() for v in ckpt["model"].values()))
    assert float(log_rows(tmp_path)[-1]["val_loss"]) < float(log_rows(tmp_path)[0]["val_loss"])


def test_torchrun_two_cpu_processes(data_dir, tmp_path):
    r = train(data_dir, tmp_path, "configs/prefix_simba.py", "configs/tiny.py", *FAST,
              "--max_iters=6", "--eval_interval=6", "--gradient_accumulation_steps=2",
              "--ema_decay=0.9", torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 6 and ckpt["config"]["gradient_accumulation_steps"] == 2
    # the EMA under DDP too
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])


@pytest.mark.parametrize("argv,message", [
    (["--n_layr=3"], "unknown config key 'n_layr' in --n_layr; did you mean n_layer?"),
    (["--n_layer=big"], "config key 'n_layer' in --n_layer should be int"),
    (["--dataset=nothing_here"], "no dataset at"),
    (["configs/no_such_config.py"], "cannot read config file configs/no_such_config.py"),
])
def test_config_errors_are_one_line(data_dir, tmp_path, argv, message):
    cmd = [sys.executable, "train.py", "configs/prefix_simba.py", "configs/tiny.py",
           f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={tmp_path}", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert (r.returncode != 0 and message in r.stderr
            and len(r.stderr.strip().splitlines()) == 1), r.stderr


def test_nan_loss_stops_and_keeps_the_checkpoint(data_dir, tmp_path):
    r = train(data_dir, tmp_path, "configs/prefix_transformer.py", "configs/tiny.py", *FAST,
              "--max_iters=20", "--eval_interval=100", "--learning_rate=1e30", "--warmup_iters=0",
              "--grad_clip=0.0")
    assert (r.returncode != 0 and "loss is" in r.stderr
            and "at iteration" in r.stderr), r.stderr[-1000:]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # the one from iteration 0
    assert ckpt["iter_num"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
