"""The language models: every mixer, every block and the text-to-music LM, in plain PyTorch.

Read top to bottom:
  1. the config (one dataclass) and small helpers: RMSNorm, sinusoidal positions, the delay pattern
  2. mixers: Mamba-1, Mamba-2 (both on scan.py's selective scan), causal self-attention,
     cross-attention
  3. the block: pre-norm residual, mixer [+ cross-attention] [+ MLP]
  4. the LM: codebook embeddings, text conditioning (prefix or cross), K heads, the loss
  5. generation: prefill + one step at a time with per-layer caches, classifier-free guidance
  6. FLOPs accounting, and the helpers train.py and generation share: the loss per codebook,
     sampling
The two-stage design's diffusion model is in stage2.py; loading a trained run is in sample.py
(load_run).

The paper's variants are settings of one config (see configs/):
  Prefix Mamba       block=mamba, cond=prefix     SSM mixer only, text as a prefix
  Prefix SiMBA       block=simba, cond=prefix     SSM mixer + MLP
  Cross SiMBA        block=simba, cond=cross      SSM mixer + cross-attention to the text + MLP
  Transformer        block=transformer            self-attention [+ cross-attention] + MLP
                                                  (cond=cross: MusicGen)
  hybrids            attn_layers=(i, j, ...)      those layers use self-attention instead of the SSM

Music is K parallel codebook streams laid out with MusicGen's delay pattern (codebook k is shifted
right by k+1 steps); the model predicts the K tokens of the next position at once.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import run_config_file
from scan import (causal_conv_step, conv_ring_state, selective_scan, selective_state_update,
                  ssd_scan, ssd_step)


@dataclass
class ModelConfig:
    block: str = "simba"        # mamba | simba | transformer
    cond: str = "prefix"        # prefix | cross
    mixer: str = "mamba2"       # mamba1 | mamba2 (the SSM of mamba/simba blocks)
    attn_layers: tuple = ()     # indices of layers that use self-attention instead of the SSM
    n_layer: int = 24
    d_model: int = 1024
    d_state: int = 512          # N, the SSM state size per channel
    d_conv: int = 4             # width of the causal depthwise convolution
    expand: int = 2             # SSM inner width = expand * d_model
    headdim: int = 64           # Mamba-2 head size (one A and dt per head)
    n_head: int = 16            # attention heads
    mlp_ratio: float = 2.0      # MLP hidden width = mlp_ratio * d_model
    dropout: float = 0.3        # on every residual branch
    n_codebooks: int = 4        # K
    codebook_size: int = 1024   # V; token V is the special (empty) token of the delay pattern
    text_dim: int = 384         # width of the stored text embeddings (384 MiniLM, 768 FLAN-T5-base)
    max_text_len: int = 64      # most text tokens per caption (train.py: the data's;
                                # the FLOPs estimate assumes all)

    def __post_init__(self):
        choices = {"block": ("mamba", "simba", "transformer"), "cond": ("prefix", "cross"),
                   "mixer": ("mamba1", "mamba2")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"ModelConfig.{key}={getattr(self, key)!r}: "
                                 f"expected one of {allowed}")
        self.attn_layers = tuple(self.attn_layers)
        if any(not 0 <= i < self.n_layer for i in self.attn_layers):
            raise ValueError(f"ModelConfig.attn_layers={self.attn_layers}: "
                             f"indices must be in [0, n_layer={self.n_layer})")
        if self.d_model % self.n_head:
            raise ValueError(f"ModelConfig.n_head={self.n_head} must divide d_model={self.d_model}")
        if self.mixer == "mamba2" and (self.expand * self.d_model) % self.headdim:
            raise ValueError(f"ModelConfig.headdim={self.headdim} must divide "
                             f"expand * d_model={self.expand * self.d_model}")


def read_config(*paths, **overrides):
    """A ModelConfig from config files (read as train.py reads them, later files win) and keyword
    overrides. Keys that are not model keys (out_dir, training settings) are left to train.py."""
    values = asdict(ModelConfig())
    for path in paths:
        values.update(run_config_file(path, values, "model.read_config"))
    values.update(overrides)
    keys = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in values.items() if k in keys})


class RMSNorm(nn.Module):
    """x / rms(x) * weight; with a gate z (Mamba-2): the gate is applied first,
    norm(x * silu(z))."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, z=None):
        if z is not None:
            x = x * F.silu(z)
        # in float32: one kernel
        out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(torch.promote_types(x.dtype, self.weight.dtype))


