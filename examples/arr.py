"""ARR, the loss: pull each tapped layer's responses towards a running mean of their class (docs/method.md §3)."""
import io

import timm
import torch
import torch.nn.functional as F

import dnrt

torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2,
                          num_classes=10)
dnrt.convert(model, torch.randn(1, 3, 32, 32))     # RAA in every block
arr = dnrt.ARR(model, num_classes=10, weight=10.0)  # taps every block's class token
optimizer = torch.optim.AdamW(list(model.parameters()), lr=1e-3)
print("tapped:", arr.layers)

x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % 10  # a batch with every class
for step in range(3):
    logits = model(x)                              # the model's own forward; ARR's hooks record the responses
    ce, reg = F.cross_entropy(logits, y), arr.loss(y)
    (ce + reg).backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: cross-entropy {ce.item():.3f}, ARR {reg.item():.4f}")

checkpoint = io.BytesIO()                          # a file name in real use
torch.save({"model": model.state_dict(), "arr": arr.state_dict()}, checkpoint)  # ARR's memory saves too
print("memory:", tuple(arr.memory.mean.shape), "classes seen:", int((arr.memory.count > 0).sum()))
