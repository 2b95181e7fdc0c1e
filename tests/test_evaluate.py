"""evaluate.py's stage2 section on a tiny stage-2 checkpoint trained here."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
from conftest import build_tiny_dataset, run_train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stage2_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    build_tiny_dataset(tmp, "--synth_songs=6", "--max_text_tokens=8", "--val_fraction=0.34")
    r = run_train(tmp, tmp / "stage2", "configs/stage2_diffusion.py", "--unet_channels=(32,32,64)", "--seq_len=32",
                  "--batch_size=4", "--max_iters=3", "--eval_interval=3", "--eval_iters=1",
                  "--gradient_accumulation_steps=1")
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "stage2"


def test_stage2_section(stage2_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    importlib.reload(evaluate)
    result = evaluate.main([f"--stage2_dir={stage2_dir}", "--seconds=1.0", "--stage2_steps=2", "--clips=2"])
    saved = json.loads((stage2_dir / "eval_stage2.json").read_text())
    assert saved == json.loads(json.dumps(result))
    baseline, stage2 = result["rows"]
    assert result["clips"] == 2 and len(baseline["acc_per_codebook"]) == 7
    for row in (baseline, stage2):
        assert 0 <= row["acc_mean"] <= 1 and row["latent_mse"] >= 0
    assert stage2["seconds_per_audio_second"] > 0
    # the measure itself: the true latent re-quantizes to its own codes with no error
    model, ckpt = evaluate.load_stage2(str(stage2_dir / "ckpt.pt"))
    truth = evaluate.val_codes(ckpt, 75)
    assert evaluate.scores(model, model.latent(truth), truth)["acc_mean"] > 0.9  # the truth re-quantizes to itself
    assert evaluate.scores(model, model.latent(truth), truth)["latent_mse"] == pytest.approx(0.0, abs=1e-8)


def test_missing_checkpoint_one_line():
    r = subprocess.run([sys.executable, "evaluate.py", "--stage2_dir=/no/such/run"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode != 0 and r.stderr.strip() == "evaluate.py: no stage-2 checkpoint at /no/such/run/ckpt.pt; set --stage2_dir"
