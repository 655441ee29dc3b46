"""ARR on a timm ViT and a torchvision ResNet: taps, reductions, loss against an independent formula."""
import copy
import io

import pytest
import timm
import timm.utils
import torch
import torchvision
from torch.nn import functional as F

import dnrt
from test_memory import Sequential


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
    with pytest.raises(dnrt.DNRTError, match="needs a training forward pass first"):
        arr.loss(torch.tensor([0]))
    model(torch.randn(2, 3, 32, 32))
    with pytest.raises(dnrt.DNRTError, match=r"targets must lie in \[0, 4\]"):
        arr.loss(torch.tensor([0, 7]))
    with pytest.raises(dnrt.DNRTError, match="could not find blocks or stages"):
        dnrt.ARR(torch.nn.Sequential(torch.nn.Linear(3, 3)), 2)


def twin_arrs(**options):
    """Two identical tiny ViTs, each with its own ARR."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(tiny_vit())
    return [(m, dnrt.ARR(m, num_classes=5, **options)) for m in models]


def batches(n, size=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 5, (size,), generator=g)) for _ in range(n)]


def test_two_training_forwards_then_two_losses_pair_up_in_order():
    (model, arr), (twin, twin_arr) = twin_arrs(momentum=0.3)
    (x1, y1), (x2, y2) = batches(2)
    model(x1), model(x2)
    got = [arr.loss(y1), arr.loss(y2)]
    want = []
    for x, y in [(x1, y1), (x2, y2)]:
        twin(x)
        want.append(twin_arr.loss(y))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert torch.equal(arr.memory.mean, twin_arr.memory.mean) and torch.equal(arr.memory.count, twin_arr.memory.count)
    got[1].backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(dnrt.DNRTError, match="needs a training forward pass first"):
        arr.loss(y1)


def test_too_many_waiting_forwards_is_an_error_at_the_forward():
    (model, arr), _ = twin_arrs()
    x, _ = batches(1)[0]
    for _ in range(arr.max_pending):
        model(x)
    with pytest.raises(dnrt.DNRTError, match="8 training forwards are waiting for arr.loss"):
        model(x)


def test_a_forward_stopped_part_way_is_refused_until_cleared():
    (model, arr), (twin, twin_arr) = twin_arrs()
    (x1, y1), (x2, y2) = batches(2)

    def fail(module, args):
        raise RuntimeError("out of memory")
    handle = model.blocks[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        model(x1)
    handle.remove()
    model(x2)
    with pytest.raises(dnrt.DNRTError, match=r"different numbers of waiting responses \(blocks.0 2, blocks.1 1"):
        arr.loss(y2)
    arr.clear()
    model(x2)
    twin(x2)
    torch.testing.assert_close(arr.loss(y2), twin_arr.loss(y2), rtol=0, atol=0)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_forward_without_grad_leaves_the_training_forward_alone(mode):
    (model, arr), (twin, twin_arr) = twin_arrs()
    (x1, y1), (x2, y2) = batches(2)
    model(x1)
    with mode():
        model(x2)
        untrained = arr.loss(y2)
    loss = arr.loss(y1)
    twin(x1)
    torch.testing.assert_close(loss, twin_arr.loss(y1), rtol=0, atol=0)
    assert loss.requires_grad and not untrained.requires_grad
    assert torch.equal(arr.memory.mean, twin_arr.memory.mean) and torch.equal(arr.memory.count, twin_arr.memory.count)
    model(x2)  # a no-grad forward alone: the training loss refuses it, saying why
    with torch.no_grad():
        model(x2)
    arr.loss(y2)
    with torch.no_grad():
        model(x2)
    with pytest.raises(dnrt.DNRTError, match=r"the last forward ran under torch.no_grad\(\)"):
        arr.loss(y2)


class Checkpointed(torch.nn.Module):
    """Two blocks under activation checkpointing: backward runs each block's GELU again (the next Linear saves
    its output), and ARR taps the GELUs."""

    def __init__(self, checkpoint):
        super().__init__()
        torch.manual_seed(0)
        layers = [torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.GELU(), torch.nn.Linear(6, 6)) for _ in "ab"]
        self.blocks = torch.nn.Sequential(*layers)
        self.checkpoint = checkpoint

    def forward(self, x):
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.checkpoint else block(x)
        return x


def test_activation_checkpointing_recomputation_is_not_a_forward():
    taps = ["blocks.0.1", "blocks.1.1"]
    (model, arr), (twin, twin_arr) = [(m, dnrt.ARR(m, 3, taps)) for m in (Checkpointed(True), Checkpointed(False))]
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
        model(x)
        loss = arr.loss(y)
        loss.backward()
        twin(x)
        torch.testing.assert_close(loss, twin_arr.loss(y), rtol=0, atol=0)
    assert torch.equal(arr.memory.mean, twin_arr.memory.mean)


def test_fullgraph_compile_of_model_and_loss_compiles_once_and_matches_eager():
    from torch._dynamo.backends.debugging import aot_eager

    def make():
        torch.manual_seed(0)
        m = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, num_classes=5,
                              embed_dim=32, num_heads=2)
        return dnrt.convert(m, torch.randn(1, 3, 16, 16))

    def step(model, arr, x, y):
        return F.cross_entropy(model(x), y) + arr.loss(y)

    compilations = []

    def backend(gm, inputs):
        compilations.append(gm)
        return aot_eager(gm, inputs)  # AOTAutograd functionalises the memory's in-place update

    (eager, eager_arr), (model, arr) = [(m, dnrt.ARR(m, 5, weight=2.0)) for m in (make(), make())]
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    exact = Sequential(5, 64, 0.1, "reference", torch.float32)
    for x, y in batches(3, seed=2):
        x = x[:, :, :16, :16]
        torch.testing.assert_close(compiled(model, arr, x, y), step(eager, eager_arr, x, y), rtol=1e-5, atol=1e-6)
        exact(torch.cat([arr.responses[name] for name in arr.layers], dim=1).detach(), y)
        assert torch.equal(arr.memory.mean, exact.mean)
        torch.testing.assert_close(arr.memory.mean, eager_arr.memory.mean, rtol=1e-5, atol=1e-6)
    assert len(compilations) == 1
    assert torch.equal(arr.memory.count, eager_arr.memory.count)


def _save_and_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "torch.save": _save_and_load,
    "ModelEmaV3": lambda model: timm.utils.ModelEmaV3(model, decay=0.5),
    "AveragedModel": torch.optim.swa_utils.AveragedModel,
}


@pytest.mark.parametrize("how", list(COPIES))
def test_a_copy_of_the_model_never_feeds_its_arr_and_the_model_still_trains(how):
    (model, arr), (twin, twin_arr) = twin_arrs(momentum=0.3)
    (x1, y1), (x2, _) = batches(2)
    model(x1), twin(x1)
    twin_arr.loss(y1)
    model(x1)  # a training forward of the model waits for its loss while the copy runs
    waiting = dict(arr.responses)
    copied = COPIES[how](model)
    copied.train()
    out = copied(x2)  # a training forward of the copy, with gradients
    assert out.requires_grad and all(arr.responses[name] is r for name, r in waiting.items())
    arr.loss(y1)
    twin(x1)
    loss = arr.loss(y1)
    torch.testing.assert_close(loss, twin_arr.loss(y1), rtol=0, atol=0)  # the queue held the model's forwards only
    with pytest.raises(dnrt.DNRTError, match="needs a training forward pass first"):
        arr.loss(y1)  # nothing of the copy's forward is waiting
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in copied.parameters())
    copied.eval()
    model.eval()
    torch.testing.assert_close(copied(x2), model(x2))  # the copy computes what the model does


def test_a_pickled_model_round_trips_and_takes_a_new_arr():
    (model, _), _ = twin_arrs()
    loaded = _save_and_load(model)
    x, y = batches(1)[0]
    model.eval(), loaded.eval()
    assert torch.equal(loaded(x), model(x))
    loaded.train()
    loaded_arr = dnrt.ARR(loaded, num_classes=5)
    loaded(x)
    loaded_arr.loss(y).backward()
    assert loaded.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


class WithARR(torch.nn.Module):
    """A module holding a model and its ARR, as a training wrapper (Lightning module, task model) does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = tiny_vit()
        self.arr = dnrt.ARR(self.net, num_classes=5, momentum=0.3)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_an_arr_copied_with_its_model_taps_the_copy(how):
    whole = WithARR()
    (x1, y1), (x2, y2) = batches(2)
    whole.net(x1)
    whole.arr.loss(y1)
    whole.net(x2)  # waiting; a copy takes the memory, not the waiting responses
    copied = COPIES[how](whole)
    assert copied.arr is not whole.arr and torch.equal(copied.arr.memory.mean, whole.arr.memory.mean)
    with pytest.raises(dnrt.DNRTError, match="needs a training forward pass first"):
        copied.arr.loss(y2)
    copied.net(x2)
    torch.testing.assert_close(copied.arr.loss(y2), whole.arr.loss(y2), rtol=0, atol=0)
    with pytest.raises(dnrt.DNRTError, match="needs a training forward pass first"):
        whole.arr.loss(y2)  # the copy's forward went to the copy's ARR alone


