"""convert: swap a model's activations for RAA after one dry forward; the outputs stay what they were."""
import torch
import torchvision

import dnrt

model = torchvision.models.resnet18(num_classes=10).eval()
x = torch.randn(2, 3, 64, 64)
before = model(x)

dnrt.convert(model, x)                             # every ReLU -> ReLU-based RAA (every GELU -> GELU-based RAA)
raa = [name for name, module in model.named_modules() if isinstance(module, dnrt.RAA)]
print(f"{len(raa)} RAA modules, e.g. {raa[0]}: {model.get_submodule(raa[0])}")
print("outputs unchanged:", torch.allclose(model(x), before, atol=1e-5))  # RAA starts as the activation it replaced

elu_model = torchvision.models.resnet18(num_classes=10)
dnrt.convert(elu_model, x, activation="elu", replace="all")  # any activation of dnrt.ACTIVATIONS, any type
print("stem activation:", elu_model.relu)
