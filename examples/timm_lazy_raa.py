"""RAA in a timm model by its config: ``act_layer=dnrt.LazyRAA`` sizes each RAA on the first forward (tokens:
features last; maps: channels first), after which the model holds plain ``dnrt.RAA`` modules; then ARR and a
few training steps on random data.

    python examples/timm_lazy_raa.py
"""
import functools

import timm
import torch
from torch import nn

import dnrt

torch.manual_seed(0)
vit = timm.create_model("vit_tiny_patch16_224", act_layer=dnrt.LazyRAA, img_size=32, patch_size=8, depth=2,
                        num_classes=10)
resnet = timm.create_model("resnet18", act_layer=functools.partial(dnrt.LazyRAA, base="relu"), num_classes=10)
x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
for name, model in [("vit_tiny", vit), ("resnet18", resnet)]:
    model(x[:2])  # the first forward sizes every LazyRAA
    raas = [m for m in model.modules() if isinstance(m, dnrt.RAA)]
    arr = dnrt.ARR(model, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        loss = nn.functional.cross_entropy(model(x), y) + arr.loss(y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"{name}: {len(raas)} RAA modules (first {raas[0]}), ARR on {len(arr.layers)} layers, "
          f"loss after 3 steps {loss.item():.3f}")
