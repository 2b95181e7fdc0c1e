"""scan.py: every path (ssd_scan too) against the reference loop, in outputs, last state
and every gradient.

The Triton kernels run on CUDA when there is a GPU, else in Triton's interpreter (conftest.py),
which is slow: their cases are small. The CPU path is checked on a wider grid.
"""
import functools
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ssd_by_ref

import bench
import scan

ROOT = Path(__file__).resolve().parent.parent
GPU = torch.cuda.is_available()
TRITON_DEV = "cuda" if GPU else "cpu"
FLAGS = [  # (D, z, delta_bias, delta_softplus)
    (False, False, False, False),
    (True, True, True, True),
    (True, False, True, False),
    (False, True, False, True),
]


def make_inputs(batch, dim, L, N, G, dtype, flags, device="cpu", seed=0):
    """Random inputs in the ranges Mamba uses. G=None means B, C of shape (batch, N, L)."""
    has_D, has_z, has_bias, _ = flags
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, uniform=False, dt=dtype):
        t = torch.rand(*shape, generator=gen) if uniform else torch.randn(*shape, generator=gen)
        return (scale * t).to(device=device, dtype=dt)

    bc_shape = (batch, N, L) if G is None else (batch, G, N, L)
    return dict(
        u=rnd(batch, dim, L), delta=rnd(batch, dim, L, scale=0.5, uniform=True),
        A=rnd(dim, N, scale=-0.5, uniform=True, dt=torch.float32),
        B=rnd(*bc_shape), C=rnd(*bc_shape),
        D=rnd(dim, dt=torch.float32) if has_D else None,
        z=rnd(batch, dim, L) if has_z else None,
        delta_bias=rnd(dim, scale=0.5, uniform=True, dt=torch.float32) if has_bias else None)


