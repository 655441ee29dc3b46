"""Activations by name and GDN against its formula."""
import pytest
import torch
from torch import nn

import dnrt


@pytest.mark.parametrize("name,kind", [
    ("relu", nn.ReLU), ("gelu", nn.GELU), ("softplus", nn.Softplus), ("elu", nn.ELU), ("selu", nn.SELU),
    ("silu", nn.SiLU), ("gdn", dnrt.GDN), ("raa", dnrt.RAA), ("raa_relu", dnrt.RAA),
])
def test_every_paper_activation_by_name(name, kind):
    act = dnrt.make_activation(name, num_features=4, channel_dim=1)
    assert isinstance(act, kind)
    assert act(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)
    assert sorted(dnrt.ACTIVATIONS) == sorted(["relu", "gelu", "softplus", "elu", "selu", "silu", "gdn", "raa",
                                               "raa_relu"])


def test_raa_relu_is_relu_based():
    act = dnrt.make_activation("raa_relu", num_features=4)
    assert act.base == "relu"
    x = torch.randn(3, 4)
    torch.testing.assert_close(act(x), torch.relu(x))


def test_unknown_name_lists_the_closest_and_all():
    with pytest.raises(dnrt.DNRTError, match=r"unknown activation 'gleu' \(did you mean gelu\?\); known: relu, gelu"):
        dnrt.make_activation("gleu")
    with pytest.raises(dnrt.DNRTError, match="activation 'raa' has parameters: pass num_features"):
        dnrt.make_activation("raa")


@pytest.mark.parametrize("dim,shape", [(-1, (5, 4)), (1, (2, 4, 3, 3))])
def test_gdn_formula(dim, shape):
    torch.manual_seed(0)
    gdn = dnrt.GDN(4, channel_dim=dim)
    with torch.no_grad():
        gdn.beta_sqrt.uniform_(0.5, 1.5)
        gdn.gamma_sqrt.uniform_(0.0, 0.5)
    x = torch.randn(*shape)
    beta, gamma = gdn.beta.detach(), gdn.gamma.detach()
    xm = x.movedim(dim, -1)
    want = torch.empty_like(xm)
    for i in range(4):
        want[..., i] = xm[..., i] / torch.sqrt(beta[i] + sum(gamma[i, j] * xm[..., j] ** 2 for j in range(4)))
    torch.testing.assert_close(gdn(x), want.movedim(-1, dim))


def test_gdn_parameters_stay_positive():
    gdn = dnrt.GDN(3)
    with torch.no_grad():
        gdn.beta_sqrt.fill_(-5.0)
        gdn.gamma_sqrt.fill_(-5.0)
    assert (gdn.beta > 0).all() and (gdn.gamma >= 0).all()
    torch.testing.assert_close(dnrt.GDN(3).gamma, 0.1 * torch.eye(3))
