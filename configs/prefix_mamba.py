# Prefix Mamba: Mamba-2 mixer only (no MLP), the caption as a prefix.
# 305M parameters: 40 layers, since a mixer-only block has ~7.4M parameters against SiMBA's ~11.6M
# (the paper holds the parameter count equal across variants). tests/test_model.py checks 300M +/- 15%.
out_dir = "out-prefix-mamba"
block = "mamba"
cond = "prefix"
mixer = "mamba2"
n_layer = 40
d_model = 1024
d_state = 512
d_conv = 4
expand = 2
headdim = 64
dropout = 0.3
n_codebooks = 4
codebook_size = 1024