def sinusoids(start, length, dim, device):
    """Sinusoidal positions start .. start+length-1 -> (length, dim); defined for any position."""
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0)
                     * torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


def delay(codes, special):
    """MusicGen's delay pattern: codes (..., K, T) -> (..., K, T+K), out[k, t+k+1] = codes[k, t].

    Every other entry is `special`; in particular position 0 is all special, the start token.
    """
    K, T = codes.shape[-2:]
    out = codes.new_full((*codes.shape[:-1], T + K), special)
    for k in range(K):
        out[..., k, k + 1:k + 1 + T] = codes[..., k, :]
    return out


def undelay(seq, special):
    """Inverse of delay: seq (..., K, T+K) -> codes (..., K, T)."""
    K = seq.shape[-2]
    T = seq.shape[-1] - K
    return torch.stack([seq[..., k, k + 1:k + 1 + T] for k in range(K)], dim=-2)


def _inverse_softplus_dt(n, dt_min=1e-3, dt_max=1e-1, floor=1e-4):
    """mamba_ssm's dt init: dt log-uniform in [dt_min, dt_max], returned as the bias b with
    softplus(b) = dt."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min))
                   + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


# -----------------------------------------------------------------------------
# mixers: (B, L, d_model) -> (B, L, d_model). With a cache (a dict), a mixer starts from the state
# in it (an empty dict: from the beginning) and leaves its state there, so generation can go one
# step at a time.


class Mamba1(nn.Module):
    """Mamba-1 (Gu & Dao 2023): per-channel A (d_inner, N) and dt from a low-rank projection."""

    def __init__(self, config):
        super().__init__()
        d_in, N = config.expand * config.d_model, config.d_state
        self.d_in, self.N, self.d_conv = d_in, N, config.d_conv
        self.dt_rank = math.ceil(config.d_model / 16)
        self.in_proj = nn.Linear(config.d_model, 2 * d_in, bias=False)  # -> x, z
        self.conv1d = nn.Conv1d(d_in, d_in, config.d_conv, groups=d_in, padding=config.d_conv - 1)
        self.x_proj = nn.Linear(d_in, self.dt_rank + 2 * N, bias=False)  # -> dt (low rank), B, C
        self.dt_proj = nn.Linear(self.dt_rank, d_in)  # its bias is the scan's delta_bias
        self.A_log = nn.Parameter(torch.empty(d_in, N))
        self.D = nn.Parameter(torch.empty(d_in))
        self.out_proj = nn.Linear(d_in, config.d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """mamba_ssm's init: A = -(1..N) per channel, D = 1,
        dt bias = softplus^-1 of a log-uniform dt."""
        self.A_log.copy_(
            torch.log(torch.arange(1, self.N + 1, dtype=torch.float32)).repeat(self.d_in, 1))
        self.D.fill_(1.0)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        self.dt_proj.bias.copy_(_inverse_softplus_dt(self.d_in))

    def forward(self, x, cache=None):  # x: (B, L, d_model)
        L = x.shape[1]
        u, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # (B, d_in, L) each
        # continue from the cached state, one step at a time
        if cache is not None and "ssm" in cache:
            return torch.stack([self._step(u[:, :, t], z[:, :, t], cache) for t in range(L)], 1)
        A = -torch.exp(self.A_log.float())  # (d_in, N), fp32 even under autocast
        if cache is not None:
            cache["conv"] = conv_ring_state(u, self.d_conv)  # (B, d_in, d_conv)
        u = F.silu(self.conv1d(u)[..., :L])  # causal: drop the right padding
        dt, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.N, self.N], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, d_in, L); scan adds the bias
        y = selective_scan(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D.float(), z,
                           self.dt_proj.bias.float(), delta_softplus=True,
                           return_last_state=cache is not None)
        if cache is not None:
            y, cache["ssm"] = y  # last state (B, d_in, N), fp32
            # the same at every step: kept
            cache["params"] = A, self.D.float(), self.dt_proj.bias.float()
        return self.out_proj(y.transpose(1, 2))

    def _step(self, u, z, cache):  # u, z: (B, d_in) -> (B, d_model)
        A, D, dt_bias = cache["params"]
        u = F.silu(causal_conv_step(cache["conv"], u, self.conv1d.weight[:, 0], self.conv1d.bias,
                                    cache["pos"]))
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.N, self.N], dim=-1)
        y = selective_state_update(cache["ssm"], u, dt @ self.dt_proj.weight.t(), A, B, C, D, z,
                                   dt_bias, dt_softplus=True)
        return self.out_proj(y)


class Mamba2(nn.Module):
    """Mamba-2 (Dao & Gu 2024): one scalar A and dt per head of `headdim` channels, B and C shared
    by all heads (one group), a causal conv over x, B and C together, and a gated RMSNorm before
    out_proj. Its scan is scan.ssd_scan (chunked matrix products: Triton kernels on CUDA, PyTorch
    elsewhere); a generation step is scan.ssd_step (the conv and the state update: one kernel on
    CUDA)."""

    def __init__(self, config):
        super().__init__()
        d_in, N = config.expand * config.d_model, config.d_state
        self.d_in, self.N, self.d_conv, self.headdim = d_in, N, config.d_conv, config.headdim
        self.n_heads = d_in // config.headdim
        conv_dim = d_in + 2 * N
        # -> z, (x, B, C), dt
        self.in_proj = nn.Linear(config.d_model, d_in + conv_dim + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, config.d_conv, groups=conv_dim,
                                padding=config.d_conv - 1)
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = RMSNorm(d_in)
        self.out_proj = nn.Linear(d_in, config.d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """mamba_ssm's init: A = -uniform(1, 16) per head, D = 1,
        dt bias = softplus^-1 of a log-uniform dt."""
        self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D.fill_(1.0)
        self.dt_bias.copy_(_inverse_softplus_dt(self.n_heads))

    def forward(self, x, cache=None):  # x: (B, L, d_model)
        L = x.shape[1]
        z, xBC, dt = self.in_proj(x).split(
            [self.d_in, self.d_in + 2 * self.N, self.n_heads], dim=-1)
        # continue from the cached state, one step at a time
        if cache is not None and "ssm" in cache:
            y = [self._step(xBC[:, t], dt[:, t], cache) for t in range(L)]
            y = y[0][:, None] if L == 1 else torch.stack(y, 1)  # (B, L, d_in); L == 1: no copy
        else:
            xBC = xBC.transpose(1, 2)  # (B, d_in + 2N, L)
            if cache is not None:
                cache["conv"] = conv_ring_state(xBC, self.d_conv)
            u, B, C = F.silu(self.conv1d(xBC)[..., :L]).transpose(1, 2).split(
                [self.d_in, self.N, self.N], dim=-1)
            A = -torch.exp(self.A_log.float())  # (heads,); u (B, L, d_in), B and C (B, L, N)
            y = ssd_scan(u.unflatten(-1, (self.n_heads, self.headdim)), dt, A, B, C, self.D.float(),
                         None, self.dt_bias.float(), dt_softplus=True,
                         return_last_state=cache is not None)
            if cache is not None:
                y, cache["ssm"] = y  # last state (B, heads, headdim, N), fp32
                cache["A"] = A  # the same at every step: kept
            y = y.flatten(2)  # (B, L, d_in)
        return self.out_proj(self.norm(y, z))

    def _step(self, xBC, dt, cache):  # xBC: (B, d_in + 2N), dt: (B, heads) -> (B, d_in)
        return ssd_step(cache["ssm"], cache["conv"], xBC, dt, self.conv1d.weight[:, 0],
                        self.conv1d.bias, cache["A"], self.D, self.dt_bias, cache["pos"])


class SelfAttention(nn.Module):
    """Causal multi-head self-attention. With a cache: the first call (a prefix, or the first
    position) sets up key and value buffers for cache["size"] positions; each later call adds one
    position at cache["n"], a device tensor, and attends to the positions before it through a mask,
    so the shapes never change."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, cache=None):  # x: (B, L, d)
        Bsz, L, d = x.shape
        q, k, v = (t.view(Bsz, L, self.n_head, -1).transpose(1, 2)
                   for t in self.qkv(x).split(d, dim=-1))
        if cache is not None and "k" in cache:  # one more position
            if L > 1:
                raise ValueError("SelfAttention: with a filled cache, feed one position at a time")
            n = cache["n"]
            cache["k"].index_copy_(2, n.view(1), k)
            cache["v"].index_copy_(2, n.view(1), v)
            y = F.scaled_dot_product_attention(q, cache["k"], cache["v"],
                                               attn_mask=cache["slots"] <= n)
            n += 1
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)  # (B, H, L, hd)
            if cache is not None:  # room for every position to come
                for name, t in (("k", k), ("v", v)):
                    cache[name] = t.new_zeros(*t.shape[:2], cache["size"], t.shape[3])
                    cache[name][:, :, :L] = t
                cache["n"] = torch.tensor(L, device=x.device)
                # (1, size): a mask row
                cache["slots"] = torch.arange(cache["size"], device=x.device)[None]
        return self.out_proj(y.transpose(1, 2).reshape(Bsz, L, d))


