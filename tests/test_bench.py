"""bench.py's train, generate, stage2 and prepare sections on tiny shapes: every row is there and
its numbers are sane.
(The kernel section's baselines are checked against the reference in test_scan.py.)"""
import pytest

import bench
import scan


def test_train_section_rows():
    rows = bench.bench_train("cpu", reps=1, size="tiny", seconds=0.5, multiples=(1, 2))
    assert [(r["model"], r["seconds"]) for r in rows] == [(m, s) for m in bench.TRAIN_MODELS
                                                          for s in (0.5, 1.0)]
    for r in rows:
        assert r["positions"] == round(r["seconds"] * 75) + 3  # frames + K - 1 delayed positions
        assert (r["ms_per_step"] > 0
                and r["tokens_per_s"] == pytest.approx(r["positions"] / r["ms_per_step"] * 1e3))
        assert r["mfu_pct"] is None and r["peak_mem_GB"] is None  # CUDA only
    transformer = [r for r in rows if r["model"].endswith("transformer")]
    assert all(r["speed_vs_transformer"] == 1.0 for r in transformer)
    assert all(r["speed_vs_transformer"] > 0 for r in rows)


def test_generate_and_stage2_sections_rows():
    rows = bench.bench_generate("cpu", bench.torch.float32, reps=2, size="tiny", positions=[5, 20],
                                rtf_seconds=0.5, window=3)
    for name in bench.GENERATE_MODELS:
        mine = [r for r in rows if r["model"] == name]
        assert [(r["mode"], r["position"]) for r in mine] == [("cache", 5), ("cache", 20),
                                                             ("ops per layer step", None),
                                                             ("recompute", 5), ("recompute", 20),
                                                             ("generate 0.5 s, cfg 3", 38)]
        timed = [r for r in mine if r["mode"] != "ops per layer step"]
        assert all(r["ms_per_step"] > 0 for r in timed) and mine[-1]["rtf"] > 0
        assert 5 <= mine[2]["ops"] <= 15  # the bound for one layer's step
    parts = bench.bench_stage2("cpu", bench.torch.float32, "tiny", seconds=0.5, steps=2)
    assert len(parts) == 4 and all(p["s_per_audio_s"] > 0 for p in parts[:3])
    assert parts[3]["s_per_audio_s"] == pytest.approx(parts[0]["s_per_audio_s"]
                                                      - parts[1]["s_per_audio_s"])


def test_prepare_section_rows():
    """(The bound itself, a block against a whole file, is test_prepare.py's: here the file is 3
    blocks long.)"""
    # a 3-minute recording: 61 MiB decoded to float32 stereo
    rows = bench.bench_prepare("cpu", hours=3 / 60)
    assert [r["what"].split(" (")[0].split(",")[0] for r in rows] == [
        "imports only", "decode whole + resample", "prepare.read_clips",
        "decode whole + resample + encode", "python prepare.py", "python prepare.py",
        "python prepare.py --batch_size=2"]
    imports, whole, blocks, before, short, long, _ = (r["peak_rss_MiB"] for r in rows)
    assert (whole - imports > 50 and imports < blocks < whole < before
            and imports < short and imports < long)
    assert all(r["seconds"] > 0 and r["system_s"] >= 0 for r in rows)


def test_kernel_section_rows(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "cpu", {"mamba1": (1, 8, 4, 64), "mamba2": (1, 16, 8, 64)})
    monkeypatch.setitem(bench.STEP_SHAPE, "cpu", (2, 16, 8))
    monkeypatch.setitem(bench.SSD_SHAPE, "cpu", (1, 100, 2, 16, 16))
    rows = bench.bench_kernel("cpu", bench.torch.float32, reps=2)
    paths = ["reference", "pscan", "cpu path"]
    assert [(r["shape"], r["path"]) for r in rows] == (
        [("mamba1", p) for p in paths] + [("mamba2", p) for p in paths]
        + [("mamba2", "ssd"), ("ssd 2x16", "ssd torch"), ("step", "cpu path")])
    for r in rows[:-1]:
        assert (min(r["fwd_ms"], r["bwd_ms"], r["fwd_bwd_ms"]) > 0
                and r["fwd_pct_peak"] is None)  # no peak on CPU
        assert r["bwd_GBps"] > 0 and r["fwd_bwd_speedup"] > 0
    assert (rows[-1]["fwd_ms"] > 0 and rows[-1]["fwd_GBps"] > 0
            and rows[-1]["bwd_ms"] is None)  # a step has no backward
    assert all(r["fwd_speedup"] == 1.0 for r in rows if r["path"] == "reference")
    assert bench.commit() is None or bench.commit().rstrip("+").isalnum()