class Slices(torch.nn.Module):
    """Three tapped modules giving the responses x[:, :2], x[:, 2:4] and x[:, 4:8] (widths 2, 2, 4)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Identity() for _ in range(3))

    def forward(self, x):
        return self.a(x[:, :2]), self.b(x[:, 2:4]), self.c(x[:, 4:])


@pytest.mark.parametrize("weighting, want", [("paper", (9 + 0 + 0) / 3), ("reference", ((9 + 0) / 2 + 0) / 2)])
@pytest.mark.parametrize("compiled", [False, True])
def test_layer_weighting_on_mixed_widths_against_a_hand_computation(weighting, want, compiled):
    from torch._dynamo.backends.debugging import aot_eager

    model = Slices()
    arr = dnrt.ARR(model, 2, layers=["a", "b", "c"], order="paper", weight=1.0, layer_weighting=weighting)
    y = torch.tensor([0, 1])
    model(torch.zeros(2, 8))
    assert arr.loss(y).item() == 0  # the means are now 0 for both classes

    def step(x):
        model(x)
        return arr.loss(y)
    if compiled:
        step = torch.compile(step, fullgraph=True, backend=aot_eager)
    x = torch.zeros(2, 8)
    x[:, :2] = torch.tensor([[9.0, -9.0], [-9.0, 9.0]])  # layer a: |r - 0| = 9 everywhere; b and c: 0
    assert step(x).item() == want


def test_layer_weighting_is_checked():
    with pytest.raises(dnrt.DNRTError, match="unknown ARR layer_weighting 'authors'; known: paper, reference"):
        dnrt.ARR(Slices(), 2, layers=["a"], layer_weighting="authors")
