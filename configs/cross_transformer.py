# Cross Transformer, MusicGen-small's design and the paper's baseline: self-attention, cross-attention to
# the caption, FFN (d_model 1024, 16 heads, FFN 4096). MusicGen-small stacks 24 such layers (412M by this
# count); 18 here hold the parameter count near 300M like every variant:
# 311M parameters.
# tests/test_model.py checks 300M +/- 15%.
out_dir = "out-cross-transformer"
block = "transformer"
cond = "cross"
n_layer = 18
d_model = 1024
n_head = 16
mlp_ratio = 4.0
dropout = 0.3
n_codebooks = 4
codebook_size = 1024
