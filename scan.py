"""The selective scan: the recurrence at the heart of Mamba, four ways.

For every batch row b, channel d and state index n:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t       (h_{-1} = 0)
    y_t = sum_n C_t * h_t + D * u_t
    out_t = y_t * silu(z_t)                                      (if z is given)

delta, B and C change at every step ("selective"); A and D are per channel.
The API is mamba_ssm's, so Mamba code ports over unchanged:

    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, return_last_state=False)
        u, delta, z: (batch, dim, L)   A: (dim, N)   D, delta_bias: (dim,)
        B, C: (batch, N, L), or (batch, G, N, L) where channel d reads group d // (dim // G)
        -> out (batch, dim, L) [, last_state (batch, dim, N), float32]
    selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                           dt_softplus=False)
        one step for generation: state (batch, dim, N) is updated in place, returns out (batch, dim)

Mamba-2 is the same scan with its per-head scalar A and dt broadcast over the head's
channels (A.expand(dim, N), dt.expand(batch, dim, L)); that case also unrolls into
matrix products, which ssd_scan computes (model.py's Mamba-2 uses it).

The file, in the order to read it (1-4 are the four implementations):
  1. selective_scan_ref      the sequential loop: obvious, slow, the ground truth for tests.
     (then the argument checks every path shares, and two small helpers)
  2. selective_scan_cpu      pure PyTorch for CPU tensors. A two-level chunked scan (Python
                             loops over ~sqrt(L) steps, not L) with a hand-written backward
                             that recomputes states block by block, so the (batch, dim, L, N)
                             state tensor never exists at once.
  3. selective_scan_triton   hand-written Triton kernels for CUDA tensors (or CPU tensors under
                             TRITON_INTERPRET=1). Each program keeps the (BLOCK_D, N) state on
                             chip and walks the sequence in chunks of BLOCK_L steps, scanning
                             each chunk in parallel; only chunk-start states go to memory,
                             for the backward.
  4. ssd_scan                Mamba-2's case (one scalar A per head) as chunked matrix products,
                             in mamba_ssm's (batch, L, heads, headdim) layout: in PyTorch on any
                             device, and as Triton kernels on CUDA.
     (then the steps for generation: selective_state_update, one step of the scan in place;
     and ssd_step, Mamba-2's step with its causal convolution's ring state, one kernel on CUDA)
selective_scan, ssd_scan and the two steps pick the path from the tensors' device.
Inputs may be float32, bfloat16 or float16; states and sums are always float32 (float64 inputs
stay float64 in the PyTorch paths, for gradcheck).
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# 1. the reference: one step at a time


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The recurrence exactly as written in the module docstring, in float32
    (float64 stays float64)."""
    batch, dim, L, N, G = _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    f, dtype_in = _compute_dtype(u), u.dtype
    u, delta, A = u.to(f), delta.to(f), A.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # channels split into G groups, each reading its own B and C: (batch, G, dim/G, ...)
    uu, dd, A = (u.reshape(batch, G, dim // G, L), delta.reshape(batch, G, dim // G, L),
                 A.reshape(G, dim // G, N))
    B = _grouped(B).to(f).unsqueeze(2)  # (batch, G, 1, N, L)
    C = _grouped(C).to(f).unsqueeze(2)  # (batch, G, 1, N, L)
    h = u.new_zeros(batch, G, dim // G, N)
    ys = []
    for t in range(L):
        h = torch.exp(dd[..., t, None] * A) * h + (dd[..., t] * uu[..., t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))  # (batch, G, dim/G)
    y = torch.stack(ys, dim=-1).view(batch, dim, L)
    h = h.view(batch, dim, N)
    if D is not None:
        y = y + D.to(f)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(f))
    out = y.to(dtype_in)
    return (out, h) if return_last_state else out


# -----------------------------------------------------------------------------
# argument checks and small helpers, shared by every path
#
# Every public function checks its arguments first and raises a ValueError that names the bad
# one. The reference above calls _check_scan_args, _grouped and _compute_dtype, defined here.


def _expect(t, name, shape, device):
    """Raise a ValueError naming `name` unless t is a floating tensor of `shape` on `device`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: is on {t.device} but u is on {device}; "
                         "put all inputs on one device")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def _check_bc(B, C, batch, dim, N, steps, dev):
    """B and C: (batch, N, *steps) or (batch, G, N, *steps) with G dividing dim; return G."""
    names = ", L" * len(steps)
    if not isinstance(B, torch.Tensor) or B.dim() not in (2 + len(steps), 3 + len(steps)):
        raise ValueError(f"B: expected shape (batch, N{names}) or (batch, G, N{names}), "
                         f"got {getattr(B, 'shape', type(B))}")
    G = 1 if B.dim() == 2 + len(steps) else B.shape[1]
    if G == 0 or dim % G:
        raise ValueError(f"B: the number of groups G={G} must divide dim={dim}")
    shape = (batch, N, *steps) if B.dim() == 2 + len(steps) else (batch, G, N, *steps)
    _expect(B, "B", shape, dev)
    _expect(C, "C", shape, dev)
    return G


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias):
    """Validate shapes, devices and dtypes; return (batch, dim, L, N, G)."""
    if not isinstance(u, torch.Tensor) or u.dim() != 3 or u.shape[-1] == 0:
        raise ValueError("u: expected shape (batch, dim, L) with L >= 1, "
                         f"got {getattr(u, 'shape', type(u))}")
    batch, dim, L = u.shape
    dev = u.device
    _expect(u, "u", (batch, dim, L), dev)
    _expect(delta, "delta", (batch, dim, L), dev)
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A: expected shape (dim={dim}, N), got {getattr(A, 'shape', type(A))}")
    N = A.shape[1]
    _expect(A, "A", (dim, N), dev)
    G = _check_bc(B, C, batch, dim, N, (L,), dev)
    for name, t, shape in (("D", D, (dim,)), ("z", z, (batch, dim, L)),
                           ("delta_bias", delta_bias, (dim,))):
        if t is not None:
            _expect(t, name, shape, dev)
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.dtype != u.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from u's {u.dtype}; "
                             "cast them to one dtype")
    if C.dtype != B.dtype:
        raise ValueError(f"C: dtype {C.dtype} differs from B's {B.dtype}; cast them to one dtype")
    return batch, dim, L, N, G


def _grouped(B):
    """(batch, N, L) -> (batch, 1, N, L); (batch, G, N, L) unchanged."""
    return B.unsqueeze(1) if B.dim() == 3 else B


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# -----------------------------------------------------------------------------
# 2. the CPU path: chunked scan in PyTorch with a hand-written backward

LOG2E = 1.4426950408889634
CPU_CHUNK = 16  # steps scanned one by one inside each chunk (all chunks at once)
CPU_BLOCK_ELEMS = 1 << 20  # at most this many (batch * dim * steps * N) state elements at once


def _decay(dt, A):
    """exp(dt * A), every entry <= 1.

        dt (batch, G, T, dim/G), A (G, dim/G, N or 1) -> (batch, G, T, dim/G, N or 1)

    Computed as exp2(dt * A * log2(e)): exp2 is about 3x faster than exp on CPU.
    """
    return (dt.unsqueeze(-1) * (A * LOG2E).unsqueeze(-3)).exp2_()


def _linear_scan(a, dt, A, x, h0, chunk, reverse=False):
    """h_t = a_t * h_{t-1} + x_t over the steps of x (batch, G, T, dim/G, N), from h_{-1} = h0.

    a = _decay(dt, A) = exp(dt * A): (batch, G, T, dim/G, N or 1); dt: (batch, G, T, dim/G);
    A: (G, dim/G, N or 1); h0: (batch, G, dim/G, N). With reverse=True it runs backwards in time:
    h_t = a_t * h_{t+1} + x_t from h_T = h0. T must be a multiple of `chunk`. Writes h into x and
    returns it. Two levels, so Python runs about 2 * chunk + T / chunk small loops instead of T:
    every chunk's last state from a zero start (all chunks at once), then the true state entering
    each chunk, carried across chunks, then every chunk once more from its true entering state.
    Each loop step works on one step of every chunk, (dim/G, N) contiguous numbers per chunk: the
    time-major layout is for this. Only decays exp(dt * A) <= 1 and their products are formed,
    never the exp of a large positive number, so it is as stable as the sequential loop.
    """
    batch, G, T, d, N = x.shape
    nc = T // chunk
    # h[i]: step i of every chunk, (batch, G, nc, dim/G, N)
    h = x.view(batch, G, nc, chunk, d, N).unbind(3)
    a = a.view(batch, G, nc, chunk, d, -1).unbind(3)
    steps = range(chunk - 1, -1, -1) if reverse else range(chunk)  # in scan order
    last = h[steps[0]]
    for i in steps[1:]:  # 1. each chunk's last state from a zero start, all chunks at once
        last = torch.addcmul(h[i], a[i], last)  # (batch, G, nc, dim/G, N)
    # 2. the true state entering each chunk; a chunk's total decay is exp(A * the sum of its dt)
    # (batch, G, nc, dim/G, N or 1)
    chunk_decay = _decay(dt.reshape(batch, G, nc, chunk, d).sum(3), A)
    q = torch.empty_like(last)
    q_c, last_c, decay_c = q.unbind(2), last.unbind(2), chunk_decay.unbind(2)
    chunks = range(nc - 1, -1, -1) if reverse else range(nc)  # in scan order
    q_c[chunks[0]].copy_(h0)
    for c, prev in zip(chunks[1:], chunks):
        torch.addcmul(last_c[prev], decay_c[prev], q_c[prev], out=q_c[c])
    for i in steps:  # 3. every chunk once more, from its true entering state, in place
        q = h[i].addcmul_(a[i], q)
    return x


def _time_major(t, G, L_pad):
    """(batch, dim, L) -> (batch, G, L_pad, dim/G) float32, padded with zeros:
    the CPU path's layout."""
    batch, dim, L = t.shape
    t = F.pad(t.to(_compute_dtype(t)), (0, L_pad - L)).view(batch, G, dim // G, L_pad)
    return t.transpose(-1, -2).contiguous()


def _channel_major(t, L):
    """(batch, G, L_pad, dim/G) -> (batch, dim, L), contiguous: the inverse of _time_major."""
    batch, G, L_pad, d = t.shape
    return t[:, :, :L].transpose(-1, -2).reshape(batch, G * d, L).contiguous()


def _cpu_inputs(u, delta, A, B, C, delta_bias, delta_softplus, L_pad):
    """Float32 copies in the CPU path's time-major layout, padded with zeros to L_pad steps.

    u, delta (after bias and softplus): (batch, G, L_pad, dim/G); B, C: (batch, G, L_pad, N);
    A: (G, dim/G, N), or (G, dim/G, 1) where each channel has one A for all its states, as in
    Mamba-2: then the decays exp(delta A) are (..., dim/G, 1) too, N times fewer to compute and
    read. A padded step has delta = 0, so it leaves the state unchanged.
    """
    B, C = _grouped(B), _grouped(C)
    G, N = B.shape[1], B.shape[2]
    f = _compute_dtype(u)
    dt = delta.to(f)
    if delta_bias is not None:
        dt = dt + delta_bias.to(f)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)

    def bc(t):  # (batch, G, N, L) -> (batch, G, L_pad, N)
        return F.pad(t.to(f), (0, L_pad - t.shape[-1])).transpose(-1, -2).contiguous()

    A = A.to(f).reshape(G, -1, N)
    if torch.equal(A, A[..., :1].expand_as(A)):
        A = A[..., :1]
    return _time_major(u, G, L_pad), _time_major(dt, G, L_pad), bc(B), bc(C), A


def _cpu_plan(batch, dim, N, L):
    """(L_pad, block): pad L to whole chunks; blocks of whole chunks within the memory budget."""
    L_pad = -(-L // CPU_CHUNK) * CPU_CHUNK
    block = max(1, CPU_BLOCK_ELEMS // (batch * dim * N * CPU_CHUNK)) * CPU_CHUNK
    return L_pad, min(block, L_pad)


class _CPUScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, dim, L = u.shape
        N = A.shape[1]
        L_pad, block = _cpu_plan(batch, dim, N, L)
        # one spare step at the end: the backward's adjoint scan reads a_{t+1}
        uu, dt, Bt, Ct, Ag = _cpu_inputs(u, delta, A, B, C, delta_bias, delta_softplus, L_pad + 1)
        G = Bt.shape[1]
        h = uu.new_zeros(batch, G, dim // G, N)  # (batch, G, dim/G, N)
        starts = []  # the state entering each block: all the backward needs to recompute the rest
        y = torch.empty_like(uu)  # (batch, G, L_pad + 1, dim/G)
        dtu = dt * uu  # (batch, G, L_pad + 1, dim/G)
        for s in range(0, L_pad, block):
            e = min(s + block, L_pad)
            starts.append(h)
            x = dtu[:, :, s:e, :, None] * Bt[:, :, s:e, None, :]  # (batch, G, T, dim/G, N)
            hs = _linear_scan(_decay(dt[:, :, s:e], Ag), dt[:, :, s:e], Ag, x, h, CPU_CHUNK)
            h = hs[:, :, -1].clone()
            y[:, :, s:e] = torch.einsum('bgtdn,bgtn->bgtd', hs, Ct[:, :, s:e])
        y = _channel_major(y, L)  # (batch, dim, L)
        if D is not None:
            y = y + D.to(y.dtype)[:, None] * u.to(y.dtype)
        out = y if z is None else y * F.silu(z.to(y.dtype))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, uu, dt, Bt, Ct, Ag,
                              torch.stack(starts, 2),
                              None if z is None else y)  # y before the gate, for dz
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)
        return out.to(u.dtype), h.view(batch, dim, N)

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, uu, dt, Bt, Ct, Ag, starts, y = ctx.saved_tensors
        batch, dim, L = u.shape
        N = A.shape[1]
        L_pad, block = _cpu_plan(batch, dim, N, L)
        G, f = Bt.shape[1], uu.dtype
        # (batch, dim, L) gradient of y
        dy = u.new_zeros(u.shape, dtype=f) if dout is None else dout.to(f)
        dz = None
        if z is not None:
            zf = z.to(f)
            sz = torch.sigmoid(zf)
            dz = dy * y * sz * (1 + zf * (1 - sz))
            dy = dy * zf * sz
        dyt = _time_major(dy, G, L_pad + 1)  # (batch, G, L_pad + 1, dim/G)
        g = (uu.new_zeros(batch, G, dim // G, N) if dlast is None
             else dlast.to(f).reshape(batch, G, dim // G, N))
        du, ddt = torch.zeros_like(uu), torch.zeros_like(uu)
        dA = Ag.new_zeros(G, dim // G, N)
        dB, dC = torch.zeros_like(Bt), torch.zeros_like(Ct)
        dtu = dt * uu
        for i, s in reversed(list(enumerate(range(0, L_pad, block)))):
            e = min(s + block, L_pad)
            # (batch, G, T + 1, dim/G, N or 1): a_s .. a_e, for both scans
            a = _decay(dt[:, :, s:e + 1], Ag)
            # adjoint state g_t = dL/dh_t, scanned backwards: g_t = C_t dy_t + a_{t+1} g_{t+1}
            gs = dyt[:, :, s:e, :, None] * Ct[:, :, s:e, None, :]  # (batch, G, T, dim/G, N)
            _linear_scan(a[:, :, 1:], dt[:, :, s + 1:e + 1], Ag, gs, g, CPU_CHUNK, reverse=True)
            g = gs[:, :, 0].clone()
            # recompute the block's states from the state entering it
            h0 = starts[:, :, i]
            hs = dtu[:, :, s:e, :, None] * Bt[:, :, s:e, None, :]  # (batch, G, T, dim/G, N)
            _linear_scan(a[:, :, :-1], dt[:, :, s:e], Ag, hs, h0, CPU_CHUNK)
            # every gradient from h_t and g_t
            dC[:, :, s:e] = torch.einsum('bgtdn,bgtd->bgtn', hs, dyt[:, :, s:e])
            dB[:, :, s:e] = torch.einsum('bgtdn,bgtd->bgtn', gs, dtu[:, :, s:e])
            gB = torch.einsum('bgtdn,bgtn->bgtd', gs, Bt[:, :, s:e])  # sum_n g_t B_t
            gah = gs * a[:, :, :-1]  # g_t * a_t * h_{t-1}
            gah[:, :, 1:] *= hs[:, :, :-1]
            gah[:, :, 0] *= h0
            du[:, :, s:e] = gB * dt[:, :, s:e]
            ddt[:, :, s:e] = gB * uu[:, :, s:e] + torch.einsum('bgtdn,gdn->bgtd', gah, Ag)
            # hs is not needed any more
            dA += torch.mul(gah, dt[:, :, s:e, :, None], out=hs).sum((0, 2))

        du, ddelta = _channel_major(du, L), _channel_major(ddt, L)  # (batch, dim, L)
        dD = None
        if D is not None:
            dD = (dy * u.to(f)).sum((0, 2)).to(D.dtype)
            du = du + D.to(f)[:, None] * dy
        if ctx.delta_softplus:
            raw = delta.to(f) if delta_bias is None else delta.to(f) + delta_bias.to(f)[:, None]
            ddelta = ddelta * torch.sigmoid(raw)
        dbias = None if delta_bias is None else ddelta.sum((0, 2)).to(delta_bias.dtype)

        def bc(t, like):  # (batch, G, L_pad + 1, N) -> like's shape
            return t[:, :, :L].transpose(-1, -2).reshape(like.shape).to(like.dtype)

        return (du.to(u.dtype), ddelta.to(delta.dtype), dA.view(dim, N).to(A.dtype), bc(dB, B),
                bc(dC, C), dD, None if z is None else dz.to(z.dtype), dbias, None)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The selective scan in PyTorch, fast on CPU (works on any device).
    Same API as selective_scan."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    out, last = _CPUScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


# -----------------------------------------------------------------------------
# 3. the Triton kernels
#
# One program owns one batch row and BLOCK_D channels of one group, with all N states
# of each channel: a (BLOCK_D, BLOCK_N) fp32 state that lives in registers. It walks the
# sequence in chunks of BLOCK_L steps; each chunk is loaded as coalesced (.., BLOCK_L)
# tiles, scanned in parallel along time with tl.associative_scan on (BLOCK_D, BLOCK_N,
# BLOCK_L) tiles, and continued from the state the previous chunk left. The forward
# writes the state entering each chunk (batch, dim, n_chunks, N) for the backward, which
# walks the chunks in reverse: it recomputes the chunk's states from that saved state,
# runs the adjoint recurrence backwards in time (a reverse associative scan) and forms
# every gradient from the two. dB and dC sum over the channels of a group: each program
# reduces its BLOCK_D channels on chip and adds the result with one atomic per element.

@triton.jit
def _combine(a1, x1, a2, x2):
    """Compose two steps of h -> a * h + x (first (a1, x1), then (a2, x2))."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _softplus(x):
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)  # torch's threshold of 20


@triton.jit
def _load_delta(delta_ptr, bias, offs, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(delta after bias and softplus, the pre-softplus value) as fp32; 0 where masked."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[:, None]
    dt = _softplus(raw) if SOFTPLUS else raw
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _scan_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                     out_ptr, last_ptr, starts_ptr,
                     dim, L, N, G, n_chunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, SAVE_STARTS: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,) channels, all in group g
    g = (tl.program_id(1) * BLOCK_D) // (dim // G)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=n_ok[None, :],
                other=0.0).to(tl.float32)  # (BD, BN)
    A2 = A * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    bias = tl.load(bias_ptr + d).to(tl.float32) if HAS_BIAS else None
    Dv = tl.load(D_ptr + d).to(tl.float32) if HAS_D else None
    row = (b * dim + d) * L  # (BD,) where each channel's sequence starts
    bc_row = ((b * G + g) * N + n) * L  # (BN,) where each state's B and C sequence starts
    last_col = (tl.arange(0, BLOCK_L) == BLOCK_L - 1)[None, None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # the state entering the chunk
    for c in range(n_chunks):
        if SAVE_STARTS:
            tl.store(starts_ptr + ((b * dim + d[:, None]) * n_chunks + c) * N + n[None, :], h,
                     mask=n_ok[None, :])
        t = c * BLOCK_L + tl.arange(0, BLOCK_L)
        m = (t < L)[None, :]
        offs = row[:, None] + t[None, :]  # (BD, BL)
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dt, _ = _load_delta(delta_ptr, bias, offs, m, HAS_BIAS, SOFTPLUS)
        bc_offs = bc_row[:, None] + t[None, :]  # (BN, BL)
        bc_m = n_ok[:, None] & m
        Bt = tl.load(B_ptr + bc_offs, mask=bc_m, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + bc_offs, mask=bc_m, other=0.0).to(tl.float32)
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])  # (BD, BN, BL)
        x = (dt * u)[:, None, :] * Bt[None, :, :]  # (BD, BN, BL)
        a_cum, hs = tl.associative_scan((a, x), 2, _combine)
        hs += a_cum * h[:, :, None]  # the states of the chunk's steps
        h = tl.sum(tl.where(last_col, hs, 0.0), axis=2)
        y = tl.sum(hs * Ct[None, :, :], axis=1)  # (BD, BL)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zv = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(last_ptr + (b * dim + d[:, None]) * N + n[None, :], h, mask=n_ok[None, :])


@triton.jit
def _load_bwd_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, dout_ptr, bias, offs, bc_offs, m, bc_m, t, L,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """One chunk's tiles for the backward, in fp32: u, dt, dt before softplus, dt one step later,
    dout (BD, BL); B and C (BN, BL)."""
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    dt, raw = _load_delta(delta_ptr, bias, offs, m, HAS_BIAS, SOFTPLUS)
    dt_next, _ = _load_delta(delta_ptr, bias, offs + 1, (t + 1 < L)[None, :], HAS_BIAS, SOFTPLUS)
    Bt = tl.load(B_ptr + bc_offs, mask=bc_m, other=0.0).to(tl.float32)
    Ct = tl.load(C_ptr + bc_offs, mask=bc_m, other=0.0).to(tl.float32)
    dy = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
    return u, dt, raw, dt_next, Bt, Ct, dy


@triton.jit
def _chunk_states(u, dt, Bt, A2, h0):
    """A chunk's states h_t = a_t h_{t-1} + dt_t u_t B_t from h0 (BD, BN), the state entering it
    -> (h_t, a_t h_{t-1}), each (BD, BN, BL); A2 is A / ln 2 (exp2)."""
    a = tl.exp2(dt[:, None, :] * A2[:, :, None])
    x = (dt * u)[:, None, :] * Bt[None, :, :]
    a_cum, hs = tl.associative_scan((a, x), 2, _combine)
    hs += a_cum * h0[:, :, None]
    return hs, hs - x


@triton.jit
def _chunk_adjoint(dt_next, A2, Ct, dy, gd):
    """The adjoint g_t = dL/dh_t through a chunk, backwards: g_t = C_t dy_t + a_{t+1} g_{t+1},
    from gd (BD, BN), that of the state leaving the chunk -> g (BD, BN, BL)."""
    a_next = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
    a_cum, gs = tl.associative_scan((a_next, Ct[None, :, :] * dy[:, None, :]), 2, _combine,
                                    reverse=True)
    gs += a_cum * gd[:, :, None]
    return gs


@triton.jit
def _gate_bwd(z_ptr, dz_ptr, offs, m, dy, hs, Ct, u, Dv, HAS_D: tl.constexpr):
    """The gate out = y * silu(z), y = C h + D u, backwards: stores dL/dz, returns dL/dy."""
    zv = tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = tl.sum(hs * Ct[None, :, :], axis=1)
    if HAS_D:
        y += Dv[:, None] * u
    sz = tl.sigmoid(zv)
    tl.store(dz_ptr + offs, (dy * y * sz * (1 + zv * (1 - sz))).to(dz_ptr.dtype.element_ty),
             mask=m)
    return dy * (zv * sz)


@triton.jit
def _chunk_grads(gs, ah, hs, u, dt, raw, dy, Bt, A, Dv, m,
                 HAS_D: tl.constexpr, SOFTPLUS: tl.constexpr):
    """A chunk's gradients through the state update h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t and
    the skip D u, from the adjoint g: d(delta) (through softplus; 0 past the end) and du (BD, BL),
    dA (BD, BN), and dB, dC (BN, BL) summed over the block's channels."""
    gB = tl.sum(gs * Bt[None, :, :], axis=1)  # (BD, BL)
    gah = gs * ah
    ddt = gB * u + tl.sum(gah * A[:, :, None], axis=1)
    du = gB * dt
    if HAS_D:
        du += Dv[:, None] * dy
    if SOFTPLUS:
        ddt *= tl.sigmoid(raw)
    ddt = tl.where(m, ddt, 0.0)
    return (ddt, du, tl.sum(gah * dt[:, None, :], axis=2),
            tl.sum(gs * (dt * u)[:, None, :], axis=0), tl.sum(hs * dy[:, None, :], axis=0))


@triton.jit
def _scan_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, starts_ptr,
                     dout_ptr, dlast_ptr,
                     du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
                     dim, L, N, G, n_chunks,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    g = (tl.program_id(1) * BLOCK_D) // (dim // G)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    state_offs = (b * dim + d[:, None]) * N + n[None, :]  # (BD, BN) into (batch, dim, N)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=n_ok[None, :], other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    bias = tl.load(bias_ptr + d).to(tl.float32) if HAS_BIAS else None
    Dv = tl.load(D_ptr + d).to(tl.float32) if HAS_D else None
    row = (b * dim + d) * L
    bc_row = ((b * G + g) * N + n) * L
    first_col = (tl.arange(0, BLOCK_L) == 0)[None, None, :]
    # gd = dL/dh of the state leaving the chunk (the first state of the next one)
    if HAS_DLAST:
        gd = tl.load(dlast_ptr + state_offs, mask=n_ok[None, :], other=0.0).to(tl.float32)
    else:
        gd = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dA = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dD = tl.zeros((BLOCK_D,), tl.float32)
    dbias = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        t = c * BLOCK_L + tl.arange(0, BLOCK_L)
        m = (t < L)[None, :]
        offs = row[:, None] + t[None, :]
        bc_offs = bc_row[:, None] + t[None, :]
        bc_m = n_ok[:, None] & m
        u, dt, raw, dt_next, Bt, Ct, dy = _load_bwd_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, dout_ptr,
                                                          bias, offs, bc_offs, m, bc_m, t, L,
                                                          HAS_BIAS, SOFTPLUS)
        # recompute this chunk's states from the one saved by the forward
        h0 = tl.load(starts_ptr + ((b * dim + d[:, None]) * n_chunks + c) * N + n[None, :],
                     mask=n_ok[None, :], other=0.0)
        hs, ah = _chunk_states(u, dt, Bt, A2, h0)
        if HAS_Z:  # out = y silu(z): dz, and dy through the gate
            dy = _gate_bwd(z_ptr, dz_ptr, offs, m, dy, hs, Ct, u, Dv, HAS_D)
        gs = _chunk_adjoint(dt_next, A2, Ct, dy, gd)
        gd = tl.sum(tl.where(first_col, gs, 0.0), axis=2)
        ddt, du, dA_chunk, dB, dC = _chunk_grads(gs, ah, hs, u, dt, raw, dy, Bt, A, Dv, m,
                                                 HAS_D, SOFTPLUS)
        if HAS_D:
            dD += tl.sum(dy * u, axis=1)
        dA += dA_chunk
        dbias += tl.sum(ddt, axis=1)
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=m)
        tl.store(ddelta_ptr + offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=m)
        tl.atomic_add(dB_ptr + bc_offs, dB, mask=bc_m)
        tl.atomic_add(dC_ptr + bc_offs, dC, mask=bc_m)
    tl.atomic_add(dA_ptr + d[:, None] * N + n[None, :], dA, mask=n_ok[None, :])
    if HAS_D:
        tl.atomic_add(dD_ptr + d, dD)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + d, dbias)


# 8 warps: with 4, ptxas spills the backward's registers
# at Mamba-1's shape (tests/test_scan.py checks)
SCAN_LAUNCH = dict(num_warps=8)


def _triton_tiles(dim, G, N, L):
    """BLOCK_D (a power of two dividing dim / G), BLOCK_N, BLOCK_L:
    a tile of about 4096 elements."""
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_D = math.gcd(dim // G, max(1, 64 // BLOCK_N), 4)
    BLOCK_L = min(max(16, 4096 // (BLOCK_N * BLOCK_D)), 256, max(16, triton.next_power_of_2(L)))
    return BLOCK_D, BLOCK_N, BLOCK_L


class _TritonScan(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, dim, L = u.shape
        bc_shape = B.shape
        B, C = _grouped(B), _grouped(C)
        G, N = B.shape[1], A.shape[1]
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        z = None if z is None else z.contiguous()
        BLOCK_D, BLOCK_N, BLOCK_L = _triton_tiles(dim, G, N, L)
        n_chunks = triton.cdiv(L, BLOCK_L)
        out = torch.empty_like(u)
        last = u.new_empty(batch, dim, N, dtype=torch.float32)
        # grad mode is off inside forward; this says if backward will run
        save = any(ctx.needs_input_grad)
        starts = u.new_empty(batch, dim, n_chunks, N, dtype=torch.float32) if save else last
        _scan_fwd_kernel[(batch, dim // BLOCK_D)](
            u, delta, A, B, C, u if D is None else D, u if z is None else z,
            u if delta_bias is None else delta_bias,
            out, last, starts, dim, L, N, G, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, SAVE_STARTS=save,
            BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, BLOCK_L=BLOCK_L, **SCAN_LAUNCH)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, starts)
        ctx.delta_softplus, ctx.tiles, ctx.bc_shape = (delta_softplus, (BLOCK_D, BLOCK_N, BLOCK_L),
                                                       bc_shape)
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        batch, dim, L = u.shape
        G, N = B.shape[1], A.shape[1]
        BLOCK_D, BLOCK_N, BLOCK_L = ctx.tiles
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        dA = torch.zeros(dim, N, device=u.device, dtype=torch.float32)
        dB = torch.zeros(B.shape, device=u.device, dtype=torch.float32)
        dC = torch.zeros(C.shape, device=u.device, dtype=torch.float32)
        dD = None if D is None else torch.zeros(dim, device=u.device, dtype=torch.float32)
        dbias = (None if delta_bias is None
                 else torch.zeros(dim, device=u.device, dtype=torch.float32))
        _scan_bwd_kernel[(batch, dim // BLOCK_D)](
            u, delta, A, B, C, u if D is None else D, u if z is None else z,
            u if delta_bias is None else delta_bias,
            starts, dout, dout if dlast is None else dlast.contiguous(),
            du, ddelta, dA, dB, dC, dA if dD is None else dD, du if dz is None else dz,
            dA if dbias is None else dbias,
            dim, L, N, G, starts.shape[2],
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus, HAS_DLAST=dlast is not None,
            BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, BLOCK_L=BLOCK_L, **SCAN_LAUNCH)
        dB, dC = dB.view(ctx.bc_shape).to(B.dtype), dC.view(ctx.bc_shape).to(C.dtype)
        return (du, ddelta, dA.to(A.dtype), dB, dC,
                None if D is None else dD.to(D.dtype), dz,
                None if dbias is None else dbias.to(delta_bias.dtype), None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """The selective scan with the Triton kernels
    (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias)
    if A.shape[1] > 512:
        raise ValueError(f"A: N={A.shape[1]} states per channel; "
                         "the Triton kernels support N <= 512")
    out, last = _TritonScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """The selective scan (see the module docstring):
    Triton kernels on CUDA, the PyTorch path elsewhere."""
    scan = selective_scan_triton if u.is_cuda else selective_scan_cpu
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


# -----------------------------------------------------------------------------
# 4. Mamba-2's case as matrix products (SSD): the PyTorch path, then the Triton kernels
#
# When A is one scalar per head (Mamba-2), exp(delta_t A) is the same for all N states of a
# head, and the scan unrolls into matrix products (Dao & Gu 2024, "state space duality").
# Per batch row and head, with
#   Q      the chunk length (64)        P  headdim        N  d_state
#   dt_j   softplus(dt + dt_bias) at step j of a chunk; dt_j A <= 0 is the log of that
#          step's decay
#   s_t    the sum of dt_j A over the chunk's steps j <= t: the decay from step j to
#          step t is exp(s_t - s_j)
#   CB     (Q, Q), CB[t, j] = C_t . B_j: one per chunk, shared by every head
#   H_c    (P, N), the state entering chunk c (H_0: the initial state, or 0);
#          H_nc the state after the last
#   w_j    exp(s_Q - s_j) dt_j: how much of step j's input reaches the chunk's end
# the forward is, chunk by chunk:
#   (1) y_t = sum_{j <= t} CB[t, j] exp(s_t - s_j) dt_j x_j   in the chunk: a masked (Q, Q) product
#   (2)     + exp(s_t) H_c C_t                                from the state entering it
#   (3) H_{c+1} = exp(s_Q) H_c + sum_j w_j x_j B_j^T          the state passed on
# and the backward, given dy and G_c = dL/dH_c (G_nc: the gradient of the returned last
# state):
#   (4) G_c = exp(s_Q) G_{c+1} + sum_t exp(s_t) dy_t C_t^T    walked in reverse
#   (5) dx_j = sum_{t >= j} CB[t, j] exp(s_t - s_j) dt_j dy_t  +  w_j G_{c+1} B_j
#   (6) dC_t = sum_j dCB[t, j] B_j + exp(s_t) H_c^T dy_t
#       dB_j = sum_t dCB[t, j] C_t + w_j G_{c+1}^T x_j
#       where dCB[t, j] = (dy_t . x_j) exp(s_t - s_j) dt_j for j <= t, summed over the heads
#   (7) ddt_j (through dt_j itself) = sum_t (dy_t . x_j) CB[t, j] exp(s_t - s_j)
#                                     + exp(s_Q - s_j) x_j . G_{c+1} B_j
#   (8) ds_t: each of exp(s_t - s_j) in (1), exp(s_t) in (2), exp(s_Q - s_j) and exp(s_Q)
#       in (3), differentiated
# and ds reaches dt through s's cumulative sum. No (L, N)-per-channel tensor is formed, and on
# a GPU the products run on tensor cores.
#
# The PyTorch path keeps B, C and the states in (batch, chunk, ...) with the heads inside the
# matrix dimension, so B and C are never copied per head, and autograd does its backward; it
# serves the CPU and is the kernels' reference. The Triton kernels, in the order they run, with
# the equations above that each computes:
#   _ssd_cb_kernel           (1)              CB per (batch row, chunk)
#   _ssd_states_kernel       (3)              H_c, walking the chunks in order, a (P, N tile)
#                                             state on chip
#   _ssd_output_kernel       (1) (2)          y per (batch row x head, chunk)
#   the backward runs those three again (nothing state-sized is kept in between), then
#   _ssd_state_grad_kernel   (4)              G_c, walking the chunks in reverse
#   _ssd_intra_grad_kernel   (5) (7) (8) (6)  within a chunk: dx, ddt, ds, dA, and this head's dCB
#   _ssd_inter_grad_kernel   (5) (7) (8)      through the states: dx, ddt, ds, dA
#   _ssd_bc_grad_kernel      (6)              dB, dC, summing the heads on chip (B and C are
#                                             shared)


def _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state):
    """Validate shapes, devices and dtypes (ValueError naming the argument)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] == 0:
        raise ValueError("x: expected shape (batch, L, heads, headdim) with L >= 1, "
                         f"got {getattr(x, 'shape', type(x))}")
    batch, L, heads, headdim = x.shape
    dev = x.device
    _expect(x, "x", x.shape, dev)
    _expect(dt, "dt", (batch, L, heads), dev)
    _expect(A, "A", (heads,), dev)
    if not isinstance(B, torch.Tensor) or B.dim() != 3:
        raise ValueError(f"B: expected shape (batch, L, N), got {getattr(B, 'shape', type(B))}")
    N = B.shape[2]
    _expect(B, "B", (batch, L, N), dev)
    _expect(C, "C", (batch, L, N), dev)
    for name, t, shape in (("D", D, (heads,)), ("z", z, x.shape), ("dt_bias", dt_bias, (heads,)),
                           ("initial_state", initial_state, (batch, heads, headdim, N))):
        if t is not None:
            _expect(t, name, shape, dev)


def ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, chunk_size=64,
             return_last_state=False, initial_state=None):
    """The selective scan with one scalar A and dt per head (Mamba-2), as chunked matrix products.

        x, z: (batch, L, heads, headdim)   dt: (batch, L, heads)   A, D, dt_bias: (heads,)
        B, C: (batch, L, N), shared by all heads
        initial_state: (batch, heads, headdim, N) or None (zeros): the state before the first step
        -> out like x [, last_state (batch, heads, headdim, N), float32]

    The same function as selective_scan with A, dt and dt_bias repeated over each head's
    channels (channel d = head * headdim + i); the layout is mamba_ssm's
    mamba_chunk_scan_combined's. Computed in float32 whatever the inputs (float64 ones stay
    float64 in the PyTorch path; autocast is turned off inside) and returned in x's dtype.
    Exact while dt * A <= 0 (a decay, as softplus'd dt and negative A make it); a growing
    state loses precision here. CUDA tensors go to the Triton kernels below (chunk_size a
    power of two >= 16), others to the PyTorch path. Either way only the inputs are kept for
    the backward, which computes the chunks again: the per-chunk (headdim, N) states take
    about 620 MB per layer in float32 for the paper's Prefix SiMBA at batch 4 x 30 s, too much
    to keep for 24 layers.
    """
    scan = ssd_scan_triton if x.is_cuda else ssd_scan_torch
    return scan(x, dt, A, B, C, D, z, dt_bias, dt_softplus, chunk_size, return_last_state,
                initial_state)


def ssd_scan_torch(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, chunk_size=64,
                   return_last_state=False, initial_state=None):
    """ssd_scan in PyTorch, any device; the backward is autograd's, from the inputs
    (activation checkpointing)."""
    _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state)
    y, last = checkpoint(_ssd_chunks, x, dt, A, B, C, D, z, dt_bias, dt_softplus, chunk_size,
                         initial_state, use_reentrant=False)
    return (y, last) if return_last_state else y


def _ssd_chunks(x, dt, A, B, C, D, z, dt_bias, dt_softplus, Q, initial_state):
    """ssd_scan's computation -> (out, last_state). Arrays are (batch, chunk, ...): per step
    (b, c, Q, ...), per chunk (b, c, h * P, N) with the heads inside the matrix dimension."""
    batch, L, h, P = x.shape
    N = B.shape[-1]
    f = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        dt = dt.to(f) if dt_bias is None else dt.to(f) + dt_bias.to(f)
        if dt_softplus:
            dt = F.softplus(dt)
        pad = -L % Q  # steps with dt = 0 after the end: no decay, no input, so nothing changes
        nc = (L + pad) // Q

        def chunks(t):  # (b, L, ...) -> (b, c, Q, ...), zero-padded at the end
            return F.pad(t.to(f), (0, 0) * (t.dim() - 2) + (0, pad)).unflatten(1, (nc, Q))

        Bc, Cc, dtc = chunks(B), chunks(C), chunks(dt)  # (b, c, Q, N), (b, c, Q, N), (b, c, Q, h)
        xdt = chunks(x) * dtc[..., None]  # (b, c, Q, h, P): dt_j x_j
        # each exponent is A times a difference of cdt, dt summed from the chunk's start in
        # float64 (see the kernels below for why); the diagonal's exp(0) is a constant, so it adds
        # no rounding to the gradients
        A, cdt = A.to(f), dtc.double().cumsum(2)  # cdt: (b, c, Q, h)
        # (1) within each chunk: (C B^T, once per chunk) * the head's decays,
        # times the head's inputs
        causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
        ct = cdt.transpose(2, 3)  # (b, c, h, Q)
        exponent = torch.where(
            causal.tril(-1), A[:, None, None] * (ct[..., :, None] - ct[..., None, :]).to(f),
            torch.zeros(Q, Q, dtype=f, device=x.device).masked_fill(~causal, -math.inf))
        y = ((Cc @ Bc.transpose(-1, -2))[:, :, None] * torch.exp(exponent)) @ xdt.transpose(2, 3)
        y = y.transpose(2, 3)  # (b, c, h, Q, P) -> (b, c, Q, h, P)
        # (3) each chunk's input to the state, S_k, then the states entering the chunks all at
        # once: H_i = exp(A T_i) H_0 + sum_{k<i} exp(A (T_i - T_{k+1})) S_k,
        # T_i = dt summed up to chunk i's start
        # w: (b, c, Q, h, 1), the decay to the chunk's end
        w = torch.exp(A * (cdt[:, :, -1:] - cdt).to(f))[..., None]
        S = ((xdt * w).flatten(3).transpose(-1, -2) @ Bc).unflatten(2, (h, P))  # (b, c, h, P, N)
        # T: (b, c + 1, h), float64; T[:, nc]: the sequence's end
        T = F.pad(cdt[:, :, -1].cumsum(1), (0, 0, 1, 0))
        # past: (c + 1, c, 1), k < i
        past = torch.ones(nc + 1, nc, dtype=torch.bool, device=x.device).tril(-1)[..., None]
        # W: (b, c + 1, c, h)
        W = torch.exp((A * (T[:, :, None] - T[:, None, 1:]).to(f)).masked_fill(~past, -math.inf))
        # H: (b, c + 1, h, P, N); H[:, i] enters chunk i; H[:, nc]: the last state
        H = torch.einsum("bikh,bkhpn->bihpn", W, S)
        if initial_state is not None:
            H = H + torch.exp(A * T.to(f))[..., None, None] * initial_state.to(f)[:, None]
        H = H.flatten(2, 3)  # (b, c + 1, h * P, N)
        # (2) from the state entering each chunk
        y = y + ((Cc @ H[:, :nc].transpose(-1, -2)).unflatten(-1, (h, P))
                 * torch.exp(A * cdt.to(f))[..., None])
        y = y.flatten(1, 2)[:, :L]  # (b, L, h, P)
        if D is not None:
            y = y + D.to(f)[:, None] * x.to(f)
        if z is not None:
            y = y * F.silu(z.to(f))
    return y.to(x.dtype), H[:, nc].view(batch, h, P, N).contiguous()


# The Triton kernels. dt (after bias and softplus) and cdt, its cumulative sum from each chunk's
# start, are prepared in PyTorch as (batch, heads, chunk, Q) tensors, and each exponent is formed
# in the kernels as A times a difference of cdt (s_t - s_j = A (cdt_t - cdt_j)). cdt is float64:
# in float32, when large and tiny steps mix, the difference of two cumulative sums loses the tiny
# steps' digits, and with them 1% of dA. x, z, dy are (batch, L, heads, P), B, C (batch, L, N),
# states (batch, heads, chunk + 1, P, N), all contiguous. Products accumulate in float32; on a GPU
# their operands are rounded to TF32 (DOT = "tf32") where the inputs are bfloat16 or float16
# anyway, and split into three TF32 products (DOT = "tf32x3", float32's accuracy on tensor cores)
# where they are float32.

@triton.jit
def _ssd_cb_kernel(C_ptr, B_ptr, cb_ptr, L, N, nc, Q: tl.constexpr, BLOCK_N: tl.constexpr,
                   DOT: tl.constexpr):
    """CB = C B^T of one chunk of one batch row: (Q, Q). Grid (batch * chunks,)."""
    b, c = tl.program_id(0).to(tl.int64) // nc, tl.program_id(0) % nc
    t = c * Q + tl.arange(0, Q)  # (Q,) steps of the chunk
    t_ok = t < L
    acc = tl.zeros((Q, Q), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        offs, m = (b * L + t[:, None]) * N + n[None, :], t_ok[:, None] & (n < N)[None, :]  # (Q, BN)
        Cv = tl.load(C_ptr + offs, mask=m, other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + offs, mask=m, other=0.0).to(tl.float32)
        acc += tl.dot(Cv, tl.trans(Bv), input_precision=DOT)
    i = tl.arange(0, Q)
    tl.store(cb_ptr + ((b * nc + c) * Q + i[:, None]) * Q + i[None, :], acc)


@triton.jit
def _ssd_decays(A_ptr, dt_ptr, cdt_ptr, h, chunk, Q: tl.constexpr):
    """One chunk's dt (Q,), cdt (Q,) float64, the head's A, exp(s_t) (Q,), exp(s_Q - s_j) (Q,),
    and the masked (Q, Q) decays exp(s_t - s_j), j <= t."""
    q = tl.arange(0, Q)
    a = tl.load(A_ptr + h).to(tl.float32)
    dt, cdt, cdt_end = (tl.load(dt_ptr + chunk + q), tl.load(cdt_ptr + chunk + q),
                        tl.load(cdt_ptr + chunk + Q - 1))
    gap = (cdt[:, None] - cdt[None, :]).to(tl.float32)
    decay = tl.exp(tl.where(q[:, None] >= q[None, :], a * gap, float("-inf")))
    return (dt, cdt, a, tl.exp(a * cdt.to(tl.float32)), tl.exp(a * (cdt_end - cdt).to(tl.float32)),
            decay)


@triton.jit
def _ssd_states_kernel(x_ptr, B_ptr, A_ptr, dt_ptr, cdt_ptr, init_ptr, states_ptr, L, H, P, N, nc,
                       HAS_INIT: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """(3): the states entering every chunk and the last one, for one (batch row, head) and N
    tile, walking the chunks in order with the (P, N tile) state on chip.
    Grid (batch * heads, N tiles)."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    p, n, q = (tl.arange(0, BLOCK_P), tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N),
               tl.arange(0, Q))
    pn_ok = (p < P)[:, None] & (n < N)[None, :]
    pn = p[:, None] * N + n[None, :]  # (BP, BN) within one (P, N) state
    if HAS_INIT:
        state = tl.load(init_ptr + bh * P * N + pn, mask=pn_ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    for c in range(nc):
        tl.store(states_ptr + (bh * (nc + 1) + c) * P * N + pn, state, mask=pn_ok)
        t = c * Q + q
        x = tl.load(x_ptr + ((b * L + t[:, None]) * H + h) * P + p[None, :],
                    mask=(t < L)[:, None] & (p < P)[None, :], other=0.0).to(tl.float32)  # (Q, BP)
        Bv = tl.load(B_ptr + (b * L + t[:, None]) * N + n[None, :],
                     mask=(t < L)[:, None] & (n < N)[None, :], other=0.0).to(tl.float32)  # (Q, BN)
        a = tl.load(A_ptr + h).to(tl.float32)
        dt, cdt = tl.load(dt_ptr + (bh * nc + c) * Q + q), tl.load(cdt_ptr + (bh * nc + c) * Q + q)
        cdt_end = tl.load(cdt_ptr + (bh * nc + c) * Q + Q - 1)
        w = tl.exp(a * (cdt_end - cdt).to(tl.float32)) * dt  # (Q,)
        state = state * tl.exp(a * cdt_end.to(tl.float32)) + tl.dot(tl.trans(x * w[:, None]), Bv,
                                                                    input_precision=DOT)  # (BP, BN)
    tl.store(states_ptr + (bh * (nc + 1) + nc) * P * N + pn, state, mask=pn_ok)


@triton.jit
def _ssd_output_kernel(x_ptr, C_ptr, cb_ptr, A_ptr, dt_ptr, cdt_ptr, states_ptr, D_ptr, z_ptr,
                       out_ptr, L, H, P, N, nc, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                       Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT: tl.constexpr):
    """(1) + (2), then D and the gate: the output of one chunk of one (batch row, head).
    Grid (batch * heads, chunks)."""
    bh, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, h = bh // H, bh % H
    p, q = tl.arange(0, BLOCK_P), tl.arange(0, Q)
    t = c * Q + q
    tp_ok = (t < L)[:, None] & (p < P)[None, :]
    x_offs = ((b * L + t[:, None]) * H + h) * P + p[None, :]  # (Q, BP)
    dt, _, _, es, _, decay = _ssd_decays(A_ptr, dt_ptr, cdt_ptr, h, (bh * nc + c) * Q, Q)
    y = tl.zeros((Q, BLOCK_P), tl.float32)
    for n0 in range(0, N, BLOCK_N):  # (2): C_t . H_c
        n = n0 + tl.arange(0, BLOCK_N)
        Cv = tl.load(C_ptr + (b * L + t[:, None]) * N + n[None, :],
                     mask=(t < L)[:, None] & (n < N)[None, :], other=0.0).to(tl.float32)  # (Q, BN)
        Hc = tl.load(states_ptr + (bh * (nc + 1) + c) * P * N + p[:, None] * N + n[None, :],
                     mask=(p < P)[:, None] & (n < N)[None, :], other=0.0)  # (BP, BN)
        y += tl.dot(Cv, tl.trans(Hc), input_precision=DOT)
    y *= es[:, None]
    cb = tl.load(cb_ptr + ((b * nc + c) * Q + q[:, None]) * Q + q[None, :])  # (Q, Q)
    x = tl.load(x_ptr + x_offs, mask=tp_ok, other=0.0).to(tl.float32)
    y += tl.dot(cb * decay * dt[None, :], x, input_precision=DOT)  # (1)
    if HAS_D:
        y += tl.load(D_ptr + h).to(tl.float32) * x
    if HAS_Z:
        zv = tl.load(z_ptr + x_offs, mask=tp_ok, other=0.0).to(tl.float32)
        y *= zv * tl.sigmoid(zv)
    tl.store(out_ptr + x_offs, y.to(out_ptr.dtype.element_ty), mask=tp_ok)


@triton.jit
def _ssd_state_grad_kernel(dy_ptr, C_ptr, A_ptr, cdt_ptr, states_ptr, dlast_ptr, dstates_ptr,
                           carried_ptr, L, H, P, N, nc, HAS_DLAST: tl.constexpr,
                           Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                           DOT: tl.constexpr):
    """(4): G_c for every chunk, walking them in reverse with the (P, N tile) gradient on chip;
    and, for (8), the gradient of exp(s_Q) in (3), exp(s_Q) sum(H_c * G_{c+1}), per N tile.
    Grid (batch * heads, N tiles)."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    p, n, q = (tl.arange(0, BLOCK_P), tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N),
               tl.arange(0, Q))
    pn_ok = (p < P)[:, None] & (n < N)[None, :]
    pn = p[:, None] * N + n[None, :]
    a = tl.load(A_ptr + h).to(tl.float32)
    if HAS_DLAST:
        g = tl.load(dlast_ptr + bh * P * N + pn, mask=pn_ok, other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    for i in range(nc):
        c = nc - 1 - i
        tl.store(dstates_ptr + (bh * (nc + 1) + c + 1) * P * N + pn, g, mask=pn_ok)  # G_{c+1}
        es = tl.exp(a * tl.load(cdt_ptr + (bh * nc + c) * Q + q).to(tl.float32))
        es_end = tl.exp(a * tl.load(cdt_ptr + (bh * nc + c) * Q + Q - 1).to(tl.float32))
        Hc = tl.load(states_ptr + (bh * (nc + 1) + c) * P * N + pn, mask=pn_ok, other=0.0)
        tl.store(carried_ptr + (bh * nc + c) * tl.num_programs(1) + tl.program_id(1),
                 es_end * tl.sum(Hc * g))
        t = c * Q + q
        dy = tl.load(dy_ptr + ((b * L + t[:, None]) * H + h) * P + p[None, :],
                     mask=(t < L)[:, None] & (p < P)[None, :], other=0.0).to(tl.float32)  # (Q, BP)
        Cv = tl.load(C_ptr + (b * L + t[:, None]) * N + n[None, :],
                     mask=(t < L)[:, None] & (n < N)[None, :], other=0.0).to(tl.float32)  # (Q, BN)
        g = g * es_end + tl.dot(tl.trans(dy * es[:, None]), Cv, input_precision=DOT)
    # G_0: the initial state's gradient
    tl.store(dstates_ptr + bh * (nc + 1) * P * N + pn, g, mask=pn_ok)


@triton.jit
def _ssd_intra_grad_kernel(x_ptr, dy_ptr, cb_ptr, A_ptr, dt_ptr, cdt_ptr, D_ptr, dx_ptr, ddt_ptr,
                           ds_ptr, dA_ptr, dD_ptr, dcb_ptr, L, H, P, nc, HAS_D: tl.constexpr,
                           Q: tl.constexpr, BLOCK_P: tl.constexpr, DOT: tl.constexpr):
    """The terms of (1): dx and ddt of (5) and (7) within the chunk, ds of (8) for
    exp(s_t - s_j), their share of dA, this head's dCB of (6), and dD, for one chunk of one
    (batch row, head). Grid (batch * heads, chunks)."""
    bh, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, h = bh // H, bh % H
    p, q = tl.arange(0, BLOCK_P), tl.arange(0, Q)
    t = c * Q + q
    tp_ok = (t < L)[:, None] & (p < P)[None, :]
    x_offs = ((b * L + t[:, None]) * H + h) * P + p[None, :]  # (Q, BP)
    x = tl.load(x_ptr + x_offs, mask=tp_ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + x_offs, mask=tp_ok, other=0.0).to(tl.float32)
    chunk = (bh * nc + c) * Q
    dt, cdt, _, _, _, decay = _ssd_decays(A_ptr, dt_ptr, cdt_ptr, h, chunk, Q)
    qq = q[:, None] * Q + q[None, :]  # (Q, Q) within one chunk's matrix
    cb = tl.load(cb_ptr + (b * nc + c) * Q * Q + qq)
    dx = tl.dot(tl.trans(cb * decay * dt[None, :]), dy, input_precision=DOT)  # (5)
    if HAS_D:
        dx += tl.load(D_ptr + h).to(tl.float32) * dy
        tl.store(dD_ptr + bh * nc + c, tl.sum(dy * x))
    tl.store(dx_ptr + x_offs, dx.to(dx_ptr.dtype.element_ty), mask=tp_ok)
    dM = tl.dot(dy, tl.trans(x), input_precision=DOT) * decay  # (Q, Q): (dy_t . x_j) exp(s_t - s_j)
    tl.store(dcb_ptr + chunk * Q + qq, dM * dt[None, :])  # (6): this head's dCB
    R = cb * dM  # (Q, Q): (dy_t . x_j) CB[t, j] exp(s_t - s_j)
    tl.store(ddt_ptr + chunk + q, tl.sum(R, 0))  # (7)
    # (8): exp(s_t - s_j) gives +R dt_j to s_t and -R dt_j to s_j;
    # the diagonal (always exp(0)) is left out
    R = tl.where(q[:, None] > q[None, :], R * dt[None, :], 0.0)
    tl.store(ds_ptr + chunk + q, tl.sum(R, 1) - tl.sum(R, 0))
    tl.store(dA_ptr + bh * nc + c,
             tl.sum(R * (cdt[:, None] - cdt[None, :]).to(tl.float32)))  # s = A cdt


@triton.jit
def _ssd_inter_grad_kernel(x_ptr, dy_ptr, B_ptr, C_ptr, A_ptr, dt_ptr, cdt_ptr, states_ptr,
                           dstates_ptr, dx_ptr, ddt_ptr, ds_ptr, dA_ptr, L, H, P, N, nc,
                           Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                           DOT: tl.constexpr):
    """The terms of (2) and (3), added to what _ssd_intra_grad_kernel wrote: dx of (5) and ddt of
    (7) through the state passed on, and ds of (8) and dA for exp(s_t) and exp(s_Q - s_j).
    Grid (batch * heads, chunks)."""
    bh, c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    b, h = bh // H, bh % H
    p, q = tl.arange(0, BLOCK_P), tl.arange(0, Q)
    t = c * Q + q
    tp_ok = (t < L)[:, None] & (p < P)[None, :]
    y_in = tl.zeros((Q, BLOCK_P), tl.float32)  # H_c C_t
    gB = tl.zeros((Q, BLOCK_P), tl.float32)  # G_{c+1} B_j
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        tn, tn_ok = (b * L + t[:, None]) * N + n[None, :], (t < L)[:, None] & (n < N)[None, :]
        pn, pn_ok = p[:, None] * N + n[None, :], (p < P)[:, None] & (n < N)[None, :]
        Hc = tl.load(states_ptr + (bh * (nc + 1) + c) * P * N + pn, mask=pn_ok,
                     other=0.0)  # (BP, BN)
        y_in += tl.dot(tl.load(C_ptr + tn, mask=tn_ok, other=0.0).to(tl.float32), tl.trans(Hc),
                       input_precision=DOT)
        G = tl.load(dstates_ptr + (bh * (nc + 1) + c + 1) * P * N + pn, mask=pn_ok, other=0.0)
        gB += tl.dot(tl.load(B_ptr + tn, mask=tn_ok, other=0.0).to(tl.float32), tl.trans(G),
                     input_precision=DOT)
    x_offs = ((b * L + t[:, None]) * H + h) * P + p[None, :]  # (Q, BP)
    x = tl.load(x_ptr + x_offs, mask=tp_ok, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + x_offs, mask=tp_ok, other=0.0).to(tl.float32)
    chunk = (bh * nc + c) * Q
    dt, cdt, _, es, to_end, _ = _ssd_decays(A_ptr, dt_ptr, cdt_ptr, h, chunk, Q)
    cdt_end = tl.load(cdt_ptr + chunk + Q - 1)
    dx = (tl.load(dx_ptr + x_offs, mask=tp_ok, other=0.0).to(tl.float32)
          + (to_end * dt)[:, None] * gB)  # (5)
    tl.store(dx_ptr + x_offs, dx.to(dx_ptr.dtype.element_ty), mask=tp_ok)
    xgB = tl.sum(x * gB, 1)
    tl.store(ddt_ptr + chunk + q, tl.load(ddt_ptr + chunk + q) + to_end * xgB)  # (7)
    e = es * tl.sum(dy * y_in, 1)  # (8), exp(s_t) in (2): +e_t to s_t
    r = to_end * dt * xgB  # (8), exp(s_Q - s_j) in (3): -r_j to s_j, +r_j to s_Q
    ds = tl.load(ds_ptr + chunk + q) + e - r + tl.where(q == Q - 1, tl.sum(r), 0.0)
    tl.store(ds_ptr + chunk + q, ds)
    dA = tl.sum(e * cdt.to(tl.float32)) + tl.sum(r * (cdt_end - cdt).to(tl.float32))
    tl.store(dA_ptr + bh * nc + c, tl.load(dA_ptr + bh * nc + c) + dA)


@triton.jit
def _ssd_bc_grad_kernel(u_ptr, states_ptr, dcb_ptr, other_ptr, A_ptr, dt_ptr, cdt_ptr, out_ptr,
                        L, H, P, N, nc, FOR_B: tl.constexpr, Q: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    """(6) for one chunk of one batch row and N tile, summed over the heads on chip (B and C are
    shared by all heads; no atomics). The two are the same computation on different inputs,
    one launch each:
        dC_t = sum_j dCB[t, j] B_j + sum_heads exp(s_t) H_c^T dy_t   u = dy, states = H, other = B
        dB_j = sum_t dCB[t, j] C_t + sum_heads w_j G_{c+1}^T x_j    u = x, states = G, other = C
    dcb: dCB summed over the heads, (batch, chunks, Q, Q). Grid (batch * chunks, N tiles)."""
    b, c = tl.program_id(0).to(tl.int64) // nc, tl.program_id(0) % nc
    p, n, q = (tl.arange(0, BLOCK_P), tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N),
               tl.arange(0, Q))
    t = c * Q + q
    tp_ok, tn_ok = (t < L)[:, None] & (p < P)[None, :], (t < L)[:, None] & (n < N)[None, :]
    pn, pn_ok = p[:, None] * N + n[None, :], (p < P)[:, None] & (n < N)[None, :]
    acc = tl.zeros((Q, BLOCK_N), tl.float32)
    for h in range(H):
        bh = b * H + h
        a = tl.load(A_ptr + h).to(tl.float32)
        cdt = tl.load(cdt_ptr + (bh * nc + c) * Q + q)
        if FOR_B:  # w_j = exp(s_Q - s_j) dt_j, with the state leaving the chunk
            scale = tl.exp(a * (tl.load(cdt_ptr + (bh * nc + c) * Q + Q - 1) - cdt).to(tl.float32))
            scale *= tl.load(dt_ptr + (bh * nc + c) * Q + q)
            state = tl.load(states_ptr + (bh * (nc + 1) + c + 1) * P * N + pn, mask=pn_ok,
                            other=0.0)  # (BP, BN)
        else:  # exp(s_t), with the state entering the chunk
            scale = tl.exp(a * cdt.to(tl.float32))
            state = tl.load(states_ptr + (bh * (nc + 1) + c) * P * N + pn, mask=pn_ok, other=0.0)
        u = tl.load(u_ptr + ((b * L + t[:, None]) * H + h) * P + p[None, :], mask=tp_ok,
                    other=0.0).to(tl.float32)
        acc += tl.dot(u * scale[:, None], state, input_precision=DOT)
    dcb = tl.load(dcb_ptr + ((b * nc + c) * Q + q[:, None]) * Q + q[None, :])  # (Q, Q)
    offs = (b * L + t[:, None]) * N + n[None, :]
    other = tl.load(other_ptr + offs, mask=tn_ok, other=0.0).to(tl.float32)
    acc += (tl.dot(tl.trans(dcb), other, input_precision=DOT) if FOR_B
            else tl.dot(dcb, other, input_precision=DOT))
    tl.store(out_ptr + offs, acc, mask=tn_ok)


def _ssd_tiles(P, N):
    """BLOCK_P (headdim, padded to a power of two >= 16) and BLOCK_N (an N tile of at most 32)."""
    return max(16, triton.next_power_of_2(P)), min(32, max(16, triton.next_power_of_2(N)))


# every SSD kernel runs with 8 warps and 2 pipeline stages: at the paper's shape (headdim 64,
# d_state 512, chunks of 64), ptxas reports no register spills for any of them, in float32 or
# bfloat16 (tests/test_scan.py)
SSD_LAUNCH = dict(num_warps=8, num_stages=2)


def _ssd_dot(dtype):
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _ssd_forward(x, dt, cdt, A, B, C, D, z, init, Q, gate=True):
    """The forward kernels -> (out, CB, states); dt, cdt: (batch, heads, chunks, Q)."""
    batch, L, H, P = x.shape
    N, nc = B.shape[-1], dt.shape[2]
    BLOCK_P, BLOCK_N = _ssd_tiles(P, N)
    cb = x.new_empty(batch, nc, Q, Q, dtype=torch.float32)
    DOT = _ssd_dot(x.dtype)
    _ssd_cb_kernel[(batch * nc,)](C, B, cb, L, N, nc, Q=Q, BLOCK_N=BLOCK_N, DOT=DOT, **SSD_LAUNCH)
    states = x.new_empty(batch, H, nc + 1, P, N, dtype=torch.float32)
    _ssd_states_kernel[(batch * H, triton.cdiv(N, BLOCK_N))](
        x, B, A, dt, cdt, x if init is None else init, states, L, H, P, N, nc,
        HAS_INIT=init is not None, Q=Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, DOT=DOT, **SSD_LAUNCH)
    out = torch.empty_like(x)
    has_z = gate and z is not None
    _ssd_output_kernel[(batch * H, nc)](
        x, C, cb, A, dt, cdt, states, x if D is None else D, z if has_z else x, out, L, H, P, N, nc,
        HAS_D=D is not None, HAS_Z=has_z, Q=Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, DOT=DOT,
        **SSD_LAUNCH)
    return out, cb, states


class _SSDTriton(torch.autograd.Function):
    """The kernels as one autograd op on (x, dt, A, B, C, D, z, initial state), dt as
    (batch, heads, chunks, Q); autograd takes dt's gradient back through the padding, softplus
    and dt_bias. Only the inputs are saved: the backward runs the forward kernels again."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, init, Q):
        cdt = dt.double().cumsum(-1)
        out, _, states = _ssd_forward(x, dt, cdt, A, B, C, D, z, init, Q)
        ctx.save_for_backward(x, dt, A, B, C, D, z, init)
        ctx.Q = Q
        ctx.set_materialize_grads(False)
        return out, states[:, :, -1].contiguous()

    @staticmethod
    def backward(ctx, dout, dlast):
        x, dt, A, B, C, D, z, init = ctx.saved_tensors
        Q = ctx.Q
        batch, L, H, P = x.shape
        N, nc = B.shape[-1], dt.shape[2]
        BLOCK_P, BLOCK_N = _ssd_tiles(P, N)
        DOT = _ssd_dot(x.dtype)
        cdt = dt.double().cumsum(-1)
        # y before the gate
        y, cb, states = _ssd_forward(x, dt, cdt, A, B, C, D, z, init, Q, gate=False)
        dy = torch.zeros_like(x, dtype=torch.float32) if dout is None else dout.float()
        dz = None
        if z is not None:  # out = y * silu(z)
            zf = z.float()
            sz = torch.sigmoid(zf)
            dz = (dy * y.float() * sz * (1 + zf * (1 - sz))).to(z.dtype)
            dy = dy * zf * sz
        dy = dy.contiguous()
        n_tiles = triton.cdiv(N, BLOCK_N)
        dstates = torch.empty_like(states)
        carried = x.new_empty(batch, H, nc, n_tiles, dtype=torch.float32)
        _ssd_state_grad_kernel[(batch * H, n_tiles)](
            dy, C, A, cdt, states, dy if dlast is None else dlast.contiguous(), dstates, carried,
            L, H, P, N, nc,
            HAS_DLAST=dlast is not None, Q=Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, DOT=DOT,
            **SSD_LAUNCH)
        dx = torch.empty_like(x)
        ddt, ds = torch.empty_like(dt), torch.empty_like(dt)
        dA = x.new_empty(batch, H, nc, dtype=torch.float32)
        dD = x.new_empty(batch, H, nc, dtype=torch.float32) if D is not None else None
        dcb = x.new_empty(batch, H, nc, Q, Q, dtype=torch.float32)
        _ssd_intra_grad_kernel[(batch * H, nc)](
            x, dy, cb, A, dt, cdt, x if D is None else D, dx, ddt, ds, dA, dA if dD is None else dD,
            dcb, L, H, P, nc,
            HAS_D=D is not None, Q=Q, BLOCK_P=BLOCK_P, DOT=DOT, **SSD_LAUNCH)
        _ssd_inter_grad_kernel[(batch * H, nc)](
            x, dy, B, C, A, dt, cdt, states, dstates, dx, ddt, ds, dA, L, H, P, N, nc,
            Q=Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, DOT=DOT, **SSD_LAUNCH)
        dcb = dcb.sum(1)  # (b, c, Q, Q): over the heads
        dB, dC = torch.empty_like(B, dtype=torch.float32), torch.empty_like(C, dtype=torch.float32)
        for u, st, other, out, for_b in ((x, dstates, C, dB, True), (dy, states, B, dC, False)):
            _ssd_bc_grad_kernel[(batch * nc, n_tiles)](
                u, st, dcb, other, A, dt, cdt, out, L, H, P, N, nc,
                FOR_B=for_b, Q=Q, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, DOT=DOT, **SSD_LAUNCH)
        # (8), exp(s_Q) in (3): the state carried over;
        # then s = A cdt and cdt = cumsum(dt) take ds back to dt
        carried = carried.sum(-1)  # (b, h, c)
        ds[..., -1] += carried
        dA = dA.sum((0, 2)) + (carried * cdt[..., -1]).sum((0, 2)).float()
        ddt += (A.float()[:, None, None] * ds).flip(-1).cumsum(-1).flip(-1)
        dinit = None if init is None else dstates[:, :, 0].to(init.dtype)
        return (dx, ddt, dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
                None if D is None else dD.sum((0, 2)).to(D.dtype), dz, dinit, None)


def ssd_scan_triton(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, chunk_size=64,
                    return_last_state=False, initial_state=None):
    """ssd_scan with the Triton kernels (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    _check_ssd_args(x, dt, A, B, C, D, z, dt_bias, initial_state)
    Q = chunk_size
    if Q < 16 or Q & (Q - 1):
        raise ValueError(f"chunk_size: the Triton kernels need a power of two >= 16, got {Q}")
    with torch.autocast(x.device.type, enabled=False):
        dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
        if dt_softplus:
            dt = F.softplus(dt)
        L = x.shape[1]
        nc = triton.cdiv(L, Q)
        # (b, h, c, Q); 0 past L
        dt = F.pad(dt, (0, 0, 0, nc * Q - L)).unflatten(1, (nc, Q)).permute(0, 3, 1, 2)
        x, B, C = x.contiguous(), B.contiguous(), C.contiguous()
        z = None if z is None else z.contiguous()
        init = None if initial_state is None else initial_state.contiguous()
        y, last = _SSDTriton.apply(x, dt.contiguous(), A.contiguous(), B, C, D, z, init, Q)
    return (y, last) if return_last_state else y


# -----------------------------------------------------------------------------
# one step of the recurrence, for generation


def _check_step_args(state, x, dt, A, B, C, D, z, dt_bias):
    """Validate a single-step call; return (batch, dim, N, G)."""
    if not isinstance(state, torch.Tensor) or state.dim() != 3:
        raise ValueError("state: expected shape (batch, dim, N), "
                         f"got {getattr(state, 'shape', type(state))}")
    batch, dim, N = state.shape
    dev = state.device
    _expect(x, "x", (batch, dim), dev)
    _expect(dt, "dt", (batch, dim), dev)
    _expect(A, "A", (dim, N), dev)
    G = _check_bc(B, C, batch, dim, N, (), dev)
    for name, t, shape in (("D", D, (dim,)), ("z", z, (batch, dim)), ("dt_bias", dt_bias, (dim,))):
        if t is not None:
            _expect(t, name, shape, dev)
    if state.dtype not in (torch.float32, torch.float64) or not state.is_contiguous():
        raise ValueError("state: expected a contiguous float32 tensor (it is updated in place), "
                         f"got {state.dtype}")
    return batch, dim, N, G


def selective_state_update_cpu(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False):
    """One step in PyTorch: state (batch, dim, N) is updated in place; returns out (batch, dim)."""
    batch, dim, N, G = _check_step_args(state, x, dt, A, B, C, D, z, dt_bias)
    f = state.dtype
    dt = dt.to(f) if dt_bias is None else dt.to(f) + dt_bias.to(f)
    if dt_softplus:
        dt = F.softplus(dt)
    h = state.view(batch, G, dim // G, N)
    B = B.to(f).reshape(batch, G, 1, N)
    C = C.to(f).reshape(batch, G, 1, N)
    h.mul_(torch.exp(dt.reshape(batch, G, dim // G, 1) * A.to(f).reshape(G, dim // G, N)))
    h.add_((dt * x.to(f)).reshape(batch, G, dim // G, 1) * B)
    y = (h * C).sum(-1).view(batch, dim)  # (batch, dim)
    if D is not None:
        y = y + D.to(f) * x.to(f)
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(x.dtype)


@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
                         out_ptr, dim, N, G,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
    g = (tl.program_id(1) * BLOCK_D) // (dim // G)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    s_offs = (b * dim + d[:, None]) * N + n[None, :]  # (BD, BN)
    h = tl.load(state_ptr + s_offs, mask=n_ok[None, :], other=0.0)
    x = tl.load(x_ptr + b * dim + d).to(tl.float32)
    dt = tl.load(dt_ptr + b * dim + d).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + d).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=n_ok[None, :], other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + (b * G + g) * N + n, mask=n_ok, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + (b * G + g) * N + n, mask=n_ok, other=0.0).to(tl.float32)
    h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_ptr + s_offs, h, mask=n_ok[None, :])
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d).to(tl.float32) * x
    if HAS_Z:
        zv = tl.load(z_ptr + b * dim + d).to(tl.float32)
        y *= zv * tl.sigmoid(zv)
    tl.store(out_ptr + b * dim + d, y.to(out_ptr.dtype.element_ty))


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                  dt_softplus=False):
    """One step with a Triton kernel: state (batch, dim, N) fp32, updated in place;
    returns out (batch, dim)."""
    batch, dim, N, G = _check_step_args(state, x, dt, A, B, C, D, z, dt_bias)
    if state.dtype != torch.float32:
        raise ValueError(f"state: the Triton step needs a float32 state, got {state.dtype}")
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    BLOCK_N = triton.next_power_of_2(N)
    BLOCK_D = math.gcd(dim // G, max(1, 2048 // BLOCK_N), 32)
    out = torch.empty_like(x)
    _state_update_kernel[(batch, dim // BLOCK_D)](
        state, x, dt, A, B, C, x if D is None else D, x if z is None else z.contiguous(),
        x if dt_bias is None else dt_bias, out, dim, N, G,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
    return out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One recurrent step (see the module docstring): Triton on CUDA, PyTorch elsewhere."""
    step = selective_state_update_triton if state.is_cuda else selective_state_update_cpu
    return step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


# -----------------------------------------------------------------------------
# one Mamba-2 step for generation: the causal convolution and the state update together
#
# The convolution's state is a ring of the last d_conv inputs per channel: the input of position
# t sits in slot t % d_conv, so a step writes one slot (the oldest input's) and moves nothing. On
# CUDA one kernel per step and layer does the convolution over (x, B, C), its silu,
# softplus(dt + dt_bias), the state update and the output, reading A, D and dt_bias per head as
# the model keeps them. Each program owns one (batch row, head); B and C are shared by the heads,
# so every program convolves them and head 0 writes their new slot (the others read only older
# slots, which no program writes this step).


def causal_conv_step(conv_state, x, weight, bias, pos):
    """One step of a causal depthwise convolution with a ring state: conv_state (B, C, K) takes
    x (B, C) into slot pos % K in place; -> the convolution's output (B, C), before any
    activation. pos: a 0-d long tensor."""
    K = conv_state.shape[-1]
    conv_state.index_copy_(2, (pos % K).view(1), x[..., None].to(conv_state.dtype))
    # oldest .. newest
    window = conv_state.index_select(2, (pos + 1 + torch.arange(K, device=x.device)) % K)
    return (window * weight).sum(-1) + bias


def conv_ring_state(x, width):
    """The ring state causal_conv_step continues after the L steps of x (B, C, L): the last
    `width` inputs (zeros before the first), the input of position t in slot t % width
    -> (B, C, width)."""
    last = F.pad(x, (max(0, width - x.shape[-1]), 0))[..., -width:]  # oldest .. newest
    return torch.roll(last, shifts=x.shape[-1] % width, dims=-1).contiguous()


def _check_ssd_step_args(state, conv_state, xBC, dt, weight, bias, A, D, dt_bias, pos):
    """Validate a Mamba-2 step (ValueError naming the argument);
    return (batch, heads, headdim, N, channels)."""
    if not isinstance(state, torch.Tensor) or state.dim() != 4 or state.dtype != torch.float32:
        raise ValueError(f"state: expected a float32 tensor (batch, heads, headdim, N), got "
                         f"{getattr(state, 'shape', type(state))}")
    batch, H, P, N = state.shape
    CH, dev = H * P + 2 * N, state.device
    if not state.is_contiguous() or not conv_state.is_contiguous():
        raise ValueError("state, conv_state: expected contiguous tensors "
                         "(they are updated in place)")
    if conv_state.dim() != 3 or conv_state.shape[:2] != (batch, CH):
        raise ValueError(f"conv_state: expected shape ({batch}, {CH}, d_conv), "
                         f"got {tuple(conv_state.shape)}")
    K = conv_state.shape[-1]
    for name, t, shape in (("xBC", xBC, (batch, CH)), ("dt", dt, (batch, H)),
                           ("weight", weight, (CH, K)), ("bias", bias, (CH,)), ("A", A, (H,)),
                           ("D", D, (H,)), ("dt_bias", dt_bias, (H,))):
        _expect(t, name, shape, dev)
    if (not isinstance(pos, torch.Tensor) or pos.dim() != 0 or pos.dtype != torch.long
            or pos.device != dev):
        raise ValueError(f"pos: expected a 0-d long tensor on {dev}")
    return batch, H, P, N, CH


def ssd_step_torch(state, conv_state, xBC, dt, weight, bias, A, D, dt_bias, pos):
    """One Mamba-2 step in PyTorch (any device).

        state (batch, heads, headdim, N) float32, updated in place
        conv_state (batch, channels, d_conv), updated in place
        xBC (batch, channels), channels = heads * headdim + 2N (x, B, C): the conv's new input
        dt (batch, heads) before dt_bias and softplus
        weight (channels, d_conv), bias (channels,): the conv's
        A, D, dt_bias (heads,); pos: the 0-d long position of this step
        -> y (batch, heads * headdim) in xBC's dtype
    """
    batch, H, P, N, CH = _check_ssd_step_args(state, conv_state, xBC, dt, weight, bias, A, D,
                                              dt_bias, pos)
    u = F.silu(causal_conv_step(conv_state, xBC, weight, bias, pos)).float()
    x, B, C = u[:, :H * P].view(batch, H, P), u[:, H * P:H * P + N], u[:, H * P + N:]
    dt = F.softplus(dt.float() + dt_bias.float())  # (batch, heads)
    state.mul_(torch.exp(dt * A.float())[..., None, None]).add_(
        (dt[..., None] * x)[..., None] * B[:, None, None])
    y = (state @ C[:, None, :, None])[..., 0] + D.float()[:, None] * x  # (batch, heads, headdim)
    return y.flatten(1).to(xBC.dtype)


@triton.jit
def _ring_conv_silu(conv_ptr, xBC_ptr, w_ptr, wb_ptr, b, ch, ok, CH, row, pos, K: tl.constexpr):
    """silu(the causal conv's output) for channels ch (with ok) of batch row b (xBC's rows `row`
    apart), and the pointers and value of the new input's slot, pos % K, for the caller to
    store."""
    new = tl.load(xBC_ptr + b * row + ch, mask=ok, other=0.0).to(tl.float32)
    acc = tl.load(wb_ptr + ch, mask=ok, other=0.0).to(tl.float32)
    acc += tl.load(w_ptr + ch * K + K - 1, mask=ok, other=0.0).to(tl.float32) * new
    for j in tl.static_range(1, K):  # the input of position pos - j, in slot (pos - j) % K
        old = tl.load(conv_ptr + (b * CH + ch) * K + (pos + K - j) % K, mask=ok,
                      other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + ch * K + K - 1 - j, mask=ok, other=0.0).to(tl.float32) * old
    return (acc * tl.sigmoid(acc), conv_ptr + (b * CH + ch) * K + pos % K,
            new.to(conv_ptr.dtype.element_ty))


@triton.jit
def _ssd_step_kernel(state_ptr, conv_ptr, xBC_ptr, dt_ptr, w_ptr, wb_ptr, A_ptr, D_ptr, bias_ptr,
                     pos_ptr, y_ptr, H, P, N, xBC_row, dt_row,
                     K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """One Mamba-2 step of one (batch row, head) and BLOCK_P of its channels: their (BLOCK_P, N)
    state in registers. xBC's and dt's rows are xBC_row and dt_row apart (views into in_proj's
    output). Grid (batch, heads, headdim / BLOCK_P)."""
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    CH = H * P + 2 * N
    p, n = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    p_ok, n_ok = p < P, n < N
    pos = tl.load(pos_ptr)
    x, x_slot, x_new = _ring_conv_silu(conv_ptr, xBC_ptr, w_ptr, wb_ptr, b, h * P + p, p_ok, CH,
                                       xBC_row, pos, K)
    Bv, B_slot, B_new = _ring_conv_silu(conv_ptr, xBC_ptr, w_ptr, wb_ptr, b, H * P + n, n_ok, CH,
                                        xBC_row, pos, K)
    Cv, C_slot, C_new = _ring_conv_silu(conv_ptr, xBC_ptr, w_ptr, wb_ptr, b, H * P + N + n, n_ok,
                                        CH, xBC_row, pos, K)
    tl.store(x_slot, x_new, mask=p_ok)
    # B and C are every head's: one program writes their new slot
    if (h == 0) & (tl.program_id(2) == 0):
        tl.store(B_slot, B_new, mask=n_ok)
        tl.store(C_slot, C_new, mask=n_ok)
    dt = _softplus(tl.load(dt_ptr + b * dt_row + h).to(tl.float32)
                   + tl.load(bias_ptr + h).to(tl.float32))
    pn = ((b * H + h) * P + p[:, None]) * N + n[None, :]  # (BP, BN)
    pn_ok = p_ok[:, None] & n_ok[None, :]
    s = tl.load(state_ptr + pn, mask=pn_ok, other=0.0)
    s = s * tl.exp(dt * tl.load(A_ptr + h).to(tl.float32)) + (dt * x)[:, None] * Bv[None, :]
    tl.store(state_ptr + pn, s, mask=pn_ok)
    y = tl.sum(s * Cv[None, :], axis=1) + tl.load(D_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + (b * H + h) * P + p, y.to(y_ptr.dtype.element_ty), mask=p_ok)


def ssd_step_triton(state, conv_state, xBC, dt, weight, bias, A, D, dt_bias, pos):
    """ssd_step_torch as one Triton kernel (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    batch, H, P, N, CH = _check_ssd_step_args(state, conv_state, xBC, dt, weight, bias, A, D,
                                              dt_bias, pos)
    if (xBC.stride(-1) != 1 or dt.stride(-1) != 1
            or not (weight.is_contiguous() and bias.is_contiguous())):
        raise ValueError("xBC, dt, weight, bias: the Triton step needs unit stride along their "
                         "last dimension")
    y = xBC.new_empty(batch, H * P)
    # (8, 512) state elements at the paper's N; 16 rows spill
    BLOCK_P = min(8, triton.next_power_of_2(P))
    _ssd_step_kernel[(batch, H, triton.cdiv(P, BLOCK_P))](
        state, conv_state, xBC, dt, weight, bias, A, D, dt_bias, pos, y, H, P, N, xBC.stride(0),
        dt.stride(0),
        K=conv_state.shape[-1], BLOCK_P=BLOCK_P, BLOCK_N=triton.next_power_of_2(N))
    return y


def ssd_step(state, conv_state, xBC, dt, weight, bias, A, D, dt_bias, pos):
    """One Mamba-2 step (see ssd_step_torch): one Triton kernel on CUDA, PyTorch elsewhere."""
    step = ssd_step_triton if state.is_cuda else ssd_step_torch
    return step(state, conv_state, xBC, dt, weight, bias, A, D, dt_bias, pos)
