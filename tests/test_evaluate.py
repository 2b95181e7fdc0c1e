"""evaluate.py: the metric formulas against closed forms and scipy, audio loading, the audio
section with stand-in evaluators (the pretrained ones cannot be downloaded here), the offline
metrics and probe on tiny runs trained here, the comparison table and figure, and the stage-2
section."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate
import sample
from conftest import build_tiny_dataset, run_train
from model import codebook_losses, delay

ROOT = Path(__file__).resolve().parent.parent
TINY_LM = ["configs/tiny.py", "--seq_len=48", "--batch_size=4", "--eval_iters=1",
           "--warmup_iters=2", "--learning_rate=3e-3", "--max_iters=6", "--eval_interval=3",
           "--log_interval=1000"]


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    """Each test runs in the repository root, where the scripts are run from."""
    monkeypatch.chdir(ROOT)


# -----------------------------------------------------------------------------
# formulas


def random_stats(rng, d, n):
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d)
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_closed_form_and_scipy():
    fd = evaluate.frechet_distance
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fd(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # isotropic in 512-d: FD = d (s1 - s2)^2 for sigma = s^2 I
    zero = np.zeros(512)
    assert fd(zero, 4 * np.eye(512), zero, np.eye(512)) == pytest.approx(512.0)
    rng = np.random.default_rng(0)
    (m1, s1), (m2, s2) = random_stats(rng, 512, 2000), random_stats(rng, 512, 3000)
    assert abs(fd(m1, s1, m1, s1)) < 1e-8 * np.trace(s1)  # identical sets
    value = fd(m1, s1, m2, s2)
    assert value == pytest.approx(fd(m2, s2, m1, s1), rel=1e-9)  # symmetric
    from scipy import linalg  # the formula as the usual FD code writes it
    covmean = linalg.sqrtm(s1 @ s2).real
    reference = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert value == pytest.approx(reference, rel=1e-6)
    assert value > 0


def test_kl_and_cosine_by_hand():
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.5, 0.25])
    # the 0 in p adds nothing
    assert evaluate.kl_divergence(p, q) == pytest.approx(0.5 * np.log(2), abs=1e-5)
    # q puts mass where p has none: finite only through eps, as stable-audio-metrics' formula has it
    expected = 0.25 * np.log(0.25 / 0.5) + 0.25 * np.log(0.25 / 1e-6)
    assert evaluate.kl_divergence(q, p) == pytest.approx(expected, rel=1e-5)
    assert evaluate.kl_divergence(p, p) == pytest.approx(0.0, abs=1e-5)
    assert evaluate.kl_divergence(np.stack([p, q]), np.stack([q, q])).shape == (2,)
    assert evaluate.cosine([1, 0], [0, 3]) == pytest.approx(0.0)
    assert evaluate.cosine([1, 2], [2, 4]) == pytest.approx(1.0)
    assert evaluate.cosine([1, 2], [-1, -2]) == pytest.approx(-1.0)


# -----------------------------------------------------------------------------
# audio loading and the audio section


def tone(seconds, rate, freq=440.0, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    wav = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.stack([wav * (1 - 0.5 * c) for c in range(channels)], 1).astype(np.float32)


def test_load_audio_rates_channels_lengths(tmp_path):
    sf.write(tmp_path / "mono16k.wav", tone(1.5, 16000), 16000)
    sf.write(tmp_path / "stereo44k.flac", tone(2.0, 44100, channels=2), 44100)
    for name, seconds in (("mono16k.wav", 1.5), ("stereo44k.flac", 2.0)):
        stereo = evaluate.load_audio(tmp_path / name, 48000, 2)
        mono = evaluate.load_audio(tmp_path / name, 32000, 1)
        assert stereo.shape == (2, int(seconds * 48000)) and mono.shape == (1, int(seconds * 32000))
        assert stereo.dtype == np.float32
        # peak-normalized to -1 dBFS
        assert np.abs(stereo).max() == pytest.approx(10 ** (-1 / 20), rel=1e-5)
    left, right = evaluate.load_audio(tmp_path / "stereo44k.flac", 48000, 2)
    assert np.abs(right).max() < 0.6 * np.abs(left).max()  # the channels stay apart
    assert np.array_equal(*evaluate.load_audio(tmp_path / "mono16k.wav", 48000, 2))  # mono repeated
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00not a wav file")
    sf.write(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    for bad, why in (("corrupt.wav", "unreadable"), ("silent.wav", "silent")):
        with pytest.raises(ValueError, match=why):
            evaluate.load_audio(tmp_path / bad, 48000, 1)


def fake_models(calls):
    """Stand-ins with the real evaluators' interfaces (builders taking (device, seed, weights_dir)):
    'embeddings' from a few spectrum bands."""
    def bands(wav, n):
        spec = np.abs(np.fft.rfft(wav.mean(0)))
        return np.array([c.sum() for c in np.array_split(spec, n)]) / (spec.sum() + 1e-9)

    def openl3(*settings):
        calls.append("openl3")

        def embed(wav):  # a frame of 4800 samples every 2400
            starts = range(0, wav.shape[1] - 4800, 2400)
            return np.stack([bands(wav[:, s:s + 4800], 8) for s in starts])
        return embed, dict(rate=48000, channels=2)

    def passt(*settings):
        calls.append("passt")
        return (lambda wav: bands(wav, 16)), dict(rate=32000, channels=1)

    def clap(*settings):
        raise evaluate.Unavailable("CLAP needs the laion-clap package: pip install laion-clap")
    return dict(fd_openl3=openl3, kl_passt=passt, clap=clap)


def test_audio_section_pairs_reports_and_survives(tmp_path, monkeypatch, capsys):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir(), ref.mkdir()
    for i, freq in enumerate((220, 330, 440)):
        sf.write(ref / f"ref{i}.wav", tone(2.0, 44100, freq, channels=2), 44100)
        sf.write(gen / f"a-song-{i}_0.wav", tone(1.0 + i, 24000, freq * 1.02), 24000)
    (gen / "a-song-9_0.wav").write_bytes(b"junk")  # corrupt: reported, not fatal
    (gen / "index.jsonl").write_text("".join(
        json.dumps(dict(file=f"a-song-{i}_0.wav", prompt=f"song {i}")) + "\n" for i in range(3)))
    (tmp_path / "captions.csv").write_text(
        "id,caption\n" + "".join(f"ref{i},song {i}\n" for i in range(3)))
    calls = []
    monkeypatch.setattr(evaluate, "METRIC_MODELS", fake_models(calls))
    result = evaluate.main(["--section=audio", f"--generated={gen}", f"--reference={ref}",
                            f"--reference_captions={tmp_path / 'captions.csv'}"])
    # paired by caption, the corrupt one left out
    assert result["n_generated"] == 4 and result["kl_passt_pairs"] == 3
    assert result["fd_openl3"] > 0 and result["kl_passt"] > 0
    assert "clap" not in result
    assert "laion-clap" in result["unavailable"]["clap"]
    assert list(result["problems"]) == [str(gen / "a-song-9_0.wav")]
    saved = json.loads((gen / "eval_audio.json").read_text())
    assert saved["fd_openl3"] == pytest.approx(result["fd_openl3"])
    assert (ref / "fd_openl3_stats.npz").exists()
    out = capsys.readouterr()
    assert "| FD_openl3 | KL_passt | CLAP |" in out.out and "n/a" in out.out
    assert "a-song-9_0.wav" in out.err
    # the reference statistics come from the cache the second time; the same set against itself is
    # at 0
    again = evaluate.main(["--section=audio", f"--generated={ref}", f"--reference={ref}",
                           "--metrics=('fd_openl3',)"])
    assert abs(again["fd_openl3"]) < 1e-9


def test_audio_section_generates_from_prompts_first(lm_runs, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, freq in enumerate((220, 330)):
        sf.write(ref / f"r{i}.wav", tone(1.0, 24000, freq), 24000)
    (tmp_path / "prompts.txt").write_text("a soft piano\na loud synth lead\n")
    monkeypatch.setattr(evaluate, "METRIC_MODELS", fake_models([]))
    result = evaluate.main(["--section=audio", f"--out_dir={lm_runs[0]}",
                            f"--prompts_file={tmp_path / 'prompts.txt'}", "--seconds=0.5",
                            f"--reference={ref}", "--metrics=('fd_openl3', 'clap')"])
    samples = lm_runs[0] / "samples_eval"
    assert result["generated"] == str(samples) and result["n_generated"] == 2
    wavs = sorted(p.name for p in samples.glob("*.wav"))
    assert wavs == ["a-loud-synth-lead_0.wav", "a-soft-piano_0.wav"]
    assert np.isfinite(result["fd_openl3"]) and "clap" in result["unavailable"]
    assert (lm_runs[0] / "eval_audio.json").exists()


def test_metric_without_package_says_what_to_install():
    with pytest.raises(evaluate.Unavailable, match="pip install no-such-package$"):
        evaluate.need("X", "no-such-package", "no_such_module_here")


# -----------------------------------------------------------------------------
# offline metrics, the probe and the comparison, on tiny runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    build_tiny_dataset(tmp, "--synth_songs=6", "--max_text_tokens=8", "--val_fraction=0.34")
    return tmp


@pytest.fixture(scope="module")
def lm_runs(data_dir):
    runs = []
    for variant in ("prefix_simba", "prefix_transformer"):
        r = run_train(data_dir, data_dir / variant, f"configs/{variant}.py", *TINY_LM)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(data_dir / variant)
    return runs


def test_val_nll_is_the_training_loss_on_a_whole_clip(lm_runs):
    model, ckpt = sample.load_run(str(lm_runs[0]), "lm")  # on the CPU
    d = evaluate.read_split(evaluate.data_root(ckpt), "val", ckpt["data_meta"])
    L = int(d["clips"][0][1])  # one window per clip: the loss train.py computes on that crop
    batch_size = evaluate.DEFAULTS["batch_size"]
    nll, nll_notext = evaluate.val_nll(model, d, L, batch_size, "cpu")
    K, V = model.config.n_codebooks, model.config.codebook_size
    first, _ = evaluate.val_nll(model, d, L, batch_size, "cpu", first=10)
    per_clip, per_clip_first = [], []
    for i, (o, n, _, _) in enumerate(d["clips"].tolist()):
        seq = delay(torch.from_numpy(d["codes"][:K, o:o + n].astype(np.int64))[None], V)
        # the clip's first caption: its states, zero-padded
        start, tokens = d["text_index"][d["clips"][i, 2]]
        batch = d["clips"][i // batch_size * batch_size:][:batch_size]
        T = d["text_index"][batch[:, 2], 1].max()  # val_nll pads to the batch's longest caption
        text = torch.zeros(1, T, d["text"].shape[1])
        text[0, :tokens] = torch.from_numpy(d["text"][start:start + tokens].astype(np.float32))
        mask = torch.arange(text.shape[1])[None] < int(tokens)
        logits, _ = model(seq[:, :, :-1], text, mask)
        per_clip.append(codebook_losses(logits, seq[:, :, 1:]))
        per_clip_first.append(codebook_losses(logits[:, :, :10], seq[:, :, 1:11]))
    # equal-length clips: a plain mean
    assert torch.allclose(nll, torch.stack(per_clip).mean(0), atol=1e-5)
    assert torch.allclose(first, torch.stack(per_clip_first).mean(0), atol=1e-5)
    assert nll.shape == (K,) and (nll_notext != nll).any()


@pytest.fixture(scope="module")
def offline_result(lm_runs):
    return evaluate.main(["--section=offline", f"--out_dir={lm_runs[0]}", "--probe_seconds=1.0",
                          "--probe_iters=20", "--gen_per_caption=1"])


def test_offline_section(lm_runs, offline_result):
    result = offline_result
    assert result["text_gain"] == pytest.approx(result["nll_notext"] - result["nll"], abs=1e-6)
    # the first second of each window: here every window (48 frames) is shorter than that
    assert result["text_gain_first_second"] == pytest.approx(result["text_gain"], abs=1e-6)
    assert len(result["nll_per_codebook"]) == 4
    assert set(result["probe_attributes"]) >= {"instrument", "mode", "bpm", "drums"}
    for key in ("probe_ceiling", "probe_chance", "probe_generated", "probe_generated_no_caption"):
        assert len(result[key]) == len(result["probe_attributes"])
        assert all(x is None or 0 <= x <= 1 for x in result[key])
        assert any(x is not None for x in result[key])
    assert (lm_runs[0] / "eval_offline.json").exists()
    ckpt = torch.load(lm_runs[0] / "ckpt.pt", weights_only=True)
    root = evaluate.data_root(ckpt)
    [cache] = Path(root).glob("probe_*.pt")
    stamp = cache.stat().st_mtime_ns  # the same settings again: the cached probe, not a new one
    # as offline_result ran it: 1 s = 75 frames, --probe_iters=20, the default seed
    probe = evaluate.cached_probe(root, ckpt["data_meta"], 75, 20, evaluate.DEFAULTS["seed"])
    assert probe[2] == result["probe_ceiling"]
    assert cache.stat().st_mtime_ns == stamp


def log_rows(run):
    with open(run / "log.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def simba_seed1(data_dir):
    """lm_runs' Prefix SiMBA again with seed 1."""
    r = run_train(data_dir, data_dir / "prefix_simba_seed1", "configs/prefix_simba.py", *TINY_LM,
                  "--seed=1")
    assert r.returncode == 0, r.stderr[-2000:]
    return data_dir / "prefix_simba_seed1"


