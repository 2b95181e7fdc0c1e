"""sample.py with a tiny checkpoint trained here: files, index, determinism, cfg=1, bad inputs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import model
import sample
from conftest import build_tiny_dataset, run_train

ROOT = Path(__file__).resolve().parent.parent
GENERATE = model.MusicLM.generate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    build_tiny_dataset(tmp, "--synth_songs=4", "--max_text_tokens=16")
    return tmp


def train(data_dir, out, *configs):
    r = run_train(data_dir, out, *configs, "--seq_len=48", "--batch_size=4", "--max_iters=4",
                  "--eval_interval=4", "--eval_iters=1", "--gradient_accumulation_steps=1")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def run_dir(data_dir):
    return train(data_dir, data_dir / "out", "configs/prefix_simba.py", "configs/tiny.py")


def test_two_stage_writes_wav_files(data_dir, run_dir, tmp_path, monkeypatch):
    stage1 = train(data_dir, tmp_path / "stage1", "configs/two_stage_simba.py", "configs/tiny.py")
    stage2 = train(data_dir, tmp_path / "stage2", "configs/stage2_diffusion.py",
                   "--unet_channels=(32,32,64)")
    run_sample(stage1, tmp_path / "samples", f"--prompt={PROMPTS[0]}", "--seconds=1.0",
               f"--stage2_dir={stage2}", "--stage2_steps=3", monkeypatch=monkeypatch)
    wav, sr = sf.read(tmp_path / "samples" / f"{sample.slug(PROMPTS[0])}_0.wav")
    assert sr == 24000 and abs(len(wav) / sr - 1.0) <= 1 / 75 and np.abs(wav).max() > 0
    row = json.loads((tmp_path / "samples" / "index.jsonl").read_text())
    assert row["stage2_steps"] == 3 and row["stage2_dir"] == str(stage2)
    with pytest.raises(SystemExit, match="codebook 0 only"):  # a 4-codebook LM cannot feed stage 2
        run_sample(run_dir, tmp_path / "other", f"--prompt={PROMPTS[0]}", f"--stage2_dir={stage2}",
                   monkeypatch=monkeypatch)


def run_sample(run_dir, out, *argv, capture=None, monkeypatch=None):
    """sample.main in this process; with capture (a list), the codes each generate call returns are
    kept."""
    if capture is not None:
        def keep(self, *a, **k):
            capture.append(GENERATE(self, *a, **k))
            return capture[-1]
        monkeypatch.setattr(model.MusicLM, "generate", keep)
    monkeypatch.chdir(ROOT)
    sample.main([f"--out_dir={run_dir}", f"--samples_dir={out}", *argv])


PROMPTS = ["a calm solo piano in A minor", "loud drums, 140 BPM"]


def test_files_index_and_determinism(run_dir, tmp_path, monkeypatch):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    codes_a, codes_b = [], []
    args = [f"--prompts_file={tmp_path / 'prompts.txt'}", "--seconds=1.5", "--num_samples=2",
            "--batch_size=3", "--seed=7"]
    run_sample(run_dir, tmp_path / "a", *args, capture=codes_a, monkeypatch=monkeypatch)
    run_sample(run_dir, tmp_path / "b", *args, capture=codes_b, monkeypatch=monkeypatch)
    # same seed, same codes
    assert len(codes_a) == 2 and all(torch.equal(x, y) for x, y in zip(codes_a, codes_b))
    rows = [json.loads(l) for l in (tmp_path / "a" / "index.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in rows) == sorted(f"{sample.slug(p)}_{n}.wav"
                                                     for p in PROMPTS for n in range(2))
    for r in rows:
        wav, sr = sf.read(tmp_path / "a" / r["file"])
        info = sf.info(tmp_path / "a" / r["file"])
        assert sr == 24000 and info.subtype == "PCM_16" and abs(len(wav) / sr - 1.5) <= 1 / 75
        assert {"prompt", "seed", "cfg_scale", "top_k", "temperature", "checkpoint", "seconds",
                "generation_seconds"} <= set(r)
    with pytest.raises(SystemExit, match="exists"):  # never overwrite silently
        run_sample(run_dir, tmp_path / "a", *args, monkeypatch=monkeypatch)
    run_sample(run_dir, tmp_path / "a", *args, "--overwrite=True", monkeypatch=monkeypatch)


def test_cfg_1_is_the_conditional_model_alone(run_dir, tmp_path, monkeypatch):
    codes = []
    run_sample(run_dir, tmp_path, f"--prompt={PROMPTS[0]}", "--seconds=0.5", "--cfg_scale=1.0",
               "--top_k=50", "--seed=3", capture=codes, monkeypatch=monkeypatch)
    m, ckpt = sample.load_run(str(run_dir), "lm")
    embed, _ = data.load_text_encoder("minilm")
    T = ckpt["data_meta"]["text_encoder"]["max_tokens"]
    (states, _), = embed([PROMPTS[0]], T)
    # the prompt's token states, unpadded: it is alone
    text = torch.from_numpy(states.astype(np.float32))[None]
    mask = torch.ones(1, len(states), dtype=torch.bool)
    # by hand: the conditional rows only, no unconditional branch anywhere
    g = torch.Generator().manual_seed(3)
    K, V, steps = m.config.n_codebooks, m.config.codebook_size, codes[0].shape[-1]
    cache = m.prefill(text, mask, steps + K)
    seq = torch.full((1, K, steps + K), V)
    for p in range(1, steps + K):
        tok = model.sample_logits(m.step(seq[:, :, p - 1], cache), 1.0, 50, 0.0, g)
        inside = (p - torch.arange(K) - 1 >= 0) & (p - torch.arange(K) - 1 < steps)
        seq[:, :, p] = torch.where(inside, tok, V)
    assert torch.equal(codes[0], model.undelay(seq, V))


def test_ema_weights_and_the_checkpoint_choice(data_dir, tmp_path, monkeypatch):
    """A run that kept an EMA of its weights: sample.py generates from the EMA (not the raw weights)
    by default and from the raw weights with --ema=False; --ckpt picks the file."""
    run = train(data_dir, tmp_path / "run", "configs/prefix_simba.py", "configs/tiny.py",
                "--ema_decay=0.5")
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    for ema, weights in ((True, "ema"), (False, "model")):
        used = {}
        monkeypatch.setattr(model.MusicLM, "generate",
                            lambda self, *a, **k: (used.update(self.state_dict()),
                                                   GENERATE(self, *a, **k))[1])
        run_sample(run, tmp_path / f"ema_{ema}", f"--prompt={PROMPTS[0]}", "--seconds=0.2",
                   f"--ema={ema}", "--ckpt=last", monkeypatch=monkeypatch)
        assert used and all(torch.equal(v, ckpt[weights][k]) for k, v in used.items())
        row = json.loads((tmp_path / f"ema_{ema}" / "index.jsonl").read_text())
        assert row["checkpoint"] == str(run / "ckpt.pt")


def test_export_samples_like_its_run(run_dir, tmp_path, monkeypatch):
    """train.py's export (run/export/: model.safetensors + model.json) loads in sample.py as its run
    does and writes the same tokens with the same seed; --export writes one for any checkpoint."""
    info = json.loads((run_dir / "export" / "model.json").read_text())
    assert info["iter_num"] == 4 and info["exported_from"] == str(run_dir / "best.pt")
    codes = {}
    for name, source in (("run", run_dir), ("export", run_dir / "export")):
        codes[name] = []
        run_sample(source, tmp_path / name, f"--prompt={PROMPTS[1]}", "--seconds=0.5", "--seed=5",
                   capture=codes[name], monkeypatch=monkeypatch)
    assert torch.equal(codes["run"][0], codes["export"][0])
    run_sample(run_dir, tmp_path / "unused", "--ckpt=last", f"--export={tmp_path / 'last'}",
               monkeypatch=monkeypatch)
    exported, _ = sample.load_run(str(tmp_path / "last"), "lm")
    weights = torch.load(run_dir / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(v, weights[k]) for k, v in exported.state_dict().items())
    assert not (tmp_path / "unused").exists()  # --export writes the export and nothing else


@pytest.mark.parametrize("argv,message", [
    (["--prompt="], "empty prompt"),
    (["--prompt=x", "--seconds=0"], "--seconds=0.0 must be positive"),
    (["--prompt=x", "--out_dir=/no/such/run"], "no checkpoint at /no/such/run/ckpt.pt"),
    (["--prompt=x", "--ckpt=/no/such/file.pt"],
     "no checkpoint file /no/such/file.pt (expected last, best or a"),
    (["--prompts_file=BAD_JSON"], "does not parse"),
    (["--prompts_file=/no/such/file.txt"], "does not exist"),
    (["--prompt=x", "--stage2_dir=/no/such/run"], "no checkpoint at /no/such/run/ckpt.pt"),
    (["--prompt=x", "--out_dir=BROKEN"], "cannot read the checkpoint"),
])
def test_bad_inputs_one_line_and_nothing_written(run_dir, tmp_path, argv, message):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "ckpt.pt").write_bytes(b"not a checkpoint")
    argv = [a.replace("BAD_JSON", str(tmp_path / "bad.json"))
             .replace("BROKEN", str(tmp_path / "broken")) for a in argv]
    out = tmp_path / "samples"
    cmd = [sys.executable, "sample.py", f"--out_dir={run_dir}", f"--samples_dir={out}", *argv]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert (r.returncode != 0 and message in r.stderr
            and len(r.stderr.strip().splitlines()) == 1), r.stderr
    assert not out.exists()
