"""torch.func through RAA (fused and plain paths): per-sample gradients by vmap(grad(functional_call)) equal a loop
over samples; jacrev equals autograd's Jacobian; a second derivative is still refused."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import dnrt
from test_raa import formula


def model(shift):
    """A converted MLP (GELU → RAA, ReLU → ReLU-based RAA) and a conv map with a channels-first RAA."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GELU(), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    dnrt.convert(net, torch.randn(1, 2, 4, 4))
    if shift == "scalar":
        net[1], net[4] = dnrt.RAA(4, shift="scalar", channel_dim=1), dnrt.RAA(8, base="relu", shift="scalar")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, dnrt.RAA):
                for p in m.parameters():
                    p.normal_(0, 0.3)
    return net


@pytest.mark.parametrize("mode", ["auto", False])
@pytest.mark.parametrize("shift", ["vector", "scalar"])
def test_per_sample_gradients_equal_a_loop_over_samples(mode, shift):
    net = model(shift)
    assert sum(isinstance(m, dnrt.RAA) for m in net.modules()) == 2
    params = {k: v.detach() for k, v in net.named_parameters()}
    x, y = torch.randn(5, 2, 4, 4), torch.tensor([0, 2, 1, 1, 0])

    def loss(params, x, y):
        out = functional_call(net, params, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    with dnrt.set_fused(mode):
        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
        for i in range(len(x)):
            net.zero_grad()
            nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
            for name, p in net.named_parameters():
                torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-5, atol=1e-6)
    raa_names = [k for k in params if k.startswith(("1.", "4."))]
    assert raa_names and all(per_sample[k].abs().sum() > 0 for k in raa_names)


@pytest.mark.parametrize("mode", ["auto", False])
def test_jacrev_equals_the_jacobian_of_the_formula(mode):
    torch.manual_seed(0)
    m = dnrt.RAA(6)
    with torch.no_grad():
        m.weight.normal_(0, 0.5), m.bias.fill_(0.2)
    x = torch.randn(4, 6, dtype=torch.float64)
    m.double()
    with dnrt.set_fused(mode):
        got = jacrev(m)(x)
    want = torch.autograd.functional.jacobian(lambda t: formula(t, m.weight, m.bias, -1, "gelu", "vector"), x)
    torch.testing.assert_close(got, want)


def test_a_nested_grad_is_refused():
    m = dnrt.RAA(6)
    with pytest.raises(RuntimeError, match="dnrt.RAA has no second derivative"):
        grad(lambda t: grad(lambda u: m(u).sum())(t).sum())(torch.randn(6))
