# Stage 2 of the two-stage design: a diffusers 1-D UNet that turns codebook-0 tokens (written by the SSM of
# configs/two_stage_simba.py) into the full codec latent (all stored codebooks). v-prediction, DDPM noise
# schedule for training; DPM-Solver++ for sampling. Trained by the same loop:
#   python train.py configs/stage2_diffusion.py
out_dir = "out-stage2-diffusion"
model_type = "stage2"
unet_channels = (128, 256, 512)
train_timesteps = 1000
seq_len = 750  # 10 s crops (the UNet is convolutional: it samples any length)
learning_rate = 1e-4
weight_decay = 0.0
warmup_iters = 500
dropout = 0.0
ema_decay = 0.999  # diffusion models sample from an average of their weights (train.py's EMA)
