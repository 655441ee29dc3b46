"""convert() on timm and torchvision models: same logits at init, right widths and channel dims."""
import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import dnrt
from dnrt.nn.convert import RELU_TYPES, WidthDispatch, gelu_types

TIMM = {
    "vit": lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4),
    "deit": lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4),
    "cait": lambda: timm.create_model("cait_xxs24_224", img_size=32, patch_size=8, depth=2, num_classes=4),
    "pvt": lambda: timm.create_model("pvt_v2_b0", num_classes=4, depths=(1, 1, 1, 1)),
    "tnt": lambda: timm.create_model("tnt_s_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4),
    "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1), num_heads=(3, 6),
                                      embed_dim=48, num_classes=4),
    "convnext_linear_mlp": lambda: timm.create_model("convnext_atto", num_classes=4, conv_mlp=False),
    "convnext_conv_mlp": lambda: timm.create_model("convnext_atto", num_classes=4, conv_mlp=True),
}
TV = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=4),
    "vgg11": lambda: torchvision.models.vgg11(num_classes=4),
    "alexnet": lambda: torchvision.models.alexnet(num_classes=4),
    "mobilenet_v2": lambda: dnrt.convert(torchvision.models.mobilenet_v2(num_classes=4), torch.randn(1, 3, 32, 32),
                                         activation="relu", replace=(nn.ReLU6,)),
    "shufflenet_v2": lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=4),
}
INPUT = {"swin": 56, "pvt": 64, "alexnet": 64, "convnext_linear_mlp": 64, "convnext_conv_mlp": 64}


def activation_calls(model, x, types):
    """(width, dim-1 size) of every call of an activation module, by the test's own hooks."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape))) for m in model.modules()
             if isinstance(m, types)]
    model(x)
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("name", list(TIMM) + list(TV))
def test_same_logits_after_conversion(name):
    torch.manual_seed(0)
    model = {**TIMM, **TV}[name]().eval()
    size = INPUT.get(name, 32)
    x = torch.randn(2, 3, size, size)
    before_calls = activation_calls(model, x, gelu_types() + RELU_TYPES)
    with torch.no_grad():
        before = model(x)
    dnrt.convert(model, x)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, gelu_types() + RELU_TYPES) for m in model.modules())
    assert len(activation_calls(model, x, dnrt.RAA)) == len(before_calls) > 0


def test_channel_dims_follow_the_layout():
    x = torch.randn(1, 3, 64, 64)
    linear_mlp = dnrt.convert(TIMM["convnext_linear_mlp"](), x)
    conv_mlp = dnrt.convert(TIMM["convnext_conv_mlp"](), x)
    assert linear_mlp.stages[0].blocks[0].mlp.act.channel_dim == -1
    assert conv_mlp.stages[0].blocks[0].mlp.act.channel_dim == 1
    assert conv_mlp.stages[1].blocks[0].mlp.act.num_features == 4 * 80
    vit = dnrt.convert(TIMM["vit"](), torch.randn(1, 3, 32, 32))
    act = vit.blocks[0].mlp.act
    assert (act.num_features, act.channel_dim, act.base) == (768, -1, "gelu")
    resnet = dnrt.convert(TV["resnet18"](), torch.randn(1, 3, 32, 32))
    assert (resnet.layer2[0].relu.num_features, resnet.layer2[0].relu.channel_dim,
            resnet.layer2[0].relu.base) == (128, 1, "relu")


def test_one_module_called_at_two_widths_gets_one_raa_per_width():
    model = torchvision.models.resnet50(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    dnrt.convert(model, x)
    relu = model.layer1[0].relu
    assert isinstance(relu, WidthDispatch) and sorted(relu.by_width) == ["256", "64"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_activation_by_name_and_replace_all():
    model = TV["mobilenet_v2"]()
    dnrt.convert(model, torch.randn(1, 3, 32, 32), activation="silu", replace="all")
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert any(isinstance(m, nn.SiLU) for m in model.modules())
    vit = dnrt.convert(TIMM["vit"](), torch.randn(1, 3, 32, 32), activation="gdn")
    assert isinstance(vit.blocks[1].mlp.act, dnrt.GDN) and vit.blocks[1].mlp.act.num_features == 768


def test_converted_model_trains_the_shift():
    model = dnrt.convert(TIMM["vit"](), torch.randn(1, 3, 32, 32))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.blocks[0].mlp.act.weight.grad.abs().sum() > 0


def test_bad_replace():
    with pytest.raises(dnrt.DNRTError, match="replace must be None, 'all' or module types"):
        dnrt.convert(TV["resnet18"](), torch.randn(1, 3, 32, 32), replace="relu")


class FunctionalReLU(nn.Module):
    """Activations as F.relu calls only, as torchvision's GoogLeNet has them: nothing a module swap reaches."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x))).relu()


