"""Speed, measured: prints a Markdown table and writes the numbers as JSON.

    python bench.py                     # kernel section on CPU: reference loop vs pscan vs CPU path
    python bench.py --device=cuda       # + the Triton kernels, with GB/s and % of HBM bandwidth
    python bench.py --section=train     # an optimizer step per paper variant, 30/60/120 s of tokens
    python bench.py --section=generate  # ms per generated step, cached vs recomputed
                                        # (--size=paper on a GPU)
    python bench.py --section=stage2    # two-stage design: stage 2 cost vs the LM's extra codebooks
    python bench.py --section=all       # the four above
    python bench.py --section=prepare   # peak memory of preparing an hour-long recording (--hours)

kernel: forward, backward and forward+backward time of the selective scan at a Mamba-1 shape and a
Mamba-2 shape (the paper-scale shapes on CUDA; smaller ones on CPU, printed in the table).
On CPU a third baseline, "pscan", is the scan as mamba.py does it: exp(delta A) and delta B u
materialized whole as (batch, dim, L, N) tensors and scanned with a Blelloch parallel scan in
pure PyTorch. The CPU path's bar is to beat it at forward+backward.
GB/s counts the bytes a scan must move at the least, each tensor read or written once:
forward reads u, delta, z, B, C and writes out; the backward reads them and dout again and
writes du, ddelta, dz, dB, dC. Nothing (batch, dim, L, N)-sized is counted: no path needs it.
At the Mamba-2 shape (one A and delta per head), "ssd" is scan.ssd_scan, the chunked matrix-product
form that model.py's Mamba-2 runs, with the layout conversion timed in. The "ssd" shape is Mamba-2's
scan in its own layout at one layer of the paper's Prefix SiMBA (CUDA; the tiny models' layer on
CPU): the PyTorch path, our Triton kernels and mamba_ssm's, in float32 and bfloat16.
The "step" rows time one generation step (scan.selective_state_update) at prefix_simba's shape.
On CUDA, where mamba_ssm is installed (its sources are enough: see the README), its Triton kernels
run beside ours ("mamba_ssm" rows): the chunked scan (mamba_chunk_scan_combined) on the Mamba-2
shape, whose inputs have one A, delta and bias per head as Mamba-2 has them, and
selective_state_update on the step.

train: one optimizer step (forward, backward, AdamW; bf16 autocast on CUDA, as train.py) of each
paper variant on one crop of 30 s of tokens plus the text prefix, and of 2x and 4x that: tokens/s,
MFU and peak memory (CUDA), and the speed relative to the Transformer with the same conditioning.
SSM cost grows linearly with length, attention's quadratically.

generate: milliseconds per generated step of prefix_simba and prefix_transformer (configs/, shrunk
by configs/tiny.py unless --size=paper) at given positions, for one caption with classifier-free
guidance (a batch of 2 rows): with the decoding state (the SSM's fixed-size state, attention's KV
cache; the median of 100 steps from each position), run eagerly and, on CUDA, replayed from a CUDA
graph; and by running the whole sequence again at every step, as the paper's official implementation
does. Also the kernels one decoding step of a layer launches (CUDA; on CPU the operators that
compute, the proxy), and the real-time factor of generating 30 s for one caption (compute seconds
per second of audio, codec decoding not included).

stage2: seconds of compute per second of audio (batch 1, 10 s): the stage-2 diffusion model at 25
steps, and the single-stage LM's cost of writing codebooks 1..3 itself (prefix_simba minus
two_stage_simba).

prepare: peak memory (RSS) and system seconds of reading an hour-long 44.1 kHz stereo recording
whole as before and in prepare.py's blocks, and of the whole `python prepare.py` run on it, each in
its own process.
"""
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from tqdm import tqdm

import model
import scan
from configurator import configure
from data import FRAME_RATE, SAMPLE_RATE, atomic_write, keep_freed_memory
from prepare import encode_batch_size
from stage2 import Stage2Config, Stage2Diffusion
from synth import synth_song

# peak memory bandwidth in GB/s, from the vendors' data sheets, by device name
PEAK_GBPS = {"H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900,
             "H200": 4800, "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935,
             "RTX 3090": 936, "RTX 4090": 1008, "L40S": 864}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12,
              "RTX 3090": 71e12}  # dense bf16 tensor-core peaks by device name, for MFU

# name: (batch, dim, N, L); Mamba-2's dim is HEADS x headdim (8 x 64; on CPU 8 x 16, the tiny
# models' Mamba-2) with its per-head A, dt broadcast
SHAPES = {
    "cuda": {"mamba1": (8, 2048, 16, 2048), "mamba2": (8, 512, 128, 2048)},
    "cpu": {"mamba1": (1, 64, 16, 2048), "mamba2": (1, 128, 16, 2048)},
}
HEADS = 8
STEP_SHAPE = {"cuda": (2, 2048, 512), "cpu": (2, 512, 128)}  # (batch, dim, N) of a generation step
# Mamba-2's scan in its own layout, (batch, L, heads, headdim, N): on CUDA one layer of the paper's
# Prefix SiMBA at batch 4 x 30 s (2250 frames + 3 delay steps + 64 text tokens), on CPU the tiny
# models' layer at 2048 steps
SSD_SHAPE = {"cuda": (4, 2317, 32, 64, 512), "cpu": (1, 2048, 8, 16, 16)}


