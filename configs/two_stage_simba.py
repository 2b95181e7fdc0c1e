# The SSM of the two-stage design: Prefix SiMBA writing only the coarse codebook (codebook 0); a
# diffusion model (stage 2) turns it into the full codec latent. 281M parameters.
# tests/test_model.py checks 300M +/- 15%.
out_dir = "out-two-stage-simba"
block = "simba"
cond = "prefix"
mixer = "mamba2"
n_layer = 24
d_model = 1024
d_state = 512
d_conv = 4
expand = 2
headdim = 64
mlp_ratio = 2.0
dropout = 0.3
n_codebooks = 1
codebook_size = 1024
