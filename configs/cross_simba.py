# Cross SiMBA: Mamba-2 mixer, cross-attention to the caption, MLP.
# 293M parameters: 18 layers, since cross-attention adds ~4.2M per layer (the paper holds the parameter
# count equal across variants). tests/test_model.py checks 300M +/- 15%.
out_dir = "out-cross-simba"
block = "simba"
cond = "cross"
mixer = "mamba2"
n_layer = 18
d_model = 1024
d_state = 512
d_conv = 4
expand = 2
headdim = 64
n_head = 16
mlp_ratio = 2.0
dropout = 0.3
n_codebooks = 4
codebook_size = 1024
