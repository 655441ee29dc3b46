"""ARR on a timm ViT and a torchvision ResNet: taps, reductions, loss against an independent formula."""
import pytest
import timm
import torch
import torchvision
from torch.nn import functional as F

import dnrt


def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=5)


def block_outputs(model, names, x):
    """The raw outputs of the named modules for input ``x``, by hooks of this test's own."""
    modules, out = dict(model.named_modules()), {}
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: out.__setitem__(n, o)) for n in names]
    model(x)
    for h in handles:
        h.remove()
    return out


def test_vit_taps_every_block_and_takes_the_class_token():
    torch.manual_seed(0)
    model = tiny_vit()
    arr = dnrt.ARR(model, num_classes=5)
    assert arr.layers == ["blocks.0", "blocks.1", "blocks.2"]
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    raw = block_outputs(model, arr.layers, x)
    for name in arr.layers:
        torch.testing.assert_close(arr.responses[name], raw[name][:, 0])


def test_resnet_taps_stages_and_pools():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    arr = dnrt.ARR(model, num_classes=5)
    assert arr.layers == ["layer1", "layer2", "layer3", "layer4"]
    raw = block_outputs(model, arr.layers, torch.randn(2, 3, 32, 32))
    for name in arr.layers:
        torch.testing.assert_close(arr.responses[name], F.adaptive_avg_pool2d(raw[name], 1).flatten(1))
    arr.loss(torch.tensor([0, 1]))
    assert arr.memory.num_features == 64 + 128 + 256 + 512


def test_loss_equals_weighted_mean_l1_to_sequential_means():
    torch.manual_seed(0)
    model = tiny_vit()
    arr = dnrt.ARR(model, num_classes=5, weight=20.0, momentum=0.3)
    means = {}
    for step in range(3):
        x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 0, 2, 1, 0])
        model(x)
        got = arr.loss(y)
        per_layer = []
        for name in arr.layers:
            r = arr.responses[name].detach().double()
            mu = means.setdefault(name, {})
            target = []
            for ri, yi in zip(r, y.tolist()):
                mu[yi] = ri if yi not in mu else 0.7 * mu[yi] + 0.3 * ri
                target.append(mu[yi])
            per_layer.append((r - torch.stack(target)).abs().mean())
        want = 20.0 * sum(per_layer) / len(per_layer)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert got > 0


def test_gradients_reach_the_model_from_arr_alone():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    arr = dnrt.ARR(model, num_classes=5)
    y = torch.tensor([0, 0, 1, 1])
    model(torch.randn(4, 3, 32, 32))
    arr.loss(y)
    model(torch.randn(4, 3, 32, 32))
    loss = arr.loss(y)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None


def test_eval_mode_reads_memory_and_state_round_trips():
    torch.manual_seed(0)
    model = tiny_vit()
    arr = dnrt.ARR(model, num_classes=5)
    model(torch.randn(8, 3, 32, 32))
    arr.loss(torch.arange(8) % 5)
    state = {k: v.clone() for k, v in arr.state_dict().items()}
    assert set(state) == {"memory.mean", "memory.count"} and state["memory.mean"].shape == (5, 3 * 192)
    model.eval()
    model(torch.randn(8, 3, 32, 32))
    arr.loss(torch.arange(8) % 5)
    assert all(torch.equal(v, arr.state_dict()[k]) for k, v in state.items())
    fresh = dnrt.ARR(model, num_classes=5)
    fresh.load_state_dict(state)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())


def test_empty_batch_gives_zero_loss_and_keeps_the_memory():
    model = tiny_vit()
    arr = dnrt.ARR(model, num_classes=5, weight=3.0)
    model(torch.randn(4, 3, 32, 32))
    arr.loss(torch.tensor([0, 1, 2, 2]))
    before = {k: v.clone() for k, v in arr.state_dict().items()}
    model(torch.randn(0, 3, 32, 32))
    loss = arr.loss(torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    for k, v in arr.state_dict().items():
        assert torch.equal(v, before[k])


def test_explicit_layers_and_remove():
    model = tiny_vit()
    arr = dnrt.ARR(model, num_classes=5, layers=["blocks.1"], reduce="mean")
    model(torch.randn(2, 3, 32, 32))
    assert list(arr.responses) == ["blocks.1"] and arr.responses["blocks.1"].shape == (2, 192)
    arr.remove()
    arr.responses.clear()
    model(torch.randn(2, 3, 32, 32))
    assert arr.responses == {}


def test_errors():
    model = tiny_vit()
    with pytest.raises(dnrt.DNRTError, match="no module named 'blocks.9'"):
        dnrt.ARR(model, 5, layers=["blocks.9"])
    arr = dnrt.ARR(model, 5)
    with pytest.raises(dnrt.DNRTError, match="needs a forward pass"):
        arr.loss(torch.tensor([0]))
    model(torch.randn(2, 3, 32, 32))
    with pytest.raises(dnrt.DNRTError, match=r"targets must lie in \[0, 4\]"):
        arr.loss(torch.tensor([0, 7]))
    with pytest.raises(dnrt.DNRTError, match="could not find blocks or stages"):
        dnrt.ARR(torch.nn.Sequential(torch.nn.Linear(3, 3)), 2)