def machine(device):
    """A line naming the machine, for the table and the JSON."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                 if l.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {torch.get_num_threads()} threads"


def commit():
    """The checkout's commit, with '+' if it has uncommitted changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)
        return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def peak_gbps(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def peak_flops():
    """The bf16 peak of this process's CUDA device, or None (a CPU, or a GPU not in PEAK_FLOPS)."""
    if not torch.cuda.is_available():
        return None
    return next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None)


def elapsed(fn, device):
    """Seconds one call of fn() takes (waiting for the GPU to finish)."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def timeit(fn, device, reps):
    """Median seconds of fn() over reps runs, after one warm-up run."""
    fn()
    return statistics.median(elapsed(fn, device) for _ in range(reps))


def time_scan(scan_fn, dout, device, reps):
    """Median seconds of a scan's forward (no graph), its backward alone (on a fresh forward graph
    each time, untimed) and forward + backward; scan_fn() runs the forward."""
    def fwd():
        with torch.no_grad():
            scan_fn()

    def bwd():
        times = []
        for _ in range(reps + 1):
            out = scan_fn()
            times.append(elapsed(lambda: out.backward(dout), device))
        return statistics.median(times[1:])

    return timeit(fwd, device, reps), bwd(), timeit(lambda: scan_fn().backward(dout), device, reps)


def _blelloch_(a, x, reverse=False):
    """In place: x_t <- h_t = a_t * h_{t-1} + x_t (h_{-1} = 0) along dim 2 of (batch, dim, L, N)
    tensors.

    reverse=True scans from the end instead: h_t = a_t * h_{t+1} + x_t. L must be a power of two;
    a is overwritten. Blelloch's two sweeps over a binary tree of the steps, 2 log2(L) loops:
    the up-sweep combines neighbouring spans (stride 1, 2, 4, ...) so that the last step of each
    span holds the scan of its span, with a holding the span's total decay; the down-sweep
    (stride ..., 2, 1) then completes the first step of every span from the span before it.
    """
    L = x.shape[2]
    first, second = (1, 0) if reverse else (0, 1)  # the two halves of a span, in scan order

    # the last step (in scan order) of each span of s steps, paired: (batch, dim, L / 2s, 2, N)
    def spans(t, s):
        return (t[:, :, ::s] if reverse else t[:, :, s - 1::s]).unflatten(2, (-1, 2))

    s = 1
    while s < L:  # up-sweep
        ap, xp = spans(a, s), spans(x, s)
        xp[:, :, :, second].addcmul_(ap[:, :, :, second], xp[:, :, :, first])
        ap[:, :, :, second] *= ap[:, :, :, first]
        s *= 2
    todo, done = (slice(None, -1), slice(1, None)) if reverse else (slice(1, None), slice(None, -1))
    s = L // 2
    while s >= 1:  # down-sweep: the first half of every span needs the state entering the span
        ap, xp = spans(a, s), spans(x, s)
        xp[:, :, todo, first].addcmul_(ap[:, :, todo, first], xp[:, :, done, second])
        s //= 2


class _PScan(torch.autograd.Function):
    """h = the scan of h_t = a_t * h_{t-1} + x_t over (batch, dim, L, N) tensors, L a power of 2."""

    @staticmethod
    def forward(ctx, a, x):
        h = x.clone()
        _blelloch_(a.clone(), h)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h = ctx.saved_tensors
        # the adjoint g_t = dL/dx_t runs backwards: g_t = dh_t + a_{t+1} g_{t+1}
        g = dh.clone()
        _blelloch_(F.pad(a[:, :, 1:], (0, 0, 0, 1)), g, reverse=True)
        da = torch.zeros_like(a)  # dL/da_t = g_t h_{t-1}
        torch.mul(g[:, :, 1:], h[:, :, :-1], out=da[:, :, 1:])
        return da, g


def selective_scan_pscan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan as mamba.py does it: whole (batch, dim, L, N) tensors, a Blelloch scan.

    Same arguments as scan.selective_scan (float32); autograd does the backward of everything but
    the scan itself.
    """
    batch, dim, L = u.shape
    G, N = (1 if B.dim() == 3 else B.shape[1]), A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B, C = (t.reshape(batch, G, 1, N, L).transpose(-1, -2) for t in (B, C))  # (batch, G, 1, L, N)
    a = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # (batch, dim, L, N)
    x = ((delta * u).reshape(batch, G, dim // G, L, 1) * B).reshape(batch, dim, L, N)
    pad = 2 ** math.ceil(math.log2(L)) - L  # zero steps after the end change nothing before it
    if pad:
        a, x = F.pad(a, (0, 0, 0, pad)), F.pad(x, (0, 0, 0, pad))
    hs = _PScan.apply(a, x)[:, :, :L]  # (batch, dim, L, N)
    y = (hs.reshape(batch, G, dim // G, L, N) * C).sum(-1).reshape(batch, dim, L)
    if D is not None:
        y = y + D[:, None] * u
    return y if z is None else y * F.silu(z)


def scan_inputs(batch, dim, N, L, device, dtype, heads=None):
    """Inputs of a Mamba block's scan: D, z, delta_bias and softplus on, B and C shared by all
    channels. With heads (Mamba-2), A, delta and delta_bias are one per head, repeated over the
    head's channels."""
    g = torch.Generator().manual_seed(0)
    per = 1 if heads is None else dim // heads  # channels that share an A, delta and bias
    A = (-torch.rand(dim // per, N if heads is None else 1, generator=g)
         .repeat_interleave(per, 0).expand(dim, N) - 0.5)
    x = dict(u=torch.randn(batch, dim, L, generator=g),
             delta=(torch.randn(batch, dim // per, L, generator=g) - 3).repeat_interleave(per, 1),
             B=torch.randn(batch, 1, N, L, generator=g), C=torch.randn(batch, 1, N, L, generator=g),
             z=torch.randn(batch, dim, L, generator=g))
    x = {k: v.to(device, dtype) for k, v in x.items()}
    x.update(A=A.contiguous().to(device), D=torch.ones(dim, device=device),
             delta_bias=torch.rand(dim // per, generator=g).repeat_interleave(per).to(device))
    return {k: v.requires_grad_() for k, v in x.items()}


def step_inputs(batch, dim, N, device, dtype):
    """Inputs of one generation step of a Mamba block (scan.selective_state_update), as in
    scan_inputs."""
    g = torch.Generator().manual_seed(0)
    x = dict(x=torch.randn(batch, dim, generator=g), dt=torch.randn(batch, dim, generator=g) - 3,
             B=torch.randn(batch, N, generator=g), C=torch.randn(batch, N, generator=g),
             z=torch.randn(batch, dim, generator=g))
    x = {k: v.to(device, dtype) for k, v in x.items()}
    x.update(state=torch.randn(batch, dim, N, generator=g).to(device),
             A=(-torch.rand(dim, N, generator=g) - 0.5).to(device),
             D=torch.ones(dim, device=device), dt_bias=torch.rand(dim, generator=g).to(device))
    return x


def import_mamba_ssm():
    """mamba_ssm's Triton kernels, {"scan": mamba_chunk_scan_combined,
    "step": selective_state_update}, or {} where mamba_ssm is not installed. Installed from its
    source without its CUDA extension (README, "Speed"), its package __init__ would fail on the
    missing extension; these two modules need none of it, so the package is registered bare (its
    folder, no __init__ run) and they are imported from it."""
    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None:
            return {}
        bare = types.ModuleType("mamba_ssm")
        bare.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = bare
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    return {"scan": mamba_chunk_scan_combined, "step": selective_state_update}


def heads_layout(scan_fn, heads, grouped_bc=False, **kwargs):
    """A Mamba-2 scan in mamba_ssm's layout (scan.ssd_scan, mamba_ssm's mamba_chunk_scan_combined)
    behind our scan's signature: x to (b, L, heads, headdim), B and C to (b, L, N) (or (b, L, 1, N)
    if grouped_bc), and each head's A, delta and bias taken from its first channel (the Mamba-2
    inputs of scan_inputs repeat them over the head's channels, so every path computes the same
    function). The copies are timed with the scan."""
    def fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        b, dim, L = u.shape
        p = dim // heads

        def to_heads(t):  # (b, dim, L) -> (b, L, h, p)
            return t.view(b, heads, p, L).permute(0, 3, 1, 2)

        def first(t):  # (dim, ...) -> (h,)
            return t.view(heads, p, -1)[:, 0, 0].contiguous()

        B, C = (t.permute(0, 3, 1, 2) if grouped_bc else t[:, 0].transpose(1, 2) for t in (B, C))
        y = scan_fn(to_heads(u), to_heads(delta)[..., 0], first(A), B, C, D=first(D), z=to_heads(z),
                    dt_bias=first(delta_bias), dt_softplus=delta_softplus, **kwargs)  # (b, L, h, p)
        return y.permute(0, 2, 3, 1).reshape(b, dim, L)
    return fn


def mamba_ssm_scan(heads, chunk_size=256):
    """mamba_ssm's Triton chunked scan (Mamba-2) behind our scan's signature, or None where it is
    not installed."""
    scan_fn = import_mamba_ssm().get("scan")
    return scan_fn and heads_layout(scan_fn, heads, grouped_bc=True, chunk_size=chunk_size)


def mamba_ssm_ssd(chunk_size=256):
    """mamba_ssm's mamba_chunk_scan_combined behind scan.ssd_scan's signature (B and C as one
    group), or None where it is not installed. 256 is its default chunk, as its Mamba2 layer
    uses."""
    theirs = import_mamba_ssm().get("scan")
    return theirs and (lambda x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False:
                       theirs(x, dt, A, B[:, :, None], C[:, :, None], chunk_size, D=D, z=z,
                              dt_bias=dt_bias, dt_softplus=dt_softplus))


def bench_kernel(device, dtype, reps):
    rows = []
    paths = {"reference": scan.selective_scan_ref}
    if device == "cpu":  # its (batch, dim, L, N) tensors take tens of GB at CUDA's paper shapes
        paths["pscan"] = selective_scan_pscan
    paths["cpu path"] = scan.selective_scan_cpu
    if device == "cuda":
        paths["triton"] = scan.selective_scan_triton
    for name, (batch, dim, N, L) in SHAPES[device].items():
        x = scan_inputs(batch, dim, N, L, device, dtype, heads=HEADS if name == "mamba2" else None)
        size = torch.finfo(dtype).bits // 8
        seq, bc = batch * dim * L * size, batch * N * L * size
        bytes_fwd = 4 * seq + 2 * bc  # u, delta, z, out; B, C
        # + u, delta, z, dout, du, ddelta, dz; B, C, dB, dC
        bytes_bwd = bytes_fwd + 7 * seq + 4 * bc
        dout = torch.randn(batch, dim, L, device=device, dtype=dtype)
        more = {}
        if name == "mamba2":  # the Mamba-2 scans: ours as matrix products, mamba_ssm's if installed
            more["ssd"] = heads_layout(scan.ssd_scan, HEADS)
            theirs = mamba_ssm_scan(HEADS) if device == "cuda" else None
            if theirs:
                more["mamba_ssm"] = theirs
        for path, fn in {**paths, **more}.items():
            t_f, t_b, t_fb = time_scan(lambda: fn(**x, delta_softplus=True), dout, device,
                                       1 if path == "reference" else reps)
            rows.append(dict(shape=name, batch=batch, dim=dim, N=N, L=L,
                             dtype=str(dtype).replace("torch.", ""), path=path,
                             fwd_ms=1e3 * t_f, bwd_ms=1e3 * t_b, fwd_bwd_ms=1e3 * t_fb,
                             fwd_GBps=bytes_fwd / t_f / 1e9,
                             bwd_GBps=(bytes_bwd - bytes_fwd) / t_b / 1e9,
                             fwd_bwd_GBps=bytes_bwd / t_fb / 1e9))
        ref = next(r for r in rows if r["shape"] == name and r["path"] == "reference")
        for row in rows:
            if row["shape"] == name:
                row["fwd_speedup"] = ref["fwd_ms"] / row["fwd_ms"]
                row["fwd_bwd_speedup"] = ref["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    for ssd_dtype in [dtype] + ([torch.bfloat16] if device == "cuda" and dtype != torch.bfloat16
                                else []):
        rows += bench_ssd(device, ssd_dtype, reps)
    rows += bench_step(device, dtype, reps)
    peak = peak_gbps(device)
    for row in rows:
        for k in ("fwd", "bwd", "fwd_bwd"):
            row[f"{k}_pct_peak"] = (None if peak is None or row[f"{k}_GBps"] is None
                                    else 100 * row[f"{k}_GBps"] / peak)
    return rows


def bench_ssd(device, dtype, reps):
    """Mamba-2's scan at SSD_SHAPE in mamba_ssm's layout, as model.py calls it (D, dt_bias and
    softplus on, no z): the PyTorch path, our Triton kernels (CUDA) and mamba_ssm's
    mamba_chunk_scan_combined (CUDA, where installed, at its default chunk of 256). Bytes moved at
    the least: the forward reads x, dt, B, C and writes out; the backward alone reads them and dout
    and writes dx, ddt, dB, dC."""
    batch, L, H, P, N = SSD_SHAPE[device]
    g = torch.Generator().manual_seed(0)
    x = dict(x=torch.randn(batch, L, H, P, generator=g),
             dt=torch.randn(batch, L, H, generator=g) - 3,
             B=torch.randn(batch, L, N, generator=g), C=torch.randn(batch, L, N, generator=g))
    x = {k: v.to(device, dtype) for k, v in x.items()}
    x.update(A=-torch.rand(H, generator=g).to(device) * 4 - 0.5, D=torch.ones(H, device=device),
             dt_bias=torch.rand(H, generator=g).to(device))
    x = {k: v.requires_grad_() for k, v in x.items()}
    dout = torch.randn(batch, L, H, P, device=device, dtype=dtype)
    paths = {"ssd torch": scan.ssd_scan_torch}
    if device == "cuda":
        paths["ssd triton"] = scan.ssd_scan_triton
        if mamba_ssm_ssd():
            paths["mamba_ssm"] = mamba_ssm_ssd()
    size = torch.finfo(dtype).bits // 8
    seq, bc, hd = batch * L * H * P * size, batch * L * N * size, batch * L * H * size
    bytes_fwd, bytes_bwd = 2 * seq + 2 * bc + hd, 3 * seq + 4 * bc + 2 * hd
    rows = []
    for path, fn in paths.items():
        t_f, t_b, t_fb = time_scan(lambda: fn(**x, dt_softplus=True), dout, device, reps)
        rows.append(dict(shape=f"ssd {H}x{P}", batch=batch, dim=H * P, N=N, L=L,
                         dtype=str(dtype).replace("torch.", ""), path=path,
                         fwd_ms=1e3 * t_f, bwd_ms=1e3 * t_b, fwd_bwd_ms=1e3 * t_fb,
                         fwd_GBps=bytes_fwd / t_f / 1e9, bwd_GBps=bytes_bwd / t_b / 1e9,
                         fwd_bwd_GBps=(bytes_fwd + bytes_bwd) / t_fb / 1e9))
    for row in rows:  # against the PyTorch path
        row["fwd_speedup"] = rows[0]["fwd_ms"] / row["fwd_ms"]
        row["fwd_bwd_speedup"] = rows[0]["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return rows


def bench_step(device, dtype, reps):
    """One generation step (scan.selective_state_update) at prefix_simba's shape with
    classifier-free guidance (batch 2, d_inner 2048, N 512; smaller on CPU): ours, and mamba_ssm's
    where installed. The step reads and writes the float32 state; that is nearly all of its
    bytes."""
    batch, dim, N = STEP_SHAPE[device]
    x = step_inputs(batch, dim, N, device, dtype)
    size = torch.finfo(dtype).bits // 8
    # state; x, dt, z, out; B, C
    nbytes = 2 * batch * dim * N * 4 + 4 * batch * dim * size + 2 * batch * N * size
    paths = {"cpu path": scan.selective_state_update_cpu}
    if device == "cuda":
        paths["triton"] = scan.selective_state_update_triton
        theirs = import_mamba_ssm().get("step")
        if theirs:
            paths["mamba_ssm"] = theirs
    rows = []
    for path, fn in paths.items():
        t = timeit(lambda: fn(**x, dt_softplus=True), device, max(reps, 20))
        rows.append(dict(shape="step", batch=batch, dim=dim, N=N, L=1,
                         dtype=str(dtype).replace("torch.", ""), path=path,
                         fwd_ms=1e3 * t, bwd_ms=None, fwd_bwd_ms=None, fwd_GBps=nbytes / t / 1e9,
                         bwd_GBps=None, fwd_bwd_GBps=None))
    for row in rows:
        row["fwd_speedup"], row["fwd_bwd_speedup"] = rows[0]["fwd_ms"] / row["fwd_ms"], None
    return rows


def variant_config(name, size):
    """The ModelConfig of configs/<name>.py, shrunk by configs/tiny.py when size is "tiny"."""
    return model.read_config(f"configs/{name}.py", *(["configs/tiny.py"] if size == "tiny" else []))


TRAIN_MODELS = ("prefix_simba", "prefix_mamba", "cross_simba", "prefix_transformer",
                "cross_transformer")


def bench_train(device, reps, size, seconds=30.0, multiples=(1, 2, 4), profile=False):
    """One optimizer step (forward, backward, AdamW) of each paper variant on one crop of 30 s of
    tokens (plus the text prefix) and of 2x and 4x that: tokens/s, MFU (CUDA, bf16 autocast as
    train.py) and peak memory."""
    rows = []
    for name in TRAIN_MODELS:
        config = variant_config(name, size)
        m = model.MusicLM(config).to(device)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device == "cuda")
        g = torch.Generator().manual_seed(0)
        text = torch.randn(1, config.max_text_len, config.text_dim, generator=g).to(device)
        mask = torch.ones(1, config.max_text_len, dtype=torch.bool, device=device)
        for mult in multiples:
            frames = round(mult * seconds * FRAME_RATE)
            seq = model.delay(torch.randint(0, config.codebook_size,
                                            (1, config.n_codebooks, frames), generator=g),
                              config.codebook_size).to(device)  # (1, K, frames + K)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                    _, loss = m(seq[:, :, :-1], text, mask, seq[:, :, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = timeit(step, device, reps)
            if profile and mult == multiples[0]:  # where the step's time goes, by operator
                with torch.profiler.profile() as prof:
                    step()
                print(f"\n{name}, {mult * seconds:g} s: torch.profiler, one step\n" +
                      prof.key_averages().table(sort_by="self_device_time_total" if device == "cuda"
                                                else "self_cpu_time_total", row_limit=20))
            positions = frames + config.n_codebooks - 1
            peak = peak_flops() if device == "cuda" else None
            rows.append(dict(
                model=name, size=size, params_M=round(m.num_params() / 1e6, 2),
                seconds=mult * seconds, positions=positions, ms_per_step=1e3 * t,
                tokens_per_s=positions / t,
                mfu_pct=(None if not peak
                         else 100 * m.estimate_flops_per_token(positions) * positions / t / peak),
                peak_mem_GB=torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None))
    by = {(r["model"], r["seconds"]): r for r in rows}
    for r in rows:  # against the Transformer with the same conditioning, at the same length
        base = by.get((r["model"].split("_")[0] + "_transformer", r["seconds"]))
        r["speed_vs_transformer"] = base["ms_per_step"] / r["ms_per_step"] if base else None
    return rows


GENERATE_MODELS = ("prefix_simba", "prefix_transformer")


# ops that compute nothing (they describe a tensor or a dtype differently): not in the CPU op count
VIEW_OPS = {"aten::view", "aten::select", "aten::slice", "aten::split", "aten::split_with_sizes",
            "aten::chunk", "aten::transpose", "aten::t", "aten::unsqueeze", "aten::squeeze",
            "aten::expand", "aten::as_strided", "aten::reshape", "aten::unflatten", "aten::flatten",
            "aten::detach", "aten::alias", "aten::to", "aten::dropout", "aten::lift_fresh",
            "aten::_unsafe_view", "aten::empty", "aten::empty_strided", "aten::promote_types"}


def ops_per_layer_step(m, cache, tokens, device):
    """Kernels launched by one decoding step of the model's first layer (CUDA), counted with
    torch.profiler. On CPU, the proxy: the operators it calls that compute (VIEW_OPS left out), with
    scan.ssd_step, which is one Triton kernel on CUDA (some 20 operators in its PyTorch path),
    counted as one. The layer's state advances."""
    x = m._embed_codes(tokens[:, :, None], cache["positions"].index_select(0, cache["pos"].view(1)))
    layer = functools.partial(m.layers[0], x, cache["memory"], cache["memory_mask"],
                              cache["layers"][0])
    layer()  # warm-up: kernels compiled before the count
    if device == "cuda":
        with torch.profiler.profile() as prof:
            elapsed(layer, device)
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())

    def one_op(*args):  # the Mamba-2 step as one event: its operators become its children
        with torch.profiler.record_function("scan::ssd_step"):
            return scan.ssd_step(*args)
    model.ssd_step = one_op
    try:
        with torch.profiler.profile() as prof:
            layer()
    finally:
        model.ssd_step = scan.ssd_step
    return sum(e.cpu_parent is None and e.name not in VIEW_OPS for e in prof.events())


@torch.no_grad()
def bench_generate(device, dtype, reps, size, positions, rtf_seconds=30.0, window=100):
    """Per model: ms per cached step at the given positions (eager; on CUDA also replayed from a
    CUDA graph), ms per step when the whole sequence is run again, the ops one decoding step of a
    layer launches, and the real-time factor of generate() for rtf_seconds (eager and, on CUDA, with
    graphs)."""
    rows = []
    graphs = (False, True) if device == "cuda" else (False,)
    for name in GENERATE_MODELS:
        config = variant_config(name, size)
        m = model.MusicLM(config).to(device, dtype).eval()
        g = torch.Generator().manual_seed(0)
        text = torch.randn(2, config.max_text_len, config.text_dim, generator=g).to(device, dtype)
        mask = torch.ones(2, config.max_text_len, dtype=torch.bool, device=device)
        mask[1] = False  # the unconditional row of classifier-free guidance
        last = max(positions) + window
        tokens = torch.randint(0, config.codebook_size, (2, config.n_codebooks, last),
                               generator=g).to(device)
        base = dict(model=name, size=size, params_M=round(m.num_params() / 1e6, 2),
                    dtype=str(dtype)[6:])
        for graph in graphs:
            cache = m.prefill(text, mask, last)
            step, first = functools.partial(m.step, cache=cache), 0
            if graph:  # captured after one eager step (position 0), as generate() does
                step(tokens[:, :, 0])
                step, first = model.cuda_graph_of(step, tokens[:, :, 0]), 1
            times = {p: elapsed(functools.partial(step, tokens[:, :, p]), device)
                     for p in tqdm(range(first, last), desc=f"{name}: cached steps", leave=False)}
            # the median of the `window` steps from pos: single steps are too short to time
            for pos in positions:
                window_times = [times[p] for p in range(pos, pos + window) if p in times]
                rows.append(dict(base, mode="cache, CUDA graph" if graph else "cache", position=pos,
                                 ms_per_step=1e3 * statistics.median(window_times)))
        cache = m.prefill(text, mask, last)
        rows.append(dict(base, mode="ops per layer step", position=None, ms_per_step=None,
                         ops=ops_per_layer_step(m, cache, tokens[:, :, 0], device)))
        for pos in tqdm(positions, desc=f"{name}: recomputed steps", leave=False):
            t = timeit(lambda: m(tokens[:, :, :pos + 1], text, mask), device, reps)
            rows.append(dict(base, mode="recompute", position=pos, ms_per_step=1e3 * t))
        # real-time factor: one caption, all of generate() (prefill, sampling, CFG)
        frames = round(rtf_seconds * FRAME_RATE)
        for graph in graphs:
            t = timeit(functools.partial(m.generate, text[:1], mask[:1], frames, cfg_scale=3.0,
                                         cuda_graph=graph), device, 1)
            rows.append(dict(base, mode=f"generate {rtf_seconds:g} s, cfg 3" +
                                        (", CUDA graph" if graph else ""),
                             position=frames,
                             ms_per_step=1e3 * t / (frames + config.n_codebooks - 1),
                             rtf=t / rtf_seconds))
    for r in rows:
        r.setdefault("rtf", None)
        r.setdefault("ops", None)
    return rows


def bench_stage2(device, dtype, size, seconds=10.0, steps=25):
    """Seconds of compute per second of audio for the two-stage design's parts, one caption
    (batch 1): stage 2 (the diffusion model, `steps` DPM-Solver++ steps over the whole clip) and
    the cost it replaces, the extra codebooks the single-stage LM writes (prefix_simba's 4
    codebooks against two_stage_simba's codebook 0)."""
    frames = round(seconds * FRAME_RATE)
    rows = []
    for name in ("prefix_simba", "two_stage_simba"):
        config = variant_config(name, size)
        m = model.MusicLM(config).to(device, dtype).eval()
        text = torch.randn(1, config.max_text_len, config.text_dim).to(device, dtype)
        mask = torch.ones(1, config.max_text_len, dtype=torch.bool, device=device)
        t = timeit(lambda: m.generate(text, mask, frames, cfg_scale=3.0), device, 1)
        rows.append(dict(
            part=f"stage 1 LM: {name}, {config.n_codebooks} codebook(s), cached, cfg 3",
            size=size, params_M=round(m.num_params() / 1e6, 2), s_per_audio_s=t / seconds))
    # the README's tiny run; configs/stage2_diffusion.py
    channels = (64, 128, 256) if size == "tiny" else (128, 256, 512)
    s2 = Stage2Diffusion(Stage2Config(unet_channels=channels)).to(device).eval()
    s2.codebooks.normal_()
    tokens = torch.randint(0, 1024, (1, frames), device=device)
    t = timeit(lambda: s2.sample(tokens, steps), device, 1)
    rows.append(dict(part=f"stage 2 diffusion: UNet {channels}, {steps} DPM-Solver++ steps",
                     size=size, params_M=round(s2.num_params() / 1e6, 2),
                     s_per_audio_s=t / seconds))
    rows.append(dict(part="extra codebooks in the single-stage LM (row 1 - row 2)", size=size,
                     params_M=None,
                     s_per_audio_s=rows[0]["s_per_audio_s"] - rows[1]["s_per_audio_s"]))
    return rows


def bench_prepare(device, hours):
    """Peak memory of preparing one long recording (44.1 kHz stereo 16-bit wav: the synthetic songs
    end to end, `hours` long), each way in its own process: decoding it whole and resampling it,
    then also encoding its clips one at a time, each in one pass (what prepare.py did before it
    read in blocks and ran the encoder in windows); reading it through prepare.read_clips in
    blocks; and whole `prepare.py` runs (untrained codec, MiniLM) on two 30 s files and on the long
    file beside a 30 s one: the same peak if memory does not grow with the file; the long file once
    more at twice prepare.py's default batch."""
    import tempfile

    import numpy as np
    import soundfile as sf
    import soxr

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        audio = Path(tmp) / "audio"
        audio.mkdir()
        long_file, sr = audio / "long.wav", 44100
        (audio / "long.txt").write_text(synth_song(0, 1.0)[1])
        with sf.SoundFile(long_file, "w", sr, 2, "PCM_16") as f:  # written a minute at a time
            for i in tqdm(range(round(hours * 60)), desc="writing the long file", unit="min"):
                wav = soxr.resample(synth_song(i, 60.0)[0], SAMPLE_RATE, sr)  # (samples,)
                f.write(np.repeat(wav[:, None], 2, axis=1))  # (samples, 2)
        # the long file's companion; two short files alone
        for folder in (audio, Path(tmp) / "short"):
            folder.mkdir(exist_ok=True)
            for i in (10_000, 10_001)[:1 if folder == audio else 2]:
                wav, caption, _ = synth_song(i, 30.0)
                sf.write(folder / f"{i}.wav", wav, SAMPLE_RATE)
                (folder / f"{i}.txt").write_text(caption)
        programs = {
            "imports only (numpy, soundfile, soxr, torch)": "",
            "decode whole + resample":
                f"w = sf.read({str(long_file)!r}, dtype='float32', always_2d=True)[0]"
                f".mean(axis=1); w = soxr.resample(w, {sr}, 24000)",
            "prepare.read_clips, 60 s blocks":
                f"n = sum(len(c) for _, c in prepare.read_clips({str(long_file)!r}, "
                "30.0, 5.0))"}
        # the old way: the whole file in memory, each 30 s clip through EnCodec in one pass
        programs["decode whole + resample + encode (prepare.py before)"] = (
            programs["decode whole + resample"] +
            f"; codec, _ = data.load_codec('untrained', device={device!r}); "
            "torch.set_grad_enabled(False); "
            f"codes = [codec.encode(torch.from_numpy(c)[None, None].to({device!r})) "
            "for _, c in prepare.cut_clips(w, 30.0, 5.0)]")
        double = 2 * encode_batch_size(device)
        for i, (name, folder, *more) in enumerate((
                ("python prepare.py, two 30 s files", Path(tmp) / "short"),
                (f"python prepare.py, {hours:g} h + 30 s", audio),
                (f"python prepare.py --batch_size={double} (twice the default), {hours:g} h + 30 s",
                 audio, f"--batch_size={double}"))):
            argv = ["prepare.py", f"--audio_dir={folder}", f"--data_dir={tmp}/data{i}",
                    "--codec=untrained", f"--device={device}", *more]
            programs[name] = (f"import runpy, sys; sys.argv = {argv!r}; "
                              "runpy.run_path('prepare.py', run_name='__main__')")
        for name, code in programs.items():
            rows.append(dict(what=name, **peak_of(
                "import numpy as np, soundfile as sf, soxr, torch, data, prepare; " + code)))
    return rows


def peak_of(code):
    """Run Python code in a new process -> its wall seconds, its peak RSS in MiB (VmHWM, which
    starts afresh at exec; rusage's maximum would keep the forked parent's) and its system seconds,
    as the process reports them."""
    report = ("\nimport resource\nprint(next(line.split()[1] for line in open('/proc/self/status') "
              "if line.startswith('VmHWM')), resource.getrusage(resource.RUSAGE_SELF).ru_stime)")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code + report], cwd=Path(__file__).parent,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"bench.py: {code[:200]} failed: {r.stderr.strip().splitlines()[-1:]}")
    peak_kib, system = r.stdout.split()[-2:]
    return dict(seconds=time.time() - t0, peak_rss_MiB=int(peak_kib) / 1024, system_s=float(system))


def markdown(rows):
    cols = list(rows[0])
    fmt = lambda v: "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# settings: python bench.py --key=value ... (configurator.py; --help lists them)
DEFAULTS = dict(
    section="kernel",  # kernel | train | generate | stage2 | prepare | all (all but prepare)
    device="cuda" if torch.cuda.is_available() else "cpu",  # cpu | cuda
    dtype="float32",  # float32 | bfloat16
    reps=5,  # timed runs per measurement (the reference runs once)
    size="",  # train, generate, stage2: model size, tiny | paper (empty: paper on CUDA, else tiny)
    positions="100,1000,4000",  # generate: positions to time, comma-separated
    profile=False,  # train: print a torch.profiler table per model at 30 s
    hours=1.0,  # prepare: length of the long recording
    out="out-bench",  # folder for the JSON files
)
CHOICES = dict(section=("kernel", "train", "generate", "stage2", "prepare", "all"),
               device=("cpu", "cuda"), dtype=("float32", "bfloat16"), size=("", "tiny", "paper"))
# -----------------------------------------------------------------------------


def main(argv):
    keep_freed_memory()
    args = types.SimpleNamespace(**configure(dict(DEFAULTS), argv, "bench.py", __doc__, CHOICES))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: --device=cuda but torch sees no GPU; use --device=cpu")
    dtype = getattr(torch, args.dtype)
    size = args.size or ("paper" if args.device == "cuda" else "tiny")
    positions = [int(x) for x in args.positions.split(",")]
    sections = {"kernel": lambda: bench_kernel(args.device, dtype, args.reps),
                "train": lambda: bench_train(args.device, args.reps, size, profile=args.profile),
                "generate": lambda: bench_generate(args.device, dtype, args.reps, size, positions),
                "stage2": lambda: bench_stage2(args.device, dtype, size),
                "prepare": lambda: bench_prepare(args.device, args.hours)}
    for section in (["kernel", "train", "generate", "stage2"] if args.section == "all"
                    else [args.section]):
        rows = sections[section]()
        info = dict(section=section, device=args.device, machine=machine(args.device),
                    torch=torch.__version__, triton=triton.__version__,
                    peak_GBps=peak_gbps(args.device), date=time.strftime("%Y-%m-%d"),
                    commit=commit(), rows=rows)
        print(f"## {section} on {info['machine']} (torch {torch.__version__}, "
              f"triton {triton.__version__}, commit {info['commit']}, {info['date']})\n")
        print(markdown(rows))
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"{section}_{args.device}.json")
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=1)))
        print(f"\nwrote {path}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
