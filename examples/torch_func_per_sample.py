"""Per-sample gradients of a model with RAA, by torch.func (the way of Opacus-style DP training and functorch
ensembles): vmap over the batch of grad of the loss of one sample, with the parameters passed by functional_call.

    python examples/torch_func_per_sample.py
"""
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import dnrt

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
dnrt.convert(model, torch.randn(2, 10))  # GELU → RAA, which starts as GELU
params = {name: p.detach() for name, p in model.named_parameters()}
x, y = torch.randn(8, 10), torch.randint(0, 4, (8,))


def sample_loss(params, x, y):
    """The loss of one sample: torch.func maps it over the batch."""
    logits = functional_call(model, params, (x.unsqueeze(0),))
    return nn.functional.cross_entropy(logits, y.unsqueeze(0))


per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
for name, g in per_sample.items():
    print(f"{name:10s} per-sample gradients {tuple(g.shape)}")

model.zero_grad()
nn.functional.cross_entropy(model(x[:1]), y[:1]).backward()
error = max((per_sample[name][0] - p.grad).abs().max().item() for name, p in model.named_parameters())
print(f"sample 0 against its own backward: largest difference {error:.1e}")
assert error < 1e-5
