# Overlay that shrinks any config to train on a 2-core CPU in minutes:
#   python train.py configs/prefix_simba.py configs/tiny.py
# Keeps the variant (block, cond, mixer) and the codebooks; only the sizes change.
n_layer = 4
d_model = 64
d_state = 16
headdim = 16
n_head = 4
dropout = 0.0
attn_layers = ()
