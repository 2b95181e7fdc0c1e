# Overlay that shrinks any config to train on a 2-core CPU in minutes:
#   python train.py configs/prefix_simba.py configs/tiny.py
# Keeps the variant (block, cond, mixer) and the codebooks; the sizes and the training length change.
n_layer = round(n_layer / 6)  # 24 -> 4; each variant keeps its paper layer count relative to the others (Prefix
# Mamba 40 -> 7, the cross-attention variants 18 -> 3), so the tiny variants have equal parameter counts too
d_model = 64
d_state = 16
headdim = 16
n_head = 4
dropout = 0.0
attn_layers = ()
# training on a CPU: 10 s crops, no accumulation
batch_size = 8
gradient_accumulation_steps = 1
seq_len = 750
max_iters = 600
lr_decay_iters = 600
warmup_iters = 30
# the best rate of each family in `python sweep.py`'s grid at this size (README, "The comparison"): every SSM
# variant's is 3.125e-2, both Transformers' 5e-3 (rates 2.5x apart)
learning_rate = 5e-3 if block == "transformer" else 3.125e-2
eval_interval = 100
eval_iters = 10
