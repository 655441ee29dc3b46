"""RAA, the activation: x · Φ(x + s) with s = wᵀx + b per feature vector (docs/method.md §1)."""
import torch
import torch.nn.functional as F

import dnrt

tokens = torch.randn(8, 17, 64)                    # [batch, tokens, features]: features last
raa = dnrt.RAA(64)                                 # GELU-based, the paper's vector shift
print("fresh RAA is GELU:", torch.allclose(raa(tokens), F.gelu(tokens), atol=1e-6))  # zero-initialised

with torch.no_grad():
    raa.weight.normal_(std=0.1)                    # as training would: each vector now shifts its threshold
out = raa(tokens)
out.sum().backward()
print("gradients of w and b:", tuple(raa.weight.grad.shape), tuple(raa.bias.grad.shape))

with dnrt.set_fused(False):                        # plain PyTorch instead of the kernels, inside this block
    print("plain PyTorch agrees:", torch.allclose(raa(tokens), out, atol=1e-5))

maps = torch.randn(8, 32, 14, 14)                  # NCHW: channels at dim 1, no permute
print("ReLU-based, NCHW:", tuple(dnrt.RAA(32, base="relu", channel_dim=1)(maps).shape))
print("by name:", dnrt.make_activation("raa_relu", num_features=32, channel_dim=1))