def test_ssd_row_computes_our_function():
    """The kernel section's "ssd" row runs scan.ssd_scan on the Mamba-2 inputs through bench.py's
    layout conversion: the same output and input gradients as the reference loop."""
    torch = bench.torch
    x = bench.scan_inputs(2, 16, 8, 50, "cpu", torch.float32, heads=4)
    dout = torch.randn(2, 16, 50)
    grads = []
    for fn in (scan.selective_scan_ref, bench.heads_layout(scan.ssd_scan, 4, chunk_size=16)):
        for v in x.values():
            v.grad = None
        out = fn(**x, delta_softplus=True)
        out.backward(dout)
        grads.append([out.detach()] + [x[k].grad.clone() for k in ("u", "z", "B", "C")])
    for mine, ref in zip(*grads):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4)


GPU = bench.torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


@pytest.fixture
def mamba_ssm_kernels(monkeypatch):
    """mamba_ssm's Triton kernels, on the GPU, or without one in Triton's interpreter (conftest.py):
    there its launchers enter torch.cuda.device(...), a no-op here, one backward launcher sizes its
    grid by the GPU's multiprocessor count (1 here), and its autotuner would time candidate configs
    on a GPU, so it keeps the first. mamba_ssm comes from its source without the CUDA extension
    (.ci/run installs it so)."""
    import contextlib
    import types
    import triton.runtime.autotuner as autotuner
    kernels = bench.import_mamba_ssm()
    assert kernels, "mamba_ssm is not installed: see .ci/run for the pip line"
    if not GPU:
        monkeypatch.setattr(bench.torch.cuda, "device", lambda index: contextlib.nullcontext())
        monkeypatch.setattr(bench.torch.cuda, "get_device_properties",
                            lambda d: types.SimpleNamespace(multi_processor_count=1))
        prune = autotuner.Autotuner.prune_configs
        monkeypatch.setattr(autotuner.Autotuner, "prune_configs",
                            lambda self, kwargs: prune(self, kwargs)[:1])
    return kernels


def test_mamba_ssm_rows_compute_our_function(mamba_ssm_kernels):
    """The kernel section's mamba_ssm rows time the same computation as ours: its chunked scan on
    the Mamba-2 inputs (through bench.py's layout conversion) against scan.selective_scan_ref,
    output and every gradient (A, delta and delta_bias are one per head: the reference's summed over
    the head's channels), and its one-step update against scan.selective_state_update."""
    torch = bench.torch
    # looser on the GPU, where its matmuls may use TF32
    tol = dict(rtol=1e-4, atol=1e-4) if not GPU else dict(rtol=1e-2, atol=1e-2)
    batch, dim, N, L, heads = 2, 16, 8, 80, 4
    x = bench.scan_inputs(batch, dim, N, L, DEV, torch.float32, heads=heads)
    dout = torch.randn(batch, dim, L).to(DEV)
    grads = {}
    for name, fn in (("ref", scan.selective_scan_ref),
                     ("theirs", bench.mamba_ssm_scan(heads, chunk_size=32))):
        for v in x.values():  # chunk_size 32: 3 chunks, the last one partial
            v.grad = None
        out = fn(**x, delta_softplus=True)
        out.backward(dout)
        grads[name] = dict(out=out.detach(), **{k: v.grad.clone() for k, v in x.items()})
    ref, theirs = grads["ref"], grads["theirs"]
    for k in ("out", "u", "z", "B", "C"):
        torch.testing.assert_close(theirs[k], ref[k], **tol, msg=k)

    def per_head(g, d):  # summed over each head's channels along dim d
        return g.unflatten(d, (heads, -1)).sum(d + 1)

    torch.testing.assert_close(per_head(theirs["delta"], 1), per_head(ref["delta"], 1), **tol)
    for k in ("delta_bias", "D"):
        torch.testing.assert_close(per_head(theirs[k], 0), per_head(ref[k], 0), **tol, msg=k)
    torch.testing.assert_close(per_head(theirs["A"], 0)[:, 0], per_head(ref["A"], 0).sum(-1), **tol)

    # the "ssd" rows' mamba_ssm: its scan in its own layout, against ours, output and every gradient
    p = {k: v.to(DEV).requires_grad_() for k, v in dict(
        x=torch.randn(2, 80, 4, 16), dt=torch.randn(2, 80, 4) - 1, A=-torch.rand(4) - 0.5,
        B=torch.randn(2, 80, 16), C=torch.randn(2, 80, 16), D=torch.rand(4),
        dt_bias=torch.rand(4)).items()}
    results, dout = [], torch.randn(2, 80, 4, 16).to(DEV)
    for fn in (bench.mamba_ssm_ssd(chunk_size=32), scan.ssd_scan):
        for v in p.values():
            v.grad = None
        out = fn(**p, dt_softplus=True)
        out.backward(dout)
        results.append([out.detach()] + [v.grad.clone() for v in p.values()])
    for name, theirs, ours in zip(["out", *p], *results):
        torch.testing.assert_close(theirs, ours, **tol, msg=name)

    a, b = (bench.step_inputs(2, 32, 16, DEV, torch.float32) for _ in range(2))
    out = mamba_ssm_kernels["step"](**a, dt_softplus=True)
    torch.testing.assert_close(out, scan.selective_state_update(**b, dt_softplus=True), **tol)
    torch.testing.assert_close(a["state"], b["state"], **tol)