def test_nothing_to_replace_is_refused_naming_the_functional_calls():
    model = FunctionalReLU()
    with pytest.raises(dnrt.DNRTError, match=r"replaced nothing in FunctionalReLU: no activation modules; .*"
                                             r"F\.relu ×1, Tensor\.relu ×1"):
        dnrt.convert(model, torch.randn(2, 4))
    with pytest.warns(UserWarning, match="replaced nothing in FunctionalReLU"):
        assert dnrt.convert(model, torch.randn(2, 4), strict=False) is model
    assert dnrt.conversion_report(model).total == 0 and dnrt.conversion_report(model).functional == {
        "F.relu": 1, "Tensor.relu": 1}


def test_tool_refuses_raa_on_googlenet():
    from dnrt.tool.models import create_model

    with pytest.raises(dnrt.DNRTError, match=r"^model googlenet: act='raa' cannot be applied: dnrt.convert replaced "
                                             r"nothing in GoogLeNet: no activation modules; .*F\.relu ×57$"):
        create_model("googlenet", num_classes=4, model_lib="torchvision", act="raa",
                     model_kwargs={"aux_logits": False, "init_weights": False})


def test_report_counts_every_replaced_class():
    vit = TIMM["vit"]()
    assert dnrt.convert(vit, torch.randn(1, 3, 32, 32)) is vit
    report = dnrt.conversion_report(vit)
    assert report.replaced == {"GELU": 2} and report.kept == {} and report.functional == {}
    with pytest.raises(dnrt.DNRTError, match=r"replaced nothing in VisionTransformer \(it already holds 2 RAA"):
        dnrt.convert(vit, torch.randn(1, 3, 32, 32))
    resnet = TV["resnet18"]()
    relus = sum(isinstance(m, nn.ReLU) for m in resnet.modules())
    dnrt.convert(resnet, torch.randn(1, 3, 32, 32))
    report = dnrt.conversion_report(resnet)
    assert report.replaced == {"ReLU": relus} and report.total == relus == 9
    assert "replaced 9 with 'raa' (ReLU ×9)" in str(report)
    with pytest.raises(dnrt.DNRTError, match="has not been converted"):
        dnrt.conversion_report(TV["vgg11"]())


def test_tanh_gelu_converts_only_on_request():
    torch.manual_seed(0)
    tanh_only = nn.Sequential(nn.Linear(4, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 2))
    x = torch.randn(64, 4) * 3
    with pytest.raises(dnrt.DNRTError, match=r"kept: GELU\(approximate='tanh'\) ×1 \(converted only on request: "
                                             r"replace='all' or replace=\(GELU\(approximate='tanh'\),\)"):
        dnrt.convert(tanh_only, x)
    assert isinstance(tanh_only[1], nn.GELU)
    mixed = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(approximate="tanh"))
    with pytest.warns(UserWarning, match=r"kept GELU\(approximate='tanh'\) ×1"):
        dnrt.convert(mixed, x)
    assert isinstance(mixed[1], dnrt.RAA) and isinstance(mixed[3], nn.GELU)
    with torch.no_grad():
        before = tanh_only(x)
    with pytest.warns(UserWarning, match="erf-based 'raa': the outputs move at step 0"):
        dnrt.convert(tanh_only, x, replace="all")
    with torch.no_grad():
        moved = (tanh_only(x) - before).abs().max()
    assert isinstance(tanh_only[1], dnrt.RAA) and 1e-6 < moved < 1e-2  # erf against tanh: a real, small difference