def run(fn, inputs, softplus, seed=1, last_state=True):
    """Forward + backward of a loss that uses both out and last_state (only out if
    last_state=False, for a function without that output); returns out, last (or None), grads."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_()
              for k, v in inputs.items()}
    gen = torch.Generator().manual_seed(seed)
    if last_state:
        out, last = fn(**leaves, delta_softplus=softplus, return_last_state=True)
        loss = (last * torch.randn(last.shape, generator=gen).to(out.device)).sum()
    else:
        out, last, loss = fn(**leaves, delta_softplus=softplus), None, 0
    w_out = torch.randn(out.shape, generator=gen).to(out.device)
    (loss + (out.float() * w_out).sum()).backward()
    return out, last, {k: v.grad for k, v in leaves.items() if v is not None}


def assert_matches(fn, inputs, softplus, dtype):
    rtol, atol = (6e-4, 2e-3) if dtype == torch.float32 else (3e-2, 5e-2)  # as mamba_ssm's tests
    out, last, grads = run(fn, inputs, softplus)
    out_r, last_r, grads_r = run(scan.selective_scan_ref, inputs, softplus)
    assert out.dtype == out_r.dtype == inputs["u"].dtype
    torch.testing.assert_close(out, out_r, rtol=rtol, atol=atol)
    torch.testing.assert_close(last, last_r, rtol=rtol, atol=atol)
    assert grads.keys() == grads_r.keys()
    for k in grads:
        assert grads[k].dtype == inputs[k].dtype, k
        torch.testing.assert_close(grads[k], grads_r[k], rtol=2 * rtol, atol=2 * atol,
                                   msg=lambda m: f"d{k}: {m}")


# The CPU path: every L x N x dtype, each with one of the flag sets and B/C layouts in turn.
CPU_GRID = [(L, N, dtype, FLAGS[i % 4], [None, 2][i // 4 % 2])
            for i, (L, N, dtype) in enumerate(itertools.product(
                [1, 7, 64, 129, 1100], [1, 16, 128], [torch.float32, torch.bfloat16]))]
CPU_GRID += [(64, 16, torch.float32, flags, G) for flags in FLAGS for G in (None, 1, 2, 4)]


@pytest.mark.parametrize("L,N,dtype,flags,G", CPU_GRID)
def test_cpu_path_matches_reference(L, N, dtype, flags, G, monkeypatch):
    batch, dim = 2, 4
    # blocks of 32 steps, so long sequences cross many block boundaries
    monkeypatch.setattr(scan, "CPU_BLOCK_ELEMS", batch * dim * N * 32)
    assert_matches(scan.selective_scan_cpu, make_inputs(batch, dim, L, N, G, dtype, flags),
                   flags[3], dtype)


@pytest.mark.parametrize("G", [None, 2])
def test_cpu_path_one_A_per_channel(G, monkeypatch):
    """A channel with one A for all its N states (Mamba-2) gets (dim/G, 1) decays
    in the CPU path."""
    monkeypatch.setattr(scan, "CPU_BLOCK_ELEMS", 2 * 4 * 16 * 32)
    inputs = make_inputs(2, 4, 129, 16, G, torch.float32, FLAGS[1])
    inputs["A"] = inputs["A"][:, :1].expand(4, 16).contiguous()
    assert_matches(scan.selective_scan_cpu, inputs, True, torch.float32)


def test_cpu_path_block_size_does_not_change_results(monkeypatch):
    inputs = make_inputs(2, 4, 300, 16, 2, torch.float32, FLAGS[1])
    big = run(scan.selective_scan_cpu, inputs, True)
    monkeypatch.setattr(scan, "CPU_BLOCK_ELEMS", 2 * 4 * 16 * 16)
    small = run(scan.selective_scan_cpu, inputs, True)
    # only the order of float32 roundings changes; outputs and gradients reach about 50 here
    torch.testing.assert_close(big, small, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("L,G,flags",
                         [(64, None, FLAGS[1]), (37, 2, FLAGS[2]), (1, None, FLAGS[3])])
def test_bench_pscan_matches_reference(L, G, flags):
    """bench.py's pscan baseline computes the same scan, outputs and gradients
    (so its timing is fair)."""
    inputs = make_inputs(2, 4, L, 16, G, torch.float32, flags)
    out, _, grads = run(bench.selective_scan_pscan, inputs, flags[3], last_state=False)
    out_r, _, grads_r = run(scan.selective_scan_ref, inputs, flags[3], last_state=False)
    torch.testing.assert_close(out, out_r, rtol=6e-4, atol=2e-3)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_r[k], rtol=1e-3, atol=4e-3,
                                   msg=lambda m: f"d{k}: {m}")


def test_cpu_path_gradcheck_float64():
    inputs = make_inputs(2, 4, 21, 3, 2, torch.float64, FLAGS[1])
    inputs = {k: v.double().requires_grad_() for k, v in inputs.items()}
    keys = list(inputs)

    def f(*args):
        out, last = scan.selective_scan_cpu(**dict(zip(keys, args)), delta_softplus=True,
                                            return_last_state=True)
        return out, last

    assert torch.autograd.gradcheck(f, tuple(inputs.values()), eps=1e-6, atol=1e-5, rtol=1e-4)


# The Triton kernels: each value of the grid appears at least once, on shapes the
# interpreter can afford.
TRITON_GRID = [  # batch, dim, L, N, G, dtype, flags
    (2, 4, 1, 16, None, torch.float32, FLAGS[1]),
    (1, 4, 7, 16, 2, torch.float32, FLAGS[0]),
    (1, 2, 64, 16, None, torch.float32, FLAGS[2]),
    (1, 2, 129, 16, 2, torch.float32, FLAGS[3]),
    (1, 2, 129, 16, 2, torch.float32, FLAGS[1]),
    (1, 1, 1100, 1, None, torch.float32, FLAGS[1]),
    (1, 2, 300, 1, 2, torch.float32, FLAGS[2]),
    (1, 1, 7, 128, None, torch.float32, FLAGS[1]),
    (1, 2, 20, 128, 2, torch.float32, FLAGS[3]),
    (2, 2, 37, 16, 2, torch.bfloat16, FLAGS[1]),
    (1, 2, 64, 1, None, torch.bfloat16, FLAGS[0]),
    (1, 1, 7, 128, None, torch.bfloat16, FLAGS[2]),
    (1, 6, 33, 4, 3, torch.float32, FLAGS[1]),  # groups of 2 channels, odd N
]


@pytest.mark.parametrize("batch,dim,L,N,G,dtype,flags", TRITON_GRID)
def test_triton_matches_reference(batch, dim, L, N, G, dtype, flags):
    inputs = make_inputs(batch, dim, L, N, G, dtype, flags, device=TRITON_DEV)
    assert_matches(scan.selective_scan_triton, inputs, flags[3], dtype)


@pytest.mark.parametrize("path", ["cpu", "triton"])
def test_very_long_sequence_forward(path):
    """L = 10k+: the forward and the last state stay exact over many chunks."""
    device = TRITON_DEV if path == "triton" else "cpu"
    fn = scan.selective_scan_triton if path == "triton" else scan.selective_scan_cpu
    inputs = make_inputs(1, 1, 10_007, 2, None, torch.float32, FLAGS[1], device=device)
    with torch.no_grad():
        out, last = fn(**inputs, delta_softplus=True, return_last_state=True)
        out_r, last_r = scan.selective_scan_ref(**inputs, delta_softplus=True,
                                                return_last_state=True)
    torch.testing.assert_close(out, out_r, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_r, rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("path", ["cpu", "triton"])
def test_mamba2_heads_broadcast(path):
    """Mamba-2: per-head scalar A and dt broadcast over the head's channels
    (8 heads x 16, N=16, G=1)."""
    heads, headdim, N, L, batch = 8, 16, 16, 12 if path == "triton" else 100, 1
    dim = heads * headdim
    device = TRITON_DEV if path == "triton" else "cpu"
    fn = scan.selective_scan_triton if path == "triton" else scan.selective_scan_cpu
    gen = torch.Generator().manual_seed(0)
    leaf = dict(A_head=-torch.rand(heads, generator=gen) * 4 - 1,
                dt_head=torch.randn(batch, heads, L, generator=gen),
                dt_bias=torch.rand(heads, generator=gen),
                x=torch.randn(batch, dim, L, generator=gen),
                B=torch.randn(batch, 1, N, L, generator=gen),
                C=torch.randn(batch, 1, N, L, generator=gen),
                D=torch.randn(heads, generator=gen))

    def go(f):
        p = {k: v.to(device).requires_grad_() for k, v in leaf.items()}
        per_channel = lambda t: t.repeat_interleave(headdim, dim=-2 if t.dim() == 3 else 0)
        out, last = f(p["x"], per_channel(p["dt_head"]),
                      per_channel(p["A_head"])[:, None].expand(dim, N),
                      p["B"], p["C"], D=per_channel(p["D"]), delta_bias=per_channel(p["dt_bias"]),
                      delta_softplus=True, return_last_state=True)
        (out.square().mean() + last.square().mean()).backward()
        return out, last, {k: v.grad for k, v in p.items()}

    out, last, grads = go(fn)
    out_r, last_r, grads_r = go(scan.selective_scan_ref)
    torch.testing.assert_close(out, out_r, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_r, rtol=6e-4, atol=2e-3)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_r[k], rtol=1e-3, atol=2e-3,
                                   msg=lambda m: f"d{k}: {m}")


def ssd_inputs(batch, L, heads, P, N, dtype, flags, seed=0):
    """Mamba-2's inputs for scan.ssd_scan: A, dt and dt_bias one per head."""
    has_D, has_z, has_bias, _ = flags
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g)).to(dt)

    return dict(x=rnd(batch, L, heads, P),
                dt=(0.5 * torch.rand(batch, L, heads, generator=g)).to(dtype),  # > 0
                A=-torch.rand(heads, generator=g) * 4 - 0.5, B=rnd(batch, L, N), C=rnd(batch, L, N),
                D=rnd(heads, dt=torch.float32) if has_D else None,
                z=rnd(batch, L, heads, P) if has_z else None,
                dt_bias=torch.rand(heads, generator=g) if has_bias else None)


