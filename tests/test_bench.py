"""bench.py's train, generate and stage2 sections on tiny shapes: every row is there and its numbers are sane.
(The kernel section's baselines are checked against the reference in test_scan.py.)"""
import pytest

import bench


def test_train_section_rows():
    rows = bench.bench_train("cpu", reps=1, size="tiny", seconds=0.5, multiples=(1, 2))
    assert [(r["model"], r["seconds"]) for r in rows] == [(m, s) for m in bench.TRAIN_MODELS for s in (0.5, 1.0)]
    for r in rows:
        assert r["positions"] == round(r["seconds"] * 75) + 3  # frames + K - 1 delayed positions
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] == pytest.approx(r["positions"] / r["ms_per_step"] * 1e3)
        assert r["mfu_pct"] is None and r["peak_mem_GB"] is None  # CUDA only
    transformer = [r for r in rows if r["model"].endswith("transformer")]
    assert all(r["speed_vs_transformer"] == 1.0 for r in transformer)
    assert all(r["speed_vs_transformer"] > 0 for r in rows)


def test_generate_and_stage2_sections_rows():
    rows = bench.bench_generate("cpu", bench.torch.float32, reps=2, size="tiny", positions=[5, 20], rtf_seconds=0.5)
    for name in bench.GENERATE_MODELS:
        mine = [r for r in rows if r["model"] == name]
        assert [(r["mode"], r["position"]) for r in mine] == [("cache", 5), ("cache", 20), ("recompute", 5),
                                                             ("recompute", 20), ("generate 0.5 s, cfg 3", 38)]
        assert all(r["ms_per_step"] > 0 for r in mine) and mine[-1]["rtf"] > 0
    parts = bench.bench_stage2("cpu", bench.torch.float32, "tiny", seconds=0.5, steps=2)
    assert len(parts) == 4 and all(p["s_per_audio_s"] > 0 for p in parts[:3])
    assert parts[3]["s_per_audio_s"] == pytest.approx(parts[0]["s_per_audio_s"] - parts[1]["s_per_audio_s"])


def test_kernel_section_rows(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "cpu", {"mamba1": (1, 8, 4, 64), "mamba2": (1, 16, 8, 64)})
    rows = bench.bench_kernel("cpu", bench.torch.float32, reps=2)
    assert [(r["shape"], r["path"]) for r in rows] == [(s, p) for s in ("mamba1", "mamba2")
                                                       for p in ("reference", "pscan", "cpu path")]
    for r in rows:
        assert min(r["fwd_ms"], r["bwd_ms"], r["fwd_bwd_ms"]) > 0 and r["fwd_pct_peak"] is None  # no peak on CPU
        assert r["bwd_GBps"] > 0 and r["fwd_bwd_speedup"] > 0
    assert all(r["fwd_speedup"] == 1.0 for r in rows if r["path"] == "reference")
    assert bench.commit() is None or bench.commit().rstrip("+").isalnum()
