"""model.py: every variant is causal, decodes incrementally exactly as the full pass, generates
deterministically, starts at chance loss and can learn; the delay pattern; FLOPs; paper-scale
sizes."""
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from conftest import ssd_by_ref

import model
import scan
import stage2
from model import ModelConfig, MusicLM, delay, read_config, undelay

V, K, TEXT_DIM, TT = 16, 3, 12, 5
SMALL = dict(n_layer=2, d_model=32, d_state=8, headdim=16, n_head=4, n_codebooks=K, codebook_size=V,
             text_dim=TEXT_DIM, max_text_len=TT, dropout=0.0)
VARIANTS = {
    "prefix_mamba-mamba1": dict(block="mamba", cond="prefix", mixer="mamba1"),
    "prefix_mamba-mamba2": dict(block="mamba", cond="prefix", mixer="mamba2"),
    "prefix_simba-mamba1": dict(block="simba", cond="prefix", mixer="mamba1"),
    "prefix_simba-mamba2": dict(block="simba", cond="prefix", mixer="mamba2"),
    "cross_simba-mamba1": dict(block="simba", cond="cross", mixer="mamba1"),
    "cross_simba-mamba2": dict(block="simba", cond="cross", mixer="mamba2"),
    "prefix_transformer": dict(block="transformer", cond="prefix"),
    "cross_transformer": dict(block="transformer", cond="cross"),
    "hybrid_prefix-mamba1": dict(block="simba", cond="prefix", mixer="mamba1", attn_layers=(1,)),
    "hybrid_cross-mamba2": dict(block="simba", cond="cross", mixer="mamba2", attn_layers=(0,)),
}
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def small_model(name, seed=0, loud=False, **over):
    """A small model of a variant. loud: weights at unit gain instead of the small training init, so
    every layer changes the logits by O(1) and a wrong cache or a wrong conv shift cannot hide under
    1e-4."""
    torch.manual_seed(seed)
    m = MusicLM(ModelConfig(**{**SMALL, **VARIANTS[name], **over})).eval()
    if loud:
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d)):
                    mod.weight.normal_(std=mod.weight[0].numel() ** -0.5)
                elif isinstance(mod, torch.nn.Embedding):
                    mod.weight.normal_()
    return m


def batch(B=3, T=9, seed=1):
    """Delayed codes (B, K, T+K) and text whose rows have 3, 5 and 0 real tokens (the last is a
    dropped caption)."""
    g = torch.Generator().manual_seed(seed)
    seq = delay(torch.randint(0, V, (B, K, T), generator=g), V)
    text = torch.randn(B, TT, TEXT_DIM, generator=g)
    mask = torch.arange(TT)[None] < torch.tensor([3, 5, 0, 2, 4][:B])[:, None]
    return seq, text, mask


@pytest.mark.parametrize("name", VARIANTS)
def test_causal(name):
    m = small_model(name, loud=True)
    seq, text, mask = batch()
    logits, _ = m(seq[:, :, :-1], text, mask)
    t = 5
    changed = seq.clone()
    changed[:, :, t + 1:] = torch.randint(0, V, changed[:, :, t + 1:].shape)
    logits2, _ = m(changed[:, :, :-1], text, mask)
    assert torch.equal(logits[:, :, :t + 1], logits2[:, :, :t + 1])
    # the change is seen later
    assert not torch.allclose(logits[:, :, t + 1:], logits2[:, :, t + 1:])


@pytest.mark.parametrize("name", VARIANTS)
def test_padded_text_is_ignored(name):
    """What lies in the text's padded positions (mask False) does not change the logits; real text
    does."""
    m = small_model(name, loud=True)
    seq, text, mask = batch()
    logits, _ = m(seq[:, :, :-1], text, mask)
    noisy = torch.where(mask[..., None], text, torch.randn_like(text))
    assert (m(seq[:, :, :-1], noisy, mask)[0] - logits).abs().max() < 1e-5
    assert not torch.allclose(m(seq[:, :, :-1], text + 1, mask)[0][:2], logits[:2])


