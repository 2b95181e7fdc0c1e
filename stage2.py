"""Stage 2 of the two-stage design: codebook-0 tokens -> the full codec latent, by diffusion.

The stage-1 LM (model.py, configs/two_stage_simba.py) writes codebook 0 only; this model restores
what codebooks 1..K-1 add, so the codec can decode full-quality audio. train.py trains it with
model_type = "stage2" (configs/stage2_diffusion.py); sample.py runs it after the LM when given
--stage2_dir.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Stage2Config:
    codebook_size: int = 1024
    n_codebooks: int = 8                # codebooks whose embeddings sum to the target latent
                                        # (all stored ones)
    latent_dim: int = 128               # EnCodec 24 kHz: 128 channels at 75 Hz
    unet_channels: tuple = (64, 64, 128)  # diffusers UNet1D block widths
    train_timesteps: int = 1000


class Stage2Diffusion(nn.Module):
    """A diffusers 1-D UNet that denoises the codec latent given the codebook-0 tokens at the same
    frame rate.

    The tokens are embedded with the codec's own codebook 0, giving the coarse latent; what diffuses
    is the residual the finer codebooks add to it, so the coarse part is always exact and the model
    learns only the rest.

    Target: the latent the codec's quantizer decodes from all stored codebooks,
    sum_k codebook_k[codes_k], minus the coarse latent; residual and condition are normalized per
    channel with statistics kept as buffers (so they travel in the checkpoint); the codebooks are a
    frozen buffer too, to build targets and to quantize generated latents back to tokens.
    Objective: v-prediction (v = alpha_t * noise - sigma_t * x0), which stays well scaled at both
    ends of the noise schedule and suits samplers with few steps. forward(codes) -> (None, loss),
    like the LM, so train.py trains it unchanged.
    """

    def __init__(self, config):
        super().__init__()
        from diffusers import DDPMScheduler, UNet1DModel
        self.config = config
        K, V, D = config.n_codebooks, config.codebook_size, config.latent_dim
        self.register_buffer("codebooks", torch.zeros(K, V, D))  # set from the codec by set_codec
        self.register_buffer("mean", torch.zeros(D))  # of the residual
        self.register_buffer("std", torch.ones(D))
        self.register_buffer("cond_mean", torch.zeros(D))  # of the coarse latent
        self.register_buffer("cond_std", torch.ones(D))
        time_dim = 16  # Fourier features of the timestep, fed to the UNet as extra input channels
        self.unet = UNet1DModel(in_channels=2 * D, out_channels=D, extra_in_channels=time_dim,
                                time_embedding_dim=time_dim,
                                block_out_channels=tuple(config.unet_channels),
                                time_embedding_type="fourier", flip_sin_to_cos=True,
                                use_timestep_embedding=False, norm_num_groups=8, layers_per_block=1)
        # the UNet halves the length this many times
        self.multiple = 2 ** (len(config.unet_channels) + 1)
        # the UNet's first block halves the frame rate before anything else; frame-level detail
        # (what each token adds) takes this full-rate path: a width-3 convolution over the same
        # input, added to the UNet's output
        self.frame_path = nn.Conv1d(2 * D, D, 3, padding=1)
        self.noise = DDPMScheduler(num_train_timesteps=config.train_timesteps,
                                   prediction_type="v_prediction")

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def set_codec(self, codebooks, codes):
        """codebooks (K, V, D) from the codec's quantizer; codes (K, frames): a sample of the data,
        for the per-channel mean and std of its latent."""
        self.codebooks.copy_(codebooks)
        coarse = self.latent(codes[None, :1])[0]  # (D, frames)
        residual = self.latent(codes[None])[0] - coarse
        for mean, std, x in ((self.mean, self.std, residual),
                             (self.cond_mean, self.cond_std, coarse)):
            mean.copy_(x.mean(1))
            std.copy_(x.std(1).clamp(min=1e-5))

    def latent(self, codes):
        """codes (B, K, T) -> the codec latent (B, D, T), unnormalized."""
        return sum(self.codebooks[k][codes[:, k]] for k in range(codes.shape[1])).transpose(1, 2)

    def denoise(self, x, t, cond):
        """The UNet's v estimate for noisy normalized residuals x (B, D, T) at integer timesteps t
        (B,), given cond (B, D, T), the normalized coarse latent."""
        T = x.shape[-1]
        # a length the UNet can halve
        pad = max(2 * self.multiple, -(-T // self.multiple) * self.multiple) - T
        h = torch.cat([x, cond], dim=1)  # (B, 2D, T)
        return (self.unet(F.pad(h, (0, pad)), t.float() / self.config.train_timesteps)
                .sample[..., :T] + self.frame_path(h))

    def forward(self, codes, generator=None):
        """codes (B, K, T): all stored codebooks of a crop -> (None, diffusion loss)."""
        coarse = self.latent(codes[:, :1])  # (B, D, T)
        # the residual, normalized
        x0 = (self.latent(codes) - coarse - self.mean[:, None]) / self.std[:, None]
        cond = (coarse - self.cond_mean[:, None]) / self.cond_std[:, None]
        B = x0.shape[0]
        t = torch.randint(0, self.config.train_timesteps, (B,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        xt = self.noise.add_noise(x0, noise, t)
        v = self.noise.get_velocity(x0, noise, t)
        return None, F.mse_loss(self.denoise(xt, t, cond), v)

    @torch.no_grad()
    def sample(self, tokens, steps=25, temperature=1.0, generator=None):
        """Codebook-0 tokens (B, T) -> a latent (B, D, T) for any T, with DPM-Solver++ in `steps`
        steps.

        temperature scales the starting noise (the solver is deterministic from there), as in
        Grad-TTS: 1 samples the learned distribution; lower values trade detail for being right on
        average, 0 is the one path from x_T = 0, close to the conditional mean."""
        from diffusers import DPMSolverMultistepScheduler
        solver = DPMSolverMultistepScheduler(num_train_timesteps=self.config.train_timesteps,
                                             prediction_type="v_prediction",
                                             algorithm_type="dpmsolver++")
        solver.set_timesteps(steps)
        B, T = tokens.shape
        coarse = self.latent(tokens[:, None])  # (B, D, T), the same at every step
        cond = (coarse - self.cond_mean[:, None]) / self.cond_std[:, None]
        x = temperature * torch.randn(B, self.config.latent_dim, T,
                                      generator=generator).to(tokens.device)
        for t in solver.timesteps:
            x = solver.step(self.denoise(x, t.expand(B).to(tokens.device), cond), t, x).prev_sample
        return coarse + x * self.std[:, None] + self.mean[:, None]

    @torch.no_grad()
    def quantize(self, latent):
        """A latent (B, D, T) -> codes (B, K, T) by residual quantization with the codec's
        codebooks."""
        residual = latent.transpose(1, 2)  # (B, T, D)
        codes = []
        for book in self.codebooks:
            idx = torch.cdist(residual,
                              book[None].expand(residual.shape[0], -1, -1)).argmin(-1)  # (B, T)
            residual = residual - book[idx]
            codes.append(idx)
        return torch.stack(codes, 1)
