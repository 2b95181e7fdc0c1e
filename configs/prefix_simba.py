# Prefix SiMBA, the paper's main model: Mamba-2 mixer + MLP blocks, the caption as a prefix.
# 287M parameters (with 768-dim FLAN-T5 text states; tests/test_model.py checks 300M +/- 15%).
# Block settings from the official code (github Lonian6/SSM-TTM): 24 layers at d_model 1024, Mamba-2 with
# d_conv 4, expand 2, d_state 512, MLP d -> 2d -> d, dropout 0.3.
out_dir = "out-prefix-simba"
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
n_codebooks = 4  # EnCodec's first 4 codebooks with the delay pattern (the official model: 1 DAC codebook)
codebook_size = 1024