@pytest.mark.parametrize("name", VARIANTS)
def test_incremental_decoding_matches_full_pass(name):
    """prefill + step, position by position, gives the full pass's logits; the batch holds
    conditional rows and an unconditional row (no text tokens), as the classifier-free-guidance
    batch does."""
    m = small_model(name)
    seq, text, mask = batch()
    inputs = seq[:, :, :-1]
    full, _ = m(inputs, text, mask)
    cache = m.prefill(text, mask, inputs.shape[-1])
    steps = torch.stack([m.step(inputs[:, :, p], cache) for p in range(inputs.shape[-1])], dim=2)
    assert (steps - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", VARIANTS)
def test_decoding_state_stays_exact_over_long_generations(name):
    """150 steps, far more than these tests train on, the convolution's ring state wrapping around
    37 times: the static decoding state still gives the full pass's logits (unit-gain weights, so
    errors would show)."""
    m = small_model(name, loud=True)
    seq, text, mask = batch(B=2, T=150)
    inputs = seq[:, :, :-1]
    full, _ = m(inputs, text, mask)
    cache = m.prefill(text, mask, inputs.shape[-1])
    steps = torch.stack([m.step(inputs[:, :, p], cache) for p in range(inputs.shape[-1])], dim=2)
    assert (steps - full).abs().max().item() < 1e-3 * full.abs().max().item()


def test_decoding_along_the_cuda_path_matches_the_full_pass(monkeypatch):
    """The Mamba-2 step as CUDA runs it, scan.ssd_step_triton (here in Triton's interpreter), with
    the arguments the model gives it: the full pass's logits, step by step, across a wrap of the
    convolution's ring. (On the GPU where there is one.)"""
    monkeypatch.setattr(model, "ssd_step", scan.ssd_step_triton)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = small_model("prefix_simba-mamba2", loud=True).to(dev)
    seq, text, mask = (t.to(dev) for t in batch(B=2, T=7))
    inputs = seq[:, :, :-1]
    full, _ = m(inputs, text, mask)
    cache = m.prefill(text, mask, inputs.shape[-1])
    steps = torch.stack([m.step(inputs[:, :, p], cache) for p in range(inputs.shape[-1])], dim=2)
    assert (steps - full).abs().max().item() < 1e-3 * full.abs().max().item()


def generate_by_recomputing(m, text, mask, steps, cfg_scale, generator):
    """What generate() samples, by definition: the full pass over everything written so far, at
    every step, for the caption and (with guidance) without it; no decoding state."""
    K = m.config.n_codebooks
    seq = torch.full((text.shape[0], K, steps + K), V)
    k = torch.arange(K)
    for p in range(1, steps + K):
        logits = m(seq[:, :, :p], text, mask)[0][:, :, -1]
        if cfg_scale != 1.0:
            uncond = m(seq[:, :, :p], torch.zeros_like(text), torch.zeros_like(mask))[0][:, :, -1]
            logits = uncond + cfg_scale * (logits - uncond)
        inside = (p - k - 1 >= 0) & (p - k - 1 < steps)
        seq[:, :, p] = torch.where(inside, model.sample_logits(logits, 1.0, 0, 0.0, generator), V)
    return undelay(seq, V)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("name", VARIANTS)
def test_generate_samples_what_the_full_pass_gives(name, cfg_scale):
    """With the same seed, generate() (decoding state, guidance in one batch) writes the very tokens
    that sampling from full passes writes, with and without guidance."""
    m = small_model(name, loud=True)
    _, text, mask = batch(B=2)
    cached = m.generate(text, mask, steps=20, cfg_scale=cfg_scale, top_k=0,
                        generator=torch.Generator().manual_seed(5))
    assert torch.equal(cached, generate_by_recomputing(m, text, mask, 20, cfg_scale,
                                                       torch.Generator().manual_seed(5)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: CUDA graphs")
@pytest.mark.parametrize("name",
                         ["prefix_simba-mamba2", "hybrid_cross-mamba2", "prefix_transformer"])
def test_cuda_graph_generation_matches_eager_on_gpu(name):
    """generate() replaying each step from a CUDA graph writes the same tokens as running it
    eagerly."""
    m = small_model(name, loud=True).cuda()
    _, text, mask = batch(B=2)
    text, mask = text.cuda(), mask.cuda()
    runs = [m.generate(text, mask, steps=40, cfg_scale=3.0, cuda_graph=graph,
                       generator=torch.Generator("cuda").manual_seed(0)) for graph in (False, True)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("name", VARIANTS)
def test_fresh_loss_is_chance(name):
    m = small_model(name)
    seq, text, mask = batch()
    _, loss = m(seq[:, :, :-1], text, mask, targets=seq[:, :, 1:])
    assert abs(loss.item() - math.log(V)) < 0.1


@pytest.mark.parametrize("name", VARIANTS)
def test_generate_is_deterministic_and_follows_the_model(name):
    m = small_model(name, loud=True)
    _, text, mask = batch(B=2)
    a = m.generate(text, mask, steps=6, generator=torch.Generator().manual_seed(3))
    b = m.generate(text, mask, steps=6, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, K, 6) and a.dtype == torch.long
    assert torch.equal(a, b) and int(a.max()) < V
    # greedy decoding with guidance picks, at every delayed position, the argmax of the guided
    # full-pass logits
    cfg_scale = 2.5
    codes = m.generate(text, mask, steps=6, cfg_scale=cfg_scale, temperature=0)
    seq = delay(codes, V)
    cond, _ = m(seq[:, :, :-1], text, mask)
    uncond, _ = m(seq[:, :, :-1], torch.zeros_like(text), torch.zeros_like(mask))
    best = (uncond + cfg_scale * (cond - uncond)).argmax(-1)  # (B, K, T+K-1)
    real = seq[:, :, 1:] != V
    assert torch.equal(best[real], seq[:, :, 1:][real])


def test_generate_runs_past_any_training_length():
    m = small_model("prefix_simba-mamba2")
    _, text, mask = batch(B=1)
    codes = m.generate(text, mask, steps=300, cfg_scale=1.0,
                       generator=torch.Generator().manual_seed(0))
    assert codes.shape == (1, K, 300)


def test_sample_logits_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(model.sample_logits(logits, top_k=2, generator=g).tolist()) == {1, 2}
    assert set(model.sample_logits(logits, top_p=0.5, generator=g).tolist()) == {1}  # p(1) = 0.64
    assert model.sample_logits(logits, temperature=0).eq(1).all()


def test_delay_layout_and_round_trip():
    codes = torch.tensor([[1, 2, 3],
                          [4, 5, 6]])
    S = 9
    expected = torch.tensor([[S, 1, 2, 3, S],
                             [S, S, 4, 5, 6]])
    assert torch.equal(delay(codes, S), expected)
    assert torch.equal(undelay(expected, S), codes)
    batched = torch.randint(0, 8, (5, 4, 11))
    assert delay(batched, 8).shape == (5, 4, 15)
    assert torch.equal(undelay(delay(batched, 8), 8), batched)


@pytest.mark.parametrize("name", ["prefix_simba-mamba2", "prefix_mamba-mamba1",
                                  "cross_simba-mamba2", "prefix_transformer",
                                  "cross_transformer", "hybrid_cross-mamba2"])
def test_flops_estimate_matches_flop_counter(name, monkeypatch):
    """The estimate's matmul + attention terms against FlopCounterMode over one forward + backward.

    The scans are swapped for the reference loop (elementwise ops, which the counter ignores, as the
    estimate's scan term is not compared), attention runs on the math backend (whose matmuls the
    counter sees), and the depthwise conv is counted as 3x its forward: the counter's conv-backward
    formula ignores groups."""
    monkeypatch.setattr(model, "selective_scan", scan.selective_scan_ref)
    monkeypatch.setattr(model, "ssd_scan", ssd_by_ref)
    m = small_model(name, d_model=64, d_state=16, max_text_len=TT).train()
    B, S = 2, 24
    seq, text, mask = batch(B=B, T=S - K + 1)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        _, loss = m(seq[:, :, :-1], text, mask, targets=seq[:, :, 1:])
        loss.backward()
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    counted = (sum(ops.get(op, 0) for op in ("aten.mm", "aten.addmm", "aten.bmm"))
               + 3 * ops.get("aten.convolution", 0))
    est = m.estimate_flops_per_token(S, breakdown=True)
    assert est["matmul"] + est["attention"] == pytest.approx(counted / (B * S), rel=0.10)
    assert (est["scan"] > 0) == ("transformer" not in name)
    assert m.estimate_flops_per_token(S) == pytest.approx(sum(est.values()))


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*.py")
                                        if p.name not in ("tiny.py", "stage2_diffusion.py")),
                         ids=lambda p: p.stem)
def test_paper_configs_have_300M_params(path):
    with torch.device("meta"):
        m = MusicLM(read_config(path, text_dim=768))  # FLAN-T5-base text states, as the paper
    assert 255e6 <= m.num_params() <= 345e6, f"{path.name}: {m.num_params() / 1e6:.1f}M parameters"
    stated = f"{round(m.num_params() / 1e6)}M parameters"
    assert stated in path.read_text(), f"{path.name} should say '{stated}' in its comment"


def test_tiny_overlay_and_overfit_one_batch():
    """configs/prefix_simba.py + configs/tiny.py learns one fixed batch: loss falls below 0.5."""
    torch.manual_seed(0)
    m = MusicLM(read_config(CONFIGS / "prefix_simba.py", CONFIGS / "tiny.py", codebook_size=64,
                            text_dim=TEXT_DIM))
    assert ((m.config.block, m.config.mixer, m.config.n_layer, m.config.d_model)
            == ("simba", "mamba2", 4, 64))
    g = torch.Generator().manual_seed(0)
    seq = delay(torch.randint(0, 64, (2, m.config.n_codebooks, 28), generator=g), 64)
    text, mask = torch.randn(2, TT, TEXT_DIM, generator=g), torch.ones(2, TT, dtype=torch.bool)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for it in range(300):
        _, loss = m(seq[:, :, :-1], text, mask, targets=seq[:, :, 1:])
        if loss.item() < 0.5:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, f"loss {loss.item():.3f} after {it} steps"


def test_bad_config_and_inputs_name_the_key():
    with pytest.raises(ValueError, match="block"):
        ModelConfig(block="rnn")
    with pytest.raises(ValueError, match="attn_layers"):
        ModelConfig(n_layer=2, attn_layers=(5,))
    with pytest.raises(ValueError, match="headdim"):
        ModelConfig(d_model=32, headdim=48)
    m = small_model("prefix_simba-mamba2")
    seq, text, mask = batch()
    with pytest.raises(ValueError, match="text:"):
        m(seq, text[..., :5], mask)
    with pytest.raises(ValueError, match="text_mask"):
        m(seq, text, mask[:, :2])


def test_stage2_diffusion_shapes_loss_and_quantize():
    torch.manual_seed(0)
    config = stage2.Stage2Config(codebook_size=V, n_codebooks=3, latent_dim=8,
                                 unet_channels=(32, 32, 64))
    m = stage2.Stage2Diffusion(config)
    # residual codebooks shrink
    books = torch.randn(3, V, 8) * torch.tensor([4.0, 1.0, 0.25])[:, None, None]
    codes = torch.randint(0, V, (3, 500))
    m.set_codec(books, codes)
    latent = m.latent(codes[None])[0]  # (8, 500): the sum of the three codebooks' rows
    assert torch.allclose(latent[:, 7],
                          books[0, codes[0, 7]] + books[1, codes[1, 7]] + books[2, codes[2, 7]])
    residual = latent - books[0][codes[0]].T  # what stage 2 generates: all but the coarse codebook
    assert (torch.allclose(m.mean, residual.mean(1), atol=1e-5)
            and torch.allclose(m.std, residual.std(1), atol=1e-5))
    tokens = codes[:1, :40].expand(2, -1)
    sampled = m.sample(tokens, steps=3)  # the coarse latent of the tokens plus a generated residual
    assert (m.quantize(sampled)[:, 0] == tokens).float().mean() > 0.9
    # coarse codes come back
    assert (m.quantize(latent[None])[0, 0] == codes[0]).float().mean() > 0.9
    _, loss = m(torch.randint(0, V, (2, 3, 21)))
    assert loss.ndim == 0 and loss.requires_grad and 0.1 < loss.item() < 10
    for T in (1, 21, 64):  # any length, padded inside to the UNet's multiple
        assert m.sample(torch.randint(0, V, (2, T)), steps=2).shape == (2, 8, T)
    # temperature scales the starting noise: at 0 the sampler is one deterministic path, whatever
    # the generator
    cold = [m.sample(tokens, steps=2, temperature=0.0, generator=torch.Generator().manual_seed(s))
            for s in (0, 1)]
    warm = [m.sample(tokens, steps=2, temperature=1.0, generator=torch.Generator().manual_seed(s))
            for s in (0, 1)]
    assert torch.equal(cold[0], cold[1]) and not torch.allclose(warm[0], warm[1])
