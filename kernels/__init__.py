"""Hand-written Triton kernels (fused softmax, FlashAttention-style attention) with PyTorch references."""
