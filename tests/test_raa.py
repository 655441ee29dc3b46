"""RAA against the plain formula of docs/method.md §1: values, gradients, dtypes, memory kept, its saved kind.

The kernels, the registered ops and compilation: tests/test_kernels.py."""
import math
import re
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

import dnrt
from dnrt.nn import kernels


def formula(x, w, b, dim, base, shift):
    """docs/method.md §1 written independently: per-vector shift by einsum, Φ through erf."""
    xm = x.movedim(dim, -1)
    if shift == "vector":
        s = torch.einsum("...c,c->...", xm, w).unsqueeze(-1) + b
    elif shift == "scalar":
        s = b
    else:
        s = torch.einsum("...c,dc->...d", xm, w) + b
    z = xm + s
    y = xm * 0.5 * (1 + torch.erf(z / math.sqrt(2))) if base == "gelu" else torch.clamp(z, min=0)
    return y.movedim(-1, dim)


SHAPES = {-1: (3, 5, 6), 1: (2, 6, 3, 4)}


def randomised(base, shift, dim, dtype=torch.float64):
    m = dnrt.RAA(6, base=base, shift=shift, channel_dim=dim).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


@pytest.mark.parametrize("base", ["gelu", "relu"])
@pytest.mark.parametrize("shift", ["vector", "scalar", "elementwise"])
@pytest.mark.parametrize("dim", [-1, 1])
def test_values_and_gradients_match_formula(base, shift, dim):
    torch.manual_seed(0)
    m = randomised(base, shift, dim)
    x = torch.randn(*SHAPES[dim], dtype=torch.float64, requires_grad=True)
    params = [m.weight, m.bias] if m.weight is not None else [m.bias]
    y = m(x)
    torch.testing.assert_close(y, formula(x, m.weight, m.bias, dim, base, shift))
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x] + params, g)
    want = torch.autograd.grad(formula(x, m.weight, m.bias, dim, base, shift), [x] + params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    if base == "gelu":
        assert torch.autograd.gradcheck(lambda x, *p: m(x), [x] + params)


def test_channel_dim_one_accepts_vectors_last_dim_two_d():
    m = randomised("gelu", "vector", -1)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), formula(x, m.weight, m.bias, -1, "gelu", "vector"))


@pytest.mark.parametrize("base,static", [("gelu", nn.GELU()), ("relu", nn.ReLU())])
@pytest.mark.parametrize("dim", [-1, 1])
def test_fresh_raa_equals_its_base(base, static, dim):
    x = torch.randn(*SHAPES[dim]) * 3
    torch.testing.assert_close(dnrt.RAA(6, base=base, channel_dim=dim)(x), static(x), atol=1e-6, rtol=1e-6)


EPS = torch.finfo(torch.float32).eps  # 2⁻²³: the tolerances of docs/method.md §1 are in units of ε·|x|