# L, chunk_size, dtype, flags: whole chunks, a partial last chunk, L < one chunk, L = 1
SSD_GRID = [
    (64, 16, torch.float32, FLAGS[1]), (100, 32, torch.float32, FLAGS[0]),
    (21, 64, torch.float32, FLAGS[2]), (1, 8, torch.float32, FLAGS[3]),
    (300, 64, torch.float32, FLAGS[1]), (75, 16, torch.bfloat16, FLAGS[1]),
    (50, 16, torch.float16, FLAGS[2]),
]


def ssd_run(fn, inputs, flags, device="cpu", **kw):
    """fn's output, last state and the gradients of every input under one random projection of the
    two outputs, computed on `device`, returned on the CPU."""
    leaves = {k: None if v is None else v.detach().to(device).requires_grad_()
              for k, v in inputs.items()}
    out, last = fn(**leaves, dt_softplus=flags[3], return_last_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    loss = (out.float().cpu() * torch.randn(out.shape, generator=g)).sum()
    (loss + (last.cpu() * torch.randn(last.shape, generator=g)).sum()).backward()
    return out.cpu(), last.cpu(), {k: v.grad.cpu() for k, v in leaves.items() if v is not None}


SSD_PATHS = {"torch": scan.ssd_scan_torch, "triton": scan.ssd_scan_triton}
# the kernels on the GPU, or in the interpreter without one
SSD_DEVICE = {"torch": "cpu", "triton": TRITON_DEV}


@pytest.mark.parametrize("path", SSD_PATHS)
@pytest.mark.parametrize("L,chunk_size,dtype,flags", SSD_GRID)
def test_ssd_matches_reference(path, L, chunk_size, dtype, flags):
    """ssd_scan's two paths (the Triton kernels in the interpreter without a GPU; they need chunks
    of 16 or more) against the reference loop (A, dt, bias repeated over each head's channels):
    output, last state and every gradient."""
    inputs = ssd_inputs(2, L, 4, 8, 16, dtype, flags)
    chunk_size = max(chunk_size, 16) if path == "triton" else chunk_size
    out, last, grads = ssd_run(functools.partial(SSD_PATHS[path], chunk_size=chunk_size), inputs,
                               flags, SSD_DEVICE[path])
    out_r, last_r, grads_r = ssd_run(ssd_by_ref, inputs, flags)
    rtol, atol = {torch.float32: (6e-4, 2e-3), torch.float16: (1e-2, 2e-2),
                  torch.bfloat16: (3e-2, 5e-2)}[dtype]
    assert out.dtype == dtype and last.dtype == torch.float32 and last.is_contiguous()
    torch.testing.assert_close(out, out_r, rtol=rtol, atol=atol)
    torch.testing.assert_close(last, last_r, rtol=rtol, atol=atol)
    for k in grads:
        assert grads[k].dtype == inputs[k].dtype, k
        torch.testing.assert_close(grads[k], grads_r[k], rtol=2 * rtol, atol=2 * atol,
                                   msg=lambda m: f"d{k}: {m}")


@pytest.mark.parametrize("path", SSD_PATHS)
def test_ssd_initial_state_continues_a_scan(path):
    """A scan cut in two, the second half starting from the first half's last state, is the whole
    scan: output, last state, and every gradient (the initial state's included, which reaches the
    first half through it)."""
    fn = functools.partial(SSD_PATHS[path], chunk_size=16)
    flags = FLAGS[1]
    inputs = ssd_inputs(2, 90, 4, 8, 16, torch.float32, flags)
    out, last, grads = ssd_run(fn, inputs, flags, SSD_DEVICE[path])

    def halves(x, dt, A, B, C, D, z, dt_bias, **kw):
        first = {k: v[:, :37] for k, v in dict(x=x, dt=dt, B=B, C=C, z=z).items()}
        second = {k: v[:, 37:] for k, v in dict(x=x, dt=dt, B=B, C=C, z=z).items()}
        y1, h = fn(**first, A=A, D=D, dt_bias=dt_bias, **kw)
        y2, last = fn(**second, A=A, D=D, dt_bias=dt_bias, initial_state=h, **kw)
        return torch.cat([y1, y2], 1), last
    out_h, last_h, grads_h = ssd_run(halves, inputs, flags, SSD_DEVICE[path])
    torch.testing.assert_close(out_h, out, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last_h, last, rtol=6e-4, atol=2e-3)
    for k in grads:
        torch.testing.assert_close(grads_h[k], grads[k], rtol=1e-3, atol=4e-3,
                                   msg=lambda m: f"d{k}: {m}")


@pytest.mark.parametrize("path", SSD_PATHS)
def test_ssd_decays_near_zero_and_near_one(path):
    """A long sequence whose steps mix large dt * |A| (the state all but forgotten within a step)
    with tiny dt (kept for thousands of steps): output, last state and every gradient against the
    reference loop."""
    flags = FLAGS[1]
    inputs = ssd_inputs(1, 1500, 2, 16, 16, torch.float32, flags)
    g = torch.Generator().manual_seed(2)
    big = torch.rand(1, 1500, 2, generator=g) < 0.3
    # softplus: ~8 or ~1e-4
    inputs["dt"] = torch.where(big, 8.0, -9.0) + torch.rand(1, 1500, 2, generator=g)
    inputs["dt_bias"] = torch.zeros(2)
    out, last, grads = ssd_run(functools.partial(SSD_PATHS[path], chunk_size=64), inputs, flags,
                               SSD_DEVICE[path])
    out_r, last_r, grads_r = ssd_run(ssd_by_ref, inputs, flags)
    torch.testing.assert_close(out, out_r, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last, last_r, rtol=6e-4, atol=2e-3)
    for k in grads:
        torch.testing.assert_close(grads[k], grads_r[k], rtol=2e-3, atol=5e-3,
                                   msg=lambda m: f"d{k}: {m}")


@pytest.mark.parametrize("path", SSD_PATHS)
def test_ssd_very_long_sequence(path):
    """L = 10k+ (157 chunks): the states pass through 157 chunks;
    output and last state stay exact."""
    p = ssd_inputs(1, 10_007, 2, 16, 8, torch.float32, FLAGS[1])
    with torch.no_grad():
        out, last = SSD_PATHS[path](**{k: v.to(SSD_DEVICE[path]) for k, v in p.items()},
                                    dt_softplus=True, return_last_state=True)
        out_r, last_r = ssd_by_ref(**p, dt_softplus=True, return_last_state=True)
    torch.testing.assert_close(out.cpu(), out_r, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last.cpu(), last_r, rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("path", SSD_PATHS)
def test_ssd_keeps_only_its_inputs_for_the_backward(path):
    """What autograd keeps for the backward is no more than the inputs (the Triton path: and dt
    once more, after softplus, in chunks): the chunk states are computed again (without that, in
    the PyTorch path, the chunk states and decay matrices: 9x more here, ~2.5 GB per layer at the
    paper's size)."""
    p = {k: v.to(SSD_DEVICE[path]).requires_grad_()
         for k, v in ssd_inputs(2, 256, 4, 16, 32, torch.float32, FLAGS[1]).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        out = SSD_PATHS[path](**p, dt_softplus=True)
    extra = p["dt"].numel() if path == "triton" else 0  # 256 steps: whole chunks, no padding
    assert 0 < sum(saved) <= sum(v.numel() for v in p.values()) + extra
    out.sum().backward()
    assert all(v.grad is not None for v in p.values())


def test_ssd_torch_path_differentiates_without_checkpointing():
    """The PyTorch SSD computation writes no tensor autograd needs in place, so autograd
    differentiates it even without activation checkpointing, to the same gradients. (Writes into
    one states tensor, under checkpointing, kept every training step's graph alive: about 100 MB
    more memory per step of tiny SiMBA.)"""
    g = torch.Generator().manual_seed(0)
    b, L, H, P, N = 2, 150, 3, 4, 8
    inputs = dict(x=torch.randn(b, L, H, P, generator=g), dt=torch.randn(b, L, H, generator=g) - 1,
                  A=-torch.rand(H, generator=g) - 0.5, B=torch.randn(b, L, N, generator=g),
                  C=torch.randn(b, L, N, generator=g), D=torch.rand(H, generator=g),
                  dt_bias=torch.rand(H, generator=g))
    grads = []
    for direct in (True, False):
        x = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        if direct:
            y = scan._ssd_chunks(x["x"], x["dt"], x["A"], x["B"], x["C"], x["D"], None,
                                 x["dt_bias"], True, 64, None)[0]
        else:
            y = scan.ssd_scan_torch(**x, dt_softplus=True)
        y.square().sum().backward()
        grads.append([v.grad for v in x.values()])
    for direct, checkpointed in zip(*grads):
        torch.testing.assert_close(direct, checkpointed)


def test_ssd_computes_in_float32_under_autocast():
    """Under bf16 autocast (train.py on a GPU) the chunk products stay float32:
    the same result as without."""
    inputs = ssd_inputs(1, 50, 2, 4, 8, torch.float32, FLAGS[1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = scan.ssd_scan(**inputs, dt_softplus=True, chunk_size=16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, scan.ssd_scan(**inputs, dt_softplus=True, chunk_size=16))


SSD_STEP_PATHS = {"torch": scan.ssd_step_torch, "triton": scan.ssd_step_triton}


@pytest.mark.parametrize("path", SSD_STEP_PATHS)
@pytest.mark.parametrize("P", [16, 36])
def test_ssd_step_continues_the_scan(path, P):
    """Mamba-2's generation step (the causal conv's ring state, silu, the state update) step by
    step over 14 positions gives the conv and ssd_scan over the whole sequence, in output and last
    state; the ring wraps around 3 times; headdim 36 leaves a partial tile in the kernel."""
    g = torch.Generator().manual_seed(0)
    batch, L, H, N, K = 2, 14, 3, 16, 4
    CH = H * P + 2 * N
    xBC, dt = torch.randn(batch, L, CH, generator=g), torch.randn(batch, L, H, generator=g) - 1
    w, wb = 0.5 * torch.randn(CH, K, generator=g), 0.1 * torch.randn(CH, generator=g)
    A, D, dt_bias = (-4 * torch.rand(H, generator=g) - 0.5, torch.rand(H, generator=g),
                     torch.rand(H, generator=g))
    u = F.silu(F.conv1d(xBC.transpose(1, 2), w[:, None], wb, padding=K - 1,
                        groups=CH)[..., :L]).transpose(1, 2)
    y_ref, last_ref = scan.ssd_scan(u[..., :H * P].unflatten(-1, (H, P)), dt, A,
                                    u[..., H * P:H * P + N], u[..., H * P + N:], D, None, dt_bias,
                                    dt_softplus=True, return_last_state=True)
    dev = SSD_DEVICE[path]
    state, conv = torch.zeros(batch, H, P, N, device=dev), torch.zeros(batch, CH, K, device=dev)
    ys = [SSD_STEP_PATHS[path](state, conv, xBC[:, t].to(dev), dt[:, t].to(dev), w.to(dev),
                               wb.to(dev), A.to(dev), D.to(dev), dt_bias.to(dev),
                               torch.tensor(t, device=dev))
          for t in range(L)]
    torch.testing.assert_close(torch.stack(ys, 1).cpu(), y_ref.flatten(2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.cpu(), last_ref, rtol=1e-4, atol=1e-4)
    slots = torch.arange(L - K, L) % K  # the ring holds the last K inputs, position t in slot t % K
    torch.testing.assert_close(conv.cpu()[..., slots], xBC[:, L - K:].transpose(1, 2))


@pytest.mark.parametrize("change,name", [
    (lambda p: p.update(x=p["x"][0]), "x"), (lambda p: p.update(dt=p["dt"][..., :-1]), "dt"),
    (lambda p: p.update(A=torch.ones(4, 16)), "A"), (lambda p: p.update(B=p["B"][:, None]), "B"),
    (lambda p: p.update(C=p["C"][:, :-1]), "C"), (lambda p: p.update(D=torch.ones(8)), "D"),
    (lambda p: p.update(z=p["x"][:, :-1]), "z"),
    (lambda p: p.update(dt_bias=torch.ones(4, 1)), "dt_bias"),
])
def test_ssd_bad_input_names_the_argument(change, name):
    p = ssd_inputs(2, 10, 4, 8, 16, torch.float32, FLAGS[1])
    change(p)
    with pytest.raises(ValueError, match=rf"^{name}: "):
        scan.ssd_scan(**p)


@pytest.mark.parametrize("path", ["cpu", "triton"])
@pytest.mark.parametrize("G,flags", [(None, FLAGS[1]), (2, FLAGS[0]), (4, FLAGS[2])])
def test_state_update_steps_equal_scan(path, G, flags):
    batch, dim, L, N = 2, 8, 9, 16
    device = TRITON_DEV if path == "triton" else "cpu"
    step = (scan.selective_state_update_triton if path == "triton"
            else scan.selective_state_update_cpu)
    p = make_inputs(batch, dim, L, N, G, torch.float32, flags, device=device)
    out_r, last_r = scan.selective_scan_ref(**p, delta_softplus=flags[3], return_last_state=True)
    state = torch.zeros(batch, dim, N, device=device)
    outs = []
    for t in range(L):
        outs.append(step(state, p["u"][..., t], p["delta"][..., t], p["A"], p["B"][..., t],
                         p["C"][..., t], D=p["D"], z=None if p["z"] is None else p["z"][..., t],
                         dt_bias=p["delta_bias"], dt_softplus=flags[3]))
    torch.testing.assert_close(torch.stack(outs, -1), out_r, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(state, last_r, rtol=6e-4, atol=2e-3)


def test_dispatch_by_device():
    """CPU tensors take the PyTorch paths (bitwise the same);
    CUDA tensors, where there are any, Triton."""
    p = make_inputs(1, 2, 5, 3, None, torch.float32, FLAGS[1])
    assert torch.equal(scan.selective_scan(**p, delta_softplus=True),
                       scan.selective_scan_cpu(**p, delta_softplus=True))
    q = ssd_inputs(1, 40, 2, 16, 16, torch.float32, FLAGS[1])
    assert torch.equal(scan.ssd_scan(**q, chunk_size=16), scan.ssd_scan_torch(**q, chunk_size=16))
    if GPU:  # model.py's Mamba-2 calls ssd_scan: on CUDA it trains on the Triton kernels
        p = make_inputs(1, 2, 5, 3, None, torch.float32, FLAGS[1], device="cuda")
        assert torch.equal(scan.selective_scan(**p), scan.selective_scan_triton(**p))
        q = {k: v.cuda() for k, v in q.items()}
        assert torch.equal(scan.ssd_scan(**q, chunk_size=16),
                           scan.ssd_scan_triton(**q, chunk_size=16))


BAD = [  # (change to the inputs, the argument the error must name)
    (lambda p: p.update(u=p["u"][0]), "u"),
    (lambda p: p.update(delta=p["delta"][:, :, :-1]), "delta"),
    (lambda p: p.update(A=p["A"][:-1]), "A"),
    # G=3 does not divide dim=8
    (lambda p: p.update(B=torch.randn(2, 3, 4, 16), C=torch.randn(2, 3, 4, 16)), "B"),
    (lambda p: p.update(C=p["C"][..., :-1]), "C"),
    (lambda p: p.update(D=torch.ones(3)), "D"),
    (lambda p: p.update(z=torch.ones(2, 8, 4)), "z"),
    (lambda p: p.update(delta_bias=torch.ones(8, 1)), "delta_bias"),
    (lambda p: p.update(delta=p["delta"].double()), "delta"),
    (lambda p: p.update(C=p["C"].half()), "C"),
    (lambda p: p.update(B=p["B"].to("meta")), "B"),
]


@pytest.mark.parametrize("fn", [scan.selective_scan_ref, scan.selective_scan_cpu,
                                scan.selective_scan_triton])
@pytest.mark.parametrize("change,name", BAD)
def test_bad_input_names_the_argument(fn, change, name):
    p = make_inputs(2, 8, 16, 4, 2, torch.float32, FLAGS[1])
    change(p)
    with pytest.raises(ValueError, match=rf"^{name}: "):
        fn(**p)


def test_bad_step_input_names_the_argument():
    p = make_inputs(2, 8, 1, 4, 2, torch.float32, FLAGS[0])
    state = torch.zeros(2, 8, 4)
    with pytest.raises(ValueError, match=r"^B: the number of groups G=3"):
        scan.selective_state_update_cpu(state, p["u"][..., 0], p["delta"][..., 0], p["A"],
                                        torch.ones(2, 3, 4), torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"^x: expected shape \(2, 8\)"):
        scan.selective_state_update(state, p["u"], p["delta"][..., 0], p["A"], p["B"][..., 0],
                                    p["C"][..., 0])


HOPPER_COMPILE = """
import contextlib, inspect, io, json, os, re, sys
# ptxas -v's report, never from the cache
os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
import scan, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
def build(kernel, consts, types, launch):
    # pointer types: the input dtype where types says "in", float64 for cdt, float32 for the rest
    ptr = {"in": types["in"], "f64": "*fp64", "i64": "*i64"}
    sig = {p: "constexpr" if p in consts
              else ptr.get(types.get(p), "*fp32") if p.endswith("_ptr") else "i32"
           for p in inspect.signature(kernel.fn).parameters}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        done = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options=launch)
    spills = sum(int(n) for n in re.findall(r"(\\d+) bytes spill (?:stores|loads)", log.getvalue()))
    regs = int(re.search(r"Used (\\d+) registers", log.getvalue()).group(1))
    print(json.dumps(dict(kernel=kernel.fn.__name__, dtype=types["in"], regs=regs,
                          spill_bytes=spills, shared=done.metadata.shared)))
FLAGS = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True)
for ptr in ("*fp32", "*bf16"):
    # the per-channel scan at Mamba-1's shape (d_inner 2048, d_state 16),
    # as selective_scan_triton tiles it
    tiles = dict(zip(("BLOCK_D", "BLOCK_N", "BLOCK_L"), scan._triton_tiles(2048, 1, 16, 2048)))
    scan_in = dict.fromkeys(("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "dout_ptr",
                             "du_ptr", "ddelta_ptr", "dz_ptr"), "in")
    build(scan._scan_fwd_kernel, dict(FLAGS, SAVE_STARTS=True, **tiles),
          dict(scan_in, **{"in": ptr}), scan.SCAN_LAUNCH)
    build(scan._scan_bwd_kernel, dict(FLAGS, HAS_DLAST=True, **tiles),
          dict(scan_in, **{"in": ptr}), scan.SCAN_LAUNCH)
    # the SSD kernels at the paper's Mamba-2 shape: headdim 64, d_state 512, chunks of 64
    P, N, Q = 64, 512, 64
    BLOCK_P, BLOCK_N = scan._ssd_tiles(P, N)
    tiles = dict(Q=Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, DOT="tf32x3" if ptr == "*fp32" else "tf32")
    ssd_in = dict(dict.fromkeys(("x_ptr", "z_ptr", "B_ptr", "C_ptr", "out_ptr", "dx_ptr",
                                 "other_ptr"), "in"),
                  cdt_ptr="f64", **{"in": ptr})
    for kernel, consts in ((scan._ssd_cb_kernel, dict(Q=Q, BLOCK_N=BLOCK_N, DOT=tiles["DOT"])),
                           (scan._ssd_states_kernel, dict(tiles, HAS_INIT=True)),
                           (scan._ssd_output_kernel, dict(tiles, HAS_D=True, HAS_Z=True)),
                           (scan._ssd_state_grad_kernel, dict(tiles, HAS_DLAST=True)),
                           (scan._ssd_intra_grad_kernel,
                            dict(HAS_D=True, Q=Q, BLOCK_P=BLOCK_P, DOT=tiles["DOT"])),
                           (scan._ssd_inter_grad_kernel, tiles)):
        build(kernel, consts, ssd_in, scan.SSD_LAUNCH)
    build(scan._ssd_bc_grad_kernel, dict(tiles, FOR_B=True), dict(ssd_in, u_ptr="in"),
          scan.SSD_LAUNCH)  # u = x
    build(scan._ssd_bc_grad_kernel, dict(tiles, FOR_B=False), ssd_in,
          scan.SSD_LAUNCH)  # u = dy, float32
# one generation step at the paper's d_inner and d_state: Mamba-1's per channel,
# Mamba-2's with the conv
build(scan._state_update_kernel, dict(FLAGS, BLOCK_D=4, BLOCK_N=512), {"in": "*fp32"}, {})
for ptr in ("*fp32", "*bf16"):
    step_in = dict.fromkeys(("conv_ptr", "xBC_ptr", "dt_ptr", "w_ptr", "wb_ptr", "y_ptr"), "in")
    sig_types = dict(step_in, pos_ptr="i64", **{"in": ptr})
    build(scan._ssd_step_kernel, dict(K=4, BLOCK_P=8, BLOCK_N=512), sig_types, {})
"""
H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90


def test_triton_kernels_compile_for_hopper_without_spills():
    """The interpreter runs the kernels' Python; this compiles them the way a GPU will, through
    Triton's CUDA backend and the ptxas in its wheel, to sm_90 (H100/H200) machine code, at the
    shapes the models use and with the launch settings scan.py uses, in float32 and bfloat16, and
    reads ptxas's report: no kernel may spill registers to local memory or ask for more shared
    memory than an H100 has. No GPU is needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(report) == 2 * (2 + 8) + 1 + 2
    print("\n".join(f"{k['kernel']:24} {k['dtype']:6} {k['regs']:4} registers, "
                    f"{k['spill_bytes']} bytes spilled, "
                    f"{k['shared']:7} bytes of shared memory"
                    for k in report))  # shown with pytest -s
    for k in report:
        assert k["spill_bytes"] == 0 and k["shared"] <= H100_SHARED_BYTES and k["regs"] <= 255, k
