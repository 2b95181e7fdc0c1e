# Prefix Transformer: causal self-attention + MLP, the caption as a prefix (the Transformer twin of
# Prefix SiMBA). 311M parameters: 24 layers, d_model 1024, 16 heads, FFN 4096.
# tests/test_model.py checks 300M +/- 15%.
out_dir = "out-prefix-transformer"
block = "transformer"
cond = "prefix"
n_layer = 24
d_model = 1024
n_head = 16
mlp_ratio = 4.0
dropout = 0.3
n_codebooks = 4
codebook_size = 1024