@pytest.mark.parametrize("mode", [False, "auto"])
@pytest.mark.parametrize("shape,dim", [((-1, 5), -1), ((-1, 64), -1), ((2, 3, -1), 1)])
def test_gelu_base_is_within_4_ulps_of_float64_and_exact_where_it_saturates(mode, shape, dim):
    """docs/method.md §1 (precision): ``|y − y₆₄| ≤ 4·ε·|x|`` and ``|∂L/∂x − ref| ≤ 4·ε·(|x| + 1)·|g|``, whichever
    erf runs (ATen's or the kernels', vectorised or scalar, at any ATEN_CPU_CAPABILITY); exact at 0 and where
    Φ is 0 or 1. Rows of 5 features run scalar tails, 64 vector bodies, channels first both."""
    torch.manual_seed(0)
    x = torch.cat([torch.linspace(-12, 12, 4800), torch.tensor([0.0, 1e-30, -40.0, 40.0, 3.0]),
                   torch.randn(955) * 3]).reshape(shape)
    x.requires_grad_()
    m = dnrt.RAA(x.shape[dim], shift="scalar", channel_dim=dim)
    with torch.no_grad():
        m.bias.fill_(0.25)  # exact in float32: the shift adds no error of its own
    g = torch.randn_like(x)
    with kernels.set_fused(mode):
        y = m(x)
        (grad_x,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    want = x64 * 0.5 * (1 + torch.erf((x64 + 0.25) / math.sqrt(2)))
    (want_grad,) = torch.autograd.grad(want, x64, g.double())
    assert ((y.double() - want).abs() <= 4 * EPS * x64.abs()).all()
    assert ((grad_x.double() - want_grad).abs() <= 4 * EPS * (x64.abs() + 1) * g.double().abs()).all()
    special = y.detach().flatten()[4800:4804].tolist()
    assert special[0] == 0.0 and special[2] == 0.0 and special[3] == 40.0 and 0 < special[1] < 1e-30


INF, NAN = float("inf"), float("nan")


def defined(x, g, w, b, base):
    """docs/method.md §1–§2 on non-finite input, in float64, for rows [n, d]: a non-finite shift makes its row
    NaN; otherwise x·Φ(z) and x·φ(z) are 0 where Φ(z) or φ(z) is 0 (their limits at x = ±∞). Returns y, ∂L/∂x,
    ∂L/∂w (None for the scalar shift) and ∂L/∂b."""
    x, g = x.double(), g.double()
    s = b.double() if w is None else (x * w.double()).sum(-1, keepdim=True) + b.double()
    z = x + torch.where(torch.isfinite(s), s, NAN)
    if base == "relu":
        y, direct = torch.clamp(z, min=0), (z > 0).double()
        via_s = direct
    else:
        cdf, pdf = 0.5 * (1 + torch.erf(z / math.sqrt(2))), torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        y = torch.where(cdf == 0, 0.0, x * cdf)
        via_s = torch.where(pdf == 0, 0.0, x * pdf)
        direct = cdf + via_s
    u = (g * via_s).sum(-1, keepdim=True)
    grad_x = g * direct + (0 if w is None else u * w.double())
    return y, grad_x, None if w is None else (x * u).sum(0), u.sum()


def non_finite_rows(width):
    """Rows of ``width`` features holding +∞, −∞, NaN (in vector bodies and in tails), both infinities, none."""
    torch.manual_seed(0)
    x = torch.randn(6, width)
    for row, col, value in [(0, 2, INF), (1, 1, -INF), (2, 1, NAN), (3, width - 1, INF), (4, 0, -INF), (4, 3, INF)]:
        x[row, col] = value
    return x


@pytest.mark.parametrize("mode", [False, "auto"])
@pytest.mark.parametrize("base", ["gelu", "relu"])
@pytest.mark.parametrize("shift", ["vector", "zero", "scalar"])
@pytest.mark.parametrize("width,dim", [(4, -1), (20, -1), (20, 1)])
def test_non_finite_input_has_one_answer_in_every_path(mode, base, shift, width, dim):
    """Fused (C++ kernels), plain PyTorch and the exported formula give docs/method.md §1's answer for ±∞ and NaN,
    forward and backward: the limits where the shift is finite (scalar shift: +∞ → +∞, −∞ → 0, gradient g or 0),
    a NaN vector where it is not (vector shift: any ∞ or NaN it reads, also through a zero weight)."""
    rows = non_finite_rows(width)
    m = dnrt.RAA(width, base=base, shift="scalar" if shift == "scalar" else "vector", channel_dim=dim)
    with torch.no_grad():
        m.bias.fill_(0.1)
        if shift == "vector":
            m.weight.copy_(torch.linspace(-0.5, 0.5, width))
    x = (rows if dim == -1 else rows.reshape(2, 3, width).transpose(1, 2)).contiguous().requires_grad_()
    g = torch.randn_like(x)
    params = [x, m.bias] if m.weight is None else [x, m.weight, m.bias]
    with kernels.set_fused(mode):
        y = m(x)
        got = torch.autograd.grad(y, params, g)
    flat_g = g if dim == -1 else g.transpose(1, 2).reshape(6, width)
    want_y, want_x, want_w, want_b = defined(rows, flat_g, m.weight, m.bias, base)
    as_rows = (lambda t: t) if dim == -1 else (lambda t: t.transpose(1, 2).reshape(6, width))
    close = dict(rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(as_rows(y.detach()).double(), want_y, **close)
    exported = dnrt.nn.raa.raa_formula(x.detach(), m.weight, m.bias, -2 if dim == 1 else -1, base, m.shift)
    torch.testing.assert_close(as_rows(exported).double(), want_y, **close)
    torch.testing.assert_close(as_rows(got[0]).double(), want_x, **close)
    for a, e in zip(got[1:], [want_b] if want_w is None else [want_w, want_b]):
        torch.testing.assert_close(a.double().reshape(e.shape), e, **close)
    if shift == "scalar":  # the limits, spelt out
        assert as_rows(y.detach())[0, 2] == INF and as_rows(y.detach())[1, 1] == 0
        assert as_rows(got[0])[0, 2] == flat_g[0, 2] and as_rows(got[0])[1, 1] == 0
    assert torch.isnan(want_y[3]).all() == (shift != "scalar") and not torch.isnan(want_y[5]).any()


def test_scalar_shift_computes_in_float32_for_bfloat16_input():
    torch.manual_seed(0)
    m = dnrt.RAA(6, shift="scalar")
    with torch.no_grad():
        m.bias.fill_(0.3)
    x, g = torch.randn(4, 5, 6).bfloat16().requires_grad_(), torch.randn(4, 5, 6).bfloat16()
    m(x).backward(g)
    x64, b64 = x.detach().double(), m.bias.detach().double().requires_grad_()
    (formula(x64, None, b64, -1, "gelu", "scalar") * g.double()).sum().backward()
    assert abs(m.bias.grad.double() - b64.grad) <= 1e-5 * abs(b64.grad)


def test_bfloat16_autocast_on_cpu():
    torch.manual_seed(0)
    layer, act = nn.Linear(8, 6), randomised("gelu", "vector", -1, torch.float32)
    x = torch.randn(4, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = layer(x)
        y = act(h)
    assert h.dtype == y.dtype == torch.bfloat16
    want = formula(h.float(), act.weight, act.bias, -1, "gelu", "vector")
    torch.testing.assert_close(y.float(), want, atol=0.05, rtol=0.05)
    y.float().sum().backward()
    assert act.weight.grad.dtype == torch.float32 and torch.isfinite(act.weight.grad).all()


def saved_bytes(module, x):
    """Bytes autograd keeps for backward of ``module(x)`` (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(kept.values())


@pytest.mark.parametrize("dim", [-1, 1])
def test_keeps_only_input_and_shift_for_backward(dim):
    x = torch.randn(2, 64, 5, 5, requires_grad=True) if dim == 1 else torch.randn(4, 7, 64, requires_grad=True)
    gelu = saved_bytes(nn.GELU(), x)
    raa = saved_bytes(dnrt.RAA(64, channel_dim=dim), x)
    assert gelu == x.numel() * 4
    assert raa == gelu + gelu // 64


def test_wrong_width_is_a_clear_error():
    with pytest.raises(dnrt.DNRTError, match=r"RAA\(6\) expects 6 features along dim -1, got input of shape \(2, 5\)"):
        dnrt.RAA(6)(torch.randn(2, 5))
    with pytest.raises(dnrt.DNRTError, match="unknown RAA base 'tanh'"):
        dnrt.RAA(6, base="tanh")


@pytest.mark.parametrize("mode", [False, "auto"])
def test_one_vector_and_no_second_order(mode):
    """A 1-D input is one feature vector; a double backward is a clear error, not a silent first order."""
    torch.manual_seed(0)
    m = randomised("gelu", "vector", -1, torch.float32)
    x = torch.randn(6, requires_grad=True)
    with kernels.set_fused(mode):
        grads = torch.autograd.grad(m(x).sum(), [x, m.weight, m.bias])
        want = torch.autograd.grad(formula(x, m.weight, m.bias, -1, "gelu", "vector").sum(), [x, m.weight, m.bias])
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        (first,) = torch.autograd.grad(m(x.expand(3, 6)).sum(), x, create_graph=True)  # torch.func.grad does so
        torch.testing.assert_close(first, 3 * grads[0])
        with pytest.raises(RuntimeError, match="dnrt.RAA has no second derivative"):
            first.sum().backward()


TRITON_CHECK = """
import torch
from dnrt.nn.kernels import raa_math, raa_triton
torch.manual_seed(0)
for shape, dim in [((3, 5, 48), -1), ((2, 24, 3, 5), -3), ((7, 33), -1)]:
    for base in ("gelu", "relu"):
        x, g = torch.randn(*shape), torch.randn(*shape)
        w, b = torch.randn(shape[dim]) * 0.3, torch.tensor(0.2)
        y, s = raa_triton.forward(x, w, b, dim, base)
        got = (y,) + raa_triton.backward(g, x, s, w, dim, base)
        y2, s2 = raa_math.forward(x, w, b, dim, base)
        want = (y2,) + raa_math.backward(g, x, s2, w, dim, base)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e.reshape(a.shape), rtol=1e-5, atol=2e-5)
x = torch.randn(5, 20)
x[0, 2], x[1, 1], x[2, 1] = float("inf"), -float("inf"), float("nan")  # docs/method.md §1: NaN rows 0-2
for base in ("gelu", "relu"):
    w, b = torch.linspace(-0.5, 0.5, 20), torch.tensor(0.1)
    for weights in (w, w * 0):
        y, s = raa_triton.forward(x, weights, b, -1, base)
        y2, s2 = raa_math.forward(x, weights, b, -1, base)
        torch.testing.assert_close(y, y2, equal_nan=True)
        assert y[:3].isnan().all() and not y[3:].isnan().any()
print("triton kernels agree")
"""


def test_triton_kernels_in_the_interpreter():
    """The CUDA kernels' code, run by Triton's CPU interpreter against the plain math."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "triton kernels agree" in done.stdout


def wrapped(act):
    return nn.Sequential(OrderedDict(act=act))


@pytest.mark.parametrize("other,found", [
    (dnrt.RAA(6, base="relu"), "RAA(base='relu', shift='vector', channel_dim=-1)"),
    (dnrt.RAA(6, channel_dim=1), "RAA(base='gelu', shift='vector', channel_dim=1)"),
])
def test_a_state_of_another_kind_is_refused(other, found):
    """Same parameter names and shapes, another activation: loading would silently change the model."""
    state = wrapped(other).state_dict()
    with pytest.raises(dnrt.DNRTError, match=rf"^act: the state is of {re.escape(found)}, this module is "
                                             r"RAA\(base='gelu', shift='vector', channel_dim=-1\); build the model"):
        wrapped(dnrt.RAA(6)).load_state_dict(state, strict=False)


def test_a_state_of_the_same_kind_loads_and_round_trips(tmp_path):
    saved = wrapped(randomised("relu", "scalar", 1, torch.float32))
    torch.save(saved.state_dict(), tmp_path / "state.pth")
    loaded = wrapped(dnrt.RAA(6, base="relu", shift="scalar", channel_dim=1))
    loaded.load_state_dict(torch.load(tmp_path / "state.pth", weights_only=True))
    assert loaded.act.bias.item() == saved.act.bias.item() != 0
    assert loaded.act.kind.tolist() == [1, 1, 1]


def test_a_state_saved_before_the_kind_loads_strictly_with_a_warning():
    saved = randomised("gelu", "vector", -1, torch.float32)
    state = saved.state_dict()
    del state["kind"]
    loaded = dnrt.RAA(6)
    with pytest.warns(UserWarning, match=r"RAA: the saved RAA state does not say its kind \(saved by an older dnrt\); "
                                         r"loaded as RAA\(base='gelu', shift='vector', channel_dim=-1\) unchecked"):
        loaded.load_state_dict(state)
    torch.testing.assert_close(loaded.weight, saved.weight)
    with pytest.raises(RuntimeError, match="Missing key"):  # other missing keys still fail strict loading
        dnrt.RAA(6).load_state_dict({"kind": state["weight"].new_tensor([0, 0, -1]).long()})


def test_the_tools_gelu_based_resnet_state_does_not_load_into_a_converted_relu_based_one():
    """The case of issue 10: ``act='raa'`` gives GELU-based RAAs, ``dnrt.convert`` ReLU-based ones, same names."""
    from dnrt.tool.models import create_model

    tool = create_model("resnet32_cifar", num_classes=10, act="raa")
    converted = dnrt.convert(create_model("resnet32_cifar", num_classes=10), torch.randn(1, 3, 32, 32))
    with pytest.raises(dnrt.DNRTError, match=r"^stem\.2: the state is of RAA\(base='gelu', shift='vector', "
                                             r"channel_dim=1\), this module is RAA\(base='relu'"):
        converted.load_state_dict(tool.state_dict())


def test_no_parameter_is_0_d_so_fsdp2_shards_a_converted_model():
    """FSDP2's ``fully_shard`` refuses 0-d parameters; RAA's bias is of shape (1,) in every form."""
    from dnrt.tool.models import create_model

    for name, act in [("vit_tiny_patch4_32", "raa"), ("resnet18_cifar", "raa_relu")]:
        model = create_model(name, num_classes=10, in_chans=3, img_size=16, act=act)
        raas = [m for m in model.modules() if isinstance(m, dnrt.RAA)]
        assert raas and all(p.dim() > 0 for p in model.parameters())
    assert dnrt.RAA(6, shift="scalar").bias.shape == (1,)


FSDP2_CHECK = """
import sys, torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
import dnrt
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
dnrt.convert(model, torch.randn(2, 8))
model[3] = dnrt.RAA(16, shift="scalar")
for module in model:
    fully_shard(module)
fully_shard(model)
model(torch.randn(3, 8)).square().sum().backward()
assert all(torch.isfinite(p.grad.full_tensor()).all() for p in model.parameters())
dist.destroy_process_group()
print("sharded", sum(isinstance(m, dnrt.RAA) for m in model.modules()))
"""


def test_fully_shard_of_a_converted_model_in_a_one_process_group(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")
    done = subprocess.run([sys.executable, "-c", FSDP2_CHECK, str(tmp_path / "store")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sharded 2" in done.stdout


@pytest.mark.parametrize("shift", ["vector", "scalar"])
def test_a_state_with_a_0_d_bias_from_an_older_dnrt_loads_with_equal_outputs(shift):
    """dnrt before FSDP2 support saved the bias 0-d; it loads into today's (1,) bias, also through the tool's
    checkpoint fit check, and computes the same."""
    from dnrt.tool.checkpoint import state_mismatch

    saved = wrapped(randomised("gelu", shift, -1, torch.float32))
    old = saved.state_dict()
    old["act.bias"] = old["act.bias"].reshape(())
    loaded = wrapped(dnrt.RAA(6, shift=shift))
    assert state_mismatch(loaded.state_dict(), old) is None
    loaded.load_state_dict(old)
    assert loaded.act.bias.shape == (1,) and old["act.bias"].dim() == 0
    x = torch.randn(4, 6)
    torch.testing.assert_close(loaded(x), saved(x), rtol=0, atol=0)