def test_runs_group_seeds_and_compare_at_equal_budgets(lm_runs, offline_result, simba_seed1,
                                                       tmp_path, capsys):
    simba, transformer = lm_runs
    seed1 = simba_seed1
    # a higher rate whose loss went to nan: it stopped at its first eval
    stopped = tmp_path / "transformer_diverged"
    shutil.copytree(transformer, stopped)
    ckpt = torch.load(stopped / "ckpt.pt", weights_only=True)
    ckpt["config"]["learning_rate"] = 1.0
    torch.save(ckpt, stopped / "ckpt.pt")
    lines = (stopped / "log.csv").read_text().splitlines()
    (stopped / "log.csv").write_text("\n".join(lines[:2]) + "\n")
    png = tmp_path / "runs.png"
    rows = evaluate.main(["--runs", str(simba), str(transformer), str(seed1), str(stopped),
                          f"--out={png}"])
    table = capsys.readouterr().out
    variants = [(r["variant"], r["seeds"]) for r in rows]
    assert variants == [("prefix_simba", 2), ("prefix_transformer", 1)]
    assert rows[0]["runs"] == [str(simba), str(seed1)] and all(r["params"] > 0 for r in rows)
    # equal steps: the mean and the spread of the seeds' final val losses
    finals = [log_rows(run)[-1]["val_loss"] for run in (simba, seed1)]
    spread = (np.mean(finals), np.std(finals, ddof=1), 2)
    assert rows[0]["val_loss_at_iter"] == pytest.approx(spread)
    final = log_rows(transformer)[-1]["val_loss"]
    assert rows[1]["val_loss_at_iter"] == pytest.approx((final, None, 1))
    # equal FLOPs and wall-clock: the least every variant reached; the other variant is read between
    # its evals
    for x in ("flops_seen", "train_seconds"):
        logs = {run: log_rows(run) for run in (simba, seed1, transformer)}
        budget = min(log[-1][x] for log in logs.values())
        for run, log in logs.items():
            assert log[-1][x] >= budget
            i = next(i for i, p in enumerate(log) if p[x] >= budget)
            lo, hi = sorted((log[i]["val_loss"], log[max(i - 1, 0)]["val_loss"]))
            assert lo - 1e-9 <= evaluate.at(dict(log=log), x, budget) <= hi + 1e-9
        expected = evaluate.at(dict(log=logs[transformer]), x, budget)
        assert rows[1][f"val_loss_at_{x}"][0] == pytest.approx(expected)
    # only the first seed has eval_offline.json
    assert rows[0]["probe"][2] == 1 and rows[1]["probe"] is None
    # from eval_offline.json for one seed, from log.csv for the other
    assert rows[0]["text_gain"][2] == 2
    # in the table of settings and in the comparison
    assert table.count("| prefix_simba | 0.003 | 2 |") == 2
    max_iters = ckpt["config"]["max_iters"]
    assert "| prefix_transformer | 1 | 1 | 0 | " in table
    assert f"stopped at step 0 of {max_iters} |" in table
    assert f"{np.mean(finals):.4f} ± {np.std(finals, ddof=1):.4f}" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def fake_rate(run, dest, learning_rate, final_val_loss):
    """A copy of a run as if trained at another rate, its last val loss set (the ranking reads only
    the log)."""
    shutil.copytree(run, dest)
    ckpt = torch.load(dest / "ckpt.pt", weights_only=True)
    ckpt["config"]["learning_rate"] = learning_rate
    torch.save(ckpt, dest / "ckpt.pt")
    rows = list(csv.DictReader(open(dest / "log.csv")))
    rows[-1]["val_loss"] = repr(final_val_loss)
    with open(dest / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_runs_rank_rates_by_the_seeds_every_rate_has(lm_runs, simba_seed1, tmp_path, capsys):
    """As in a sweep: seed 0 at every rate, more seeds at one. Rates are ranked by the shared seed,
    so a worse extra seed cannot hand the win to a rate with fewer seeds; a rate where a seed
    diverged never wins."""
    simba, seed1 = lm_runs[0], simba_seed1
    shared, extra = log_rows(simba)[-1]["val_loss"], log_rows(seed1)[-1]["val_loss"]
    # the ranking must differ from the all-seed mean's: the extra seed is the worse one
    if extra < shared:
        simba, seed1, shared, extra = seed1, simba, extra, shared
    between = (shared + (shared + extra) / 2) / 2  # above the shared seed, below both seeds' mean
    other_rate, diverged = tmp_path / "other_rate", tmp_path / "diverged"
    fake_rate(simba, other_rate, 1e-2, between)
    rows = evaluate.main(["--runs", str(simba), str(seed1), str(other_rate),
                          f"--out={tmp_path / 'a.png'}"])
    assert (rows[0]["learning_rate"], rows[0]["seeds"]) == (3e-3, 2)
    # the same but the lower rate's extra seed stopped early (diverged): the other rate wins
    fake_rate(seed1, diverged, 3e-3, float("nan"))
    lines = (diverged / "log.csv").read_text().splitlines()
    (diverged / "log.csv").write_text("\n".join(lines[:2]) + "\n")
    rows = evaluate.main(["--runs", str(simba), str(diverged), str(other_rate),
                          f"--out={tmp_path / 'b.png'}"])
    assert (rows[0]["learning_rate"], rows[0]["seeds"]) == (1e-2, 1)
    capsys.readouterr()


def test_probe_reads_attributes_from_real_tokens_and_not_from_shuffled_ones(tmp_path):
    build_tiny_dataset(tmp_path, "--synth_songs=120", "--max_text_tokens=8", "--val_fraction=0.2")
    root = tmp_path / "tiny"
    meta = json.loads((root / "meta.json").read_text())
    _, classes, real, chance = evaluate.train_probe(root, meta, 150, 400)
    _, _, shuffled, _ = evaluate.train_probe(root, meta, 150, 400, shuffle=True)
    assert chance == [1 / len(c) for c in classes.values()]
    # loudness is plain in any codec's tokens (chance 0.33)
    assert dict(zip(classes, real))["dynamics"] >= 0.6
    # 96 train songs of 2 s, 24 val songs: above guessing and clearly above the same probe on
    # shuffled captions (on data/synth, 54 songs of 60 s, the ceiling is 0.53 against chance 0.28:
    # README)
    assert evaluate.mean(real) > max(evaluate.mean(chance), evaluate.mean(shuffled)) + 0.05
    # captions of other songs: nothing to learn
    assert evaluate.mean(shuffled) < evaluate.mean(chance) + 0.05


# -----------------------------------------------------------------------------
# stage 2


@pytest.fixture(scope="module")
def stage2_dir(data_dir):
    r = run_train(data_dir, data_dir / "stage2", "configs/stage2_diffusion.py",
                  "--unet_channels=(32,32,64)", "--seq_len=32", "--batch_size=4", "--max_iters=3",
                  "--eval_interval=3", "--eval_iters=1", "--gradient_accumulation_steps=1")
    assert r.returncode == 0, r.stderr[-2000:]
    return data_dir / "stage2"


def test_stage2_section(stage2_dir):
    result = evaluate.main(["--section=stage2", f"--stage2_dir={stage2_dir}", "--seconds=1.0",
                            "--stage2_steps=2", "--n_clips=2", "--stage2_temperatures=(1.0, 0.0)"])
    saved = json.loads((stage2_dir / "eval_stage2.json").read_text())
    assert saved == json.loads(json.dumps(result))
    baseline, warm, cold = result["rows"]
    assert result["n_clips"] == 2 and len(baseline["acc_per_codebook"]) == 7
    for row in (baseline, warm, cold):
        assert 0 <= row["acc_mean"] <= 1 and row["latent_mse"] >= 0
    assert warm["seconds_per_audio_second"] > 0 and "temperature 0" in cold["method"]
    # the measure itself: the true latent re-quantizes to its own codes with no error
    model, ckpt = sample.load_run(str(stage2_dir), "stage2")
    # the first second (75 frames) of up to evaluate.py's default number of clips
    truth = evaluate.val_codes(evaluate.data_root(ckpt), ckpt["data_meta"], "val", 1.0,
                               evaluate.DEFAULTS["n_clips"])
    assert truth.shape[-1] == 75
    assert evaluate.scores(model, model.latent(truth), truth)["acc_mean"] > 0.9
    mse = evaluate.scores(model, model.latent(truth), truth)["latent_mse"]
    assert mse == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("argv, message", [
    (["--section=stage2", "--stage2_dir=/no/such/run"],
     "evaluate.py: no checkpoint at /no/such/run/ckpt.pt; set --stage2_dir"),
    (["--section=offline"],
     "evaluate.py: the offline section needs --out_dir=RUN (a train.py out_dir)"),
    (["--section=audio", "--generated=/no/such/dir", "--reference=/tmp"],
     "evaluate.py: --generated=/no/such/dir holds no audio files (.wav, .flac, .ogg, .mp3)"),
    (["--runs"], "evaluate.py: --runs needs one or more values"),  # configurator.py's message
    (["--section=nope"],
     "evaluate.py: unknown section 'nope'; available: offline, audio, stage2 (or --runs DIR ...)"),
])
def test_bad_input_one_line(argv, message):
    r = subprocess.run([sys.executable, "evaluate.py", *argv], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode != 0 and r.stderr.strip() == message
