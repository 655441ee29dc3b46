"""LazyRAA: an RAA sized by its first input, for model configs (timm's ``act_layer``): it starts as its base,
trains, finds the channel layout, round-trips its state with RAA, and compiles."""
import functools

import pytest
import torch
from torch import nn

import dnrt

timm = pytest.importorskip("timm")


def vit(act_layer):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", act_layer=act_layer, img_size=32, patch_size=8, embed_dim=48,
                             depth=2, num_heads=2, num_classes=5)


def resnet(act_layer):
    torch.manual_seed(0)
    return timm.create_model("resnet18", act_layer=act_layer, num_classes=5)


def train_step(model, x, y):
    """One SGD step; returns the RAA weights before and after it."""
    raas = [m for m in model.modules() if isinstance(m, dnrt.RAA)]
    before = [p.detach().clone() for m in raas for p in m.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return before, [p.detach() for m in raas for p in m.parameters()]


@pytest.mark.parametrize("build,act_layer,plain,width,layout", [
    (vit, dnrt.LazyRAA, nn.GELU, 192, -1),
    (resnet, functools.partial(dnrt.LazyRAA, base="relu"), nn.ReLU, 64, 1),  # timm passes inplace=True
])
def test_timm_act_layer_builds_starts_as_its_base_and_trains(build, act_layer, plain, width, layout):
    model, reference = build(act_layer), build(plain).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    model.eval()
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)  # zero-initialised: the base
    lazy_left = [m for m in model.modules() if isinstance(m, dnrt.LazyRAA)]
    raas = [m for m in model.modules() if type(m) is dnrt.RAA]
    assert not lazy_left and len(raas) == sum(isinstance(m, plain) for m in reference.modules())
    assert raas[0].num_features == width and raas[0].channel_dim == layout
    assert raas[0].kind.tolist() == [0 if plain is nn.GELU else 1, 0, layout]
    before, after = train_step(model.train(), x, y)
    assert all(torch.isfinite(a).all() for a in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_layout_rules_and_a_given_channel_dim():
    tokens, nchw, nhwc = dnrt.LazyRAA(), dnrt.LazyRAA(), dnrt.LazyRAA(channel_dim=-1)
    tokens(torch.randn(2, 3, 7)), nchw(torch.randn(2, 5, 4, 4)), nhwc(torch.randn(2, 4, 4, 6))
    assert (tokens.num_features, tokens.channel_dim) == (7, -1)
    assert (nchw.num_features, nchw.channel_dim) == (5, 1)
    assert (nhwc.num_features, nhwc.channel_dim) == (6, -1)
    scalar = dnrt.LazyRAA(shift="scalar")
    scalar(torch.randn(3, 9))
    assert scalar.weight is None and scalar.bias.shape == (1,) and scalar.num_features == 9
    with pytest.raises(dnrt.DNRTError, match=r"RAA\(5\) expects 5 features along dim 1"):
        nchw(torch.randn(2, 6, 4, 4))


@pytest.mark.parametrize("shift", ["vector", "scalar", "elementwise"])
def test_a_materialised_state_loads_into_a_fresh_lazy_raa_and_into_raa(shift):
    torch.manual_seed(0)
    source, x = dnrt.LazyRAA(shift=shift), torch.randn(2, 6, 3, 3)
    source(x)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.5)
    state = source.state_dict()
    fresh, plain = dnrt.LazyRAA(shift=shift), dnrt.RAA(6, shift=shift, channel_dim=1)
    fresh.load_state_dict(state)
    plain.load_state_dict(state)
    want = source(x)
    torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
    torch.testing.assert_close(plain(x), want, rtol=0, atol=0)
    assert type(fresh) is dnrt.RAA and fresh.channel_dim == 1 and fresh.num_features == 6
    back = dnrt.LazyRAA(shift=shift)
    back.load_state_dict(plain.state_dict())
    torch.testing.assert_close(back(x), want, rtol=0, atol=0)


def test_a_state_of_another_kind_is_refused_before_the_first_call():
    state = dnrt.RAA(6, base="relu").state_dict()
    with pytest.raises(dnrt.DNRTError, match=r"^LazyRAA: the state is of RAA\(base='relu', shift='vector', "
                                             r"channel_dim=-1\), this module is RAA\(base='gelu'"):
        dnrt.LazyRAA().load_state_dict(state)
    with pytest.raises(dnrt.DNRTError, match="this module is RAA\\(base='gelu', shift='vector', channel_dim=1\\)"):
        dnrt.LazyRAA(channel_dim=1).load_state_dict(dnrt.RAA(6).state_dict())


def test_compile_fullgraph_of_a_model_with_lazy_raa_equals_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), dnrt.LazyRAA(), nn.Flatten(2), nn.Linear(36, 6), dnrt.LazyRAA())
    twin = nn.Sequential(nn.Conv2d(3, 8, 3), dnrt.RAA(8, channel_dim=1), nn.Flatten(2), nn.Linear(36, 6),
                         dnrt.RAA(6))
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if "." in k and k.split(".")[0] in "03"},
                         strict=False)
    counter = CompileCounterWithBackend("aot_eager")
    x = torch.randn(2, 3, 8, 8)
    out = torch.compile(model, backend=counter, fullgraph=True)(x)
    assert counter.frame_count == 1 and all(type(m) is not dnrt.LazyRAA for m in model)
    torch.testing.assert_close(out, twin(x), rtol=1e-5, atol=1e-6)