class CrossAttention(nn.Module):
    """Attention from the music to the text. memory: (B, M, d); memory_mask: (B, M), True where a
    token is real."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.q = nn.Linear(config.d_model, config.d_model, bias=False)
        self.kv = nn.Linear(config.d_model, 2 * config.d_model, bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, memory, memory_mask, cache=None):  # x: (B, L, d)
        Bsz, L, d = x.shape
        q = self.q(x).view(Bsz, L, self.n_head, -1).transpose(1, 2)  # (B, H, L, hd)
        # the text does not change during generation: project it once
        if cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = (t.view(Bsz, -1, self.n_head, d // self.n_head).transpose(1, 2)
                    for t in self.kv(memory).split(d, dim=-1))  # (B, H, M, hd)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=memory_mask[:, None, None, :])
        return self.out_proj(y.transpose(1, 2).reshape(Bsz, L, d))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = int(config.mlp_ratio * config.d_model)
        self.fc = nn.Linear(config.d_model, hidden)
        self.out_proj = nn.Linear(hidden, config.d_model)

    def forward(self, x):
        return self.out_proj(F.gelu(self.fc(x)))


# -----------------------------------------------------------------------------
# the block


class Block(nn.Module):
    """Pre-norm residual block:
    x += mixer(norm(x)); [x += cross(norm(x), text)]; [x += mlp(norm(x))].

    mamba: SSM mixer only. simba: SSM mixer + MLP. transformer: self-attention + MLP.
    cond=cross adds cross-attention to the text after the mixer (Cross-SiMBA, MusicGen's
    Transformer).
    """

    def __init__(self, config, index):
        super().__init__()
        use_attention = config.block == "transformer" or index in config.attn_layers
        self.norm1 = RMSNorm(config.d_model)
        self.mixer = (SelfAttention(config) if use_attention
                      else {"mamba1": Mamba1, "mamba2": Mamba2}[config.mixer](config))
        self.cross = CrossAttention(config) if config.cond == "cross" else None
        self.norm2 = RMSNorm(config.d_model) if self.cross else None
        self.mlp = MLP(config) if config.block != "mamba" else None
        self.norm3 = RMSNorm(config.d_model) if self.mlp else None
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, memory=None, memory_mask=None, cache=None):  # x: (B, L, d)
        cache = cache if cache is not None else {"mixer": None, "cross": None}
        x = x + self.drop(self.mixer(self.norm1(x), cache["mixer"]))
        if self.cross:
            x = x + self.drop(self.cross(self.norm2(x), memory, memory_mask, cache["cross"]))
        if self.mlp:
            x = x + self.drop(self.mlp(self.norm3(x)))
        return x


# -----------------------------------------------------------------------------
# the language model


class MusicLM(nn.Module):
    """Text-conditioned LM over K codebooks of audio tokens.

    forward(codes, text, text_mask, targets=None) -> (logits, loss)
        codes, targets: (B, K, S) delayed tokens (targets are codes shifted left by one);
        text: (B, Tt, text_dim) token embeddings; text_mask: (B, Tt), True where a token is real
        logits: (B, K, S, codebook_size); loss: mean over codebooks of the cross-entropy over the
        positions whose target is not the special token.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        d, V = config.d_model, config.codebook_size
        # +1: the special token
        self.embed = nn.ModuleList(nn.Embedding(V + 1, d) for _ in range(config.n_codebooks))
        # the paper: frozen text states -> Linear -> LayerNorm
        self.text_proj = nn.Linear(config.text_dim, d)
        self.text_norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(d)
        self.heads = nn.ModuleList(nn.Linear(d, V, bias=False) for _ in range(config.n_codebooks))
        self.apply(self._init_weights)
        # GPT-2: scale each residual branch's output projection
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(m):
        """N(0, 0.02) for Linear weights, zero biases; N(0, 1) for the token embeddings; then the
        SSM's own init (apply visits children first, so a mixer's reset runs after its Linear
        layers were set here).

        The embeddings are at the scale of the unit-amplitude sinusoids added to them (and of the
        normalized text prefix), as PyTorch's default and the official code leave them: at GPT-2's
        0.02, a token's identity entered the first block at 1/50 of its position, and every variant
        ended ~0.75 nats higher (README)."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=1.0)
        elif isinstance(m, (Mamba1, Mamba2)):
            m.reset_ssm_parameters()

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # --- inputs -> residual stream

    def _embed_text(self, text, text_mask):
        """-> prefix (B, Tt, d) or None, memory (B, 1+Tt, d) or None, memory_mask, position of the
        first music token.

        Prefix: the projected text with sinusoidal positions 0..Tt-1, padded positions zeroed, so
        every prefix has the length of the stored text. Cross: the same states as memory, behind
        one always-visible zero token, so a caption with no tokens (dropped for classifier-free
        guidance) attends to nothing instead of to an empty set.
        """
        if text.dim() != 3 or text.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"text: expected shape (batch, tokens, text_dim={self.config.text_dim}), "
                f"got {tuple(text.shape)}")
        if text_mask.shape != text.shape[:2]:
            raise ValueError(f"text_mask: expected shape {tuple(text.shape[:2])}, "
                             f"got {tuple(text_mask.shape)}")
        Bsz, Tt, _ = text.shape
        t = self.text_norm(self.text_proj(text.to(self.text_proj.weight.dtype)))
        t = t + sinusoids(0, Tt, t.shape[-1], t.device).to(t.dtype)
        mask = text_mask.bool()
        if self.config.cond == "prefix":
            return t * mask[..., None], None, None, Tt
        memory = torch.cat([t.new_zeros(Bsz, 1, t.shape[-1]), t], dim=1)  # (B, 1+Tt, d)
        return None, memory, torch.cat([mask.new_ones(Bsz, 1), mask], dim=1), 0

    def _embed_codes(self, codes, positions):
        """codes (B, K, S) -> sum of the K embeddings + positions (S, d), their sinusoids
        -> (B, S, d).

        The official code adds positions to the SSM models too; an SSM knows order without them."""
        x = sum(emb(codes[:, k]) for k, emb in enumerate(self.embed))
        return x + positions.to(x.dtype)

    def forward(self, codes, text, text_mask, targets=None, label_smoothing=0.0):
        S = codes.shape[-1]
        prefix, memory, memory_mask, start = self._embed_text(text, text_mask)
        x = self._embed_codes(codes,
                              sinusoids(start, S, self.config.d_model, codes.device))  # (B, S, d)
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)  # (B, Tt + S, d)
        for layer in self.layers:
            x = layer(x, memory, memory_mask)
        x = self.norm_f(x[:, -S:])  # music positions only
        logits = torch.stack([head(x) for head in self.heads], dim=1)  # (B, K, S, V)
        loss = None
        if targets is not None:
            loss = codebook_losses(logits, targets, label_smoothing).mean()
        return logits, loss

    # --- generation

    @torch.no_grad()
    def prefill(self, text, text_mask, steps):
        """Start generating up to `steps` positions: the decoding state, with the text prefix
        (prefix models) run through it, for `step` to continue. Every tensor in it keeps its shape
        and place from here on (the position is a device tensor; attention layers get buffers for
        every position to come), so that a step can be captured in a CUDA graph and replayed."""
        prefix, memory, memory_mask, start = self._embed_text(text, text_mask)
        pos = torch.tensor(start, device=text.device)  # of the next position
        cache = {"pos": pos,
                 "positions": sinusoids(0, start + steps, self.config.d_model, text.device),
                 "memory": memory, "memory_mask": memory_mask,
                 "layers": [{"mixer": {"pos": pos, "size": start + steps}, "cross": {}}
                            for _ in self.layers]}
        if prefix is not None and prefix.shape[1] > 0:
            x = prefix
            for layer, c in zip(self.layers, cache["layers"]):
                x = layer(x, cache=c)
        return cache

    @torch.no_grad()
    def step(self, tokens, cache):
        """One position: tokens (B, K) -> logits (B, K, V) for the next position; updates the
        cache in place."""
        x = self._embed_codes(tokens[:, :, None],
                              cache["positions"].index_select(0, cache["pos"].view(1)))
        for layer, c in zip(self.layers, cache["layers"]):
            x = layer(x, cache["memory"], cache["memory_mask"], c)
        cache["pos"] += 1
        x = self.norm_f(x[:, 0])
        return torch.stack([head(x) for head in self.heads], dim=1)

    @torch.no_grad()
    def generate(self, text, text_mask, steps, cfg_scale=3.0, temperature=1.0, top_k=250, top_p=0.0,
                 generator=None, progress=None, cuda_graph=True):
        """Sample `steps` frames of K codebooks for each caption -> codes (B, K, steps).

        Classifier-free guidance: the conditional rows and unconditional rows (the caption dropped)
        run as one batch, logits = uncond + cfg_scale * (cond - uncond); cfg_scale=1 runs the
        conditional rows alone. Each step costs the same for SSM layers (a fixed-size state), so
        generation can run past the training length. On CUDA (unless cuda_graph=False) the step and
        the guidance are captured in a CUDA graph after the first step and replayed; sampling runs
        outside it. `progress`: an optional callable wrapping the step range (e.g. tqdm).
        """
        was_training = self.training
        self.eval()
        K, V = self.config.n_codebooks, self.config.codebook_size
        Bsz = text.shape[0]
        if cfg_scale != 1.0:
            text = torch.cat([text, torch.zeros_like(text)])
            text_mask = torch.cat([text_mask, torch.zeros_like(text_mask)])
        cache = self.prefill(text, text_mask, steps + K)
        # delayed; position 0: start
        seq = torch.full((Bsz, K, steps + K), V, dtype=torch.long, device=text.device)

        def guided(tokens):  # (Bsz, K) -> the guided logits for the next position (Bsz, K, V)
            logits = self.step(torch.cat([tokens, tokens]) if cfg_scale != 1.0 else tokens,
                               cache).float()
            if cfg_scale != 1.0:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_scale * (cond - uncond)
            return logits

        decode = guided
        k = torch.arange(K, device=text.device)
        positions = range(1, steps + K)
        for p in progress(positions) if progress else positions:
            # after one eager step (kernels compiled, buffers made)
            if p == 2 and cuda_graph and text.is_cuda:
                decode = cuda_graph_of(guided, seq[:, :, 0])
            sampled = sample_logits(decode(seq[:, :, p - 1]), temperature, top_k, top_p,
                                    generator)  # (B, K)
            inside = (p - k - 1 >= 0) & (p - k - 1 < steps)  # codebooks with a real token at p
            seq[:, :, p] = torch.where(inside, sampled, V)
        self.train(was_training)
        return undelay(seq, V)

    # --- FLOPs

    def estimate_flops_per_token(self, seq_len, breakdown=False):
        """Training FLOPs (forward + backward) per music position, for sequences of seq_len music
        positions (plus max_text_len text tokens).

        matmul: 6 x (weights of every Linear/Conv1d x the positions it is applied to), the 6N rule.
        attention: 12 x d_model x (query positions x key positions) per attention layer (QK^T and
                   AV, x3 for the backward; the causal half is counted, as kernels that do not
                   skip it compute it).
        scan: ~9 FLOPs per (position, channel, state) forward (exp, two multiply-adds for the
              state, one for the output, ...), x3 for the backward. It is elementwise work, which
              FlopCounterMode does not count.
        """
        c = self.config
        Tt, S = c.max_text_len, seq_len
        P = S + Tt if c.cond == "prefix" else S  # positions each layer's mixer and MLP see
        M = Tt + 1  # cross-attention memory: the text and its null token

        def weights(module):
            return sum(m.weight.numel() for m in module.modules()
                       if isinstance(m, (nn.Linear, nn.Conv1d)))

        mm = Tt * weights(self.text_proj) + S * sum(weights(h) for h in self.heads)
        attn = scan = 0
        for layer in self.layers:
            mm += P * (weights(layer.mixer) + (weights(layer.mlp) if layer.mlp else 0))
            if isinstance(layer.mixer, SelfAttention):
                attn += 2 * 2 * P * P * c.d_model
            else:
                scan += 9 * P * layer.mixer.d_in * layer.mixer.N
            if layer.cross:
                mm += (S * (weights(layer.cross.q) + weights(layer.cross.out_proj))
                       + M * weights(layer.cross.kv))
                attn += 2 * 2 * S * M * c.d_model
        flops = {"matmul": 6 * mm / S, "attention": 3 * attn / S, "scan": 3 * scan / S}
        return flops if breakdown else sum(flops.values())


def cuda_graph_of(fn, example):
    """fn, a function of one CUDA tensor that runs no host code depending on its values, captured
    once in a CUDA graph -> a function that copies its argument into the captured input, replays
    the graph and returns the captured output (the same tensor every time: use it before the next
    call). Capturing records fn's kernels without running them."""
    given = example.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(given)

    def replay(x):
        given.copy_(x)
        graph.replay()
        return out
    return replay


def codebook_losses(logits, targets, label_smoothing=0.0):
    """Cross-entropy per codebook over positions whose target is a real token: logits (B, K, S, V),
    targets (B, K, S) with the special token V where there is nothing to predict -> (K,)."""
    V = logits.shape[-1]
    # (B, K, S), 0 where ignored
    ce = F.cross_entropy(logits.flatten(0, 2).float(), targets.flatten(), ignore_index=V,
                         reduction="none", label_smoothing=label_smoothing).view(targets.shape)
    valid = (targets != V).float()
    return (ce * valid).sum((0, 2)) / valid.sum((0, 2)).clamp(min=1)


def sample_logits(logits, temperature=1.0, top_k=0, top_p=0.0, generator=None):
    """logits (..., V) -> token ids (...). temperature 0: argmax; top_k > 0 keeps the k best;
    0 < top_p < 1 keeps the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        probs, order = torch.sort(F.softmax(logits, -1), dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # tokens after the set already reached top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    ids = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
    return ids.view(probs.shape[:-1])
