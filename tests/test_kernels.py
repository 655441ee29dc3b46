"""RAA's kernels and ops: the C++ kernels against the float64 formula (docs/method.md §1, §2), the default choice
and its fallback, ``set_fused``, ``torch.library.opcheck`` of every registered op, compile and export."""
import os
import platform
import shutil
import warnings

import pytest
import torch
from torch import nn

import dnrt
from dnrt.nn import kernels
from test_raa import formula


def cpu_kernels_or_skip():
    """The C++ kernels are built on x86-64 whenever a compiler is there, for the ISA level ATen runs (DEFAULT,
    AVX2, AVX512: ``ATEN_CPU_CAPABILITY`` chooses it); elsewhere skip."""
    from dnrt.nn.kernels import raa_cpu

    if platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("c++") is None:
        pytest.skip("the CPU kernels need an x86-64 CPU and a C++ compiler")
    assert raa_cpu.available()
    return raa_cpu


def test_the_kernels_that_run_are_built_for_the_level_aten_runs():
    """Under ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` (.ci/kernel_levels.sh) ATen runs that level, and so do
    the kernels: each build says which ISA it was compiled for."""
    cpu_kernels_or_skip()
    level = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        assert level == os.environ["ATEN_CPU_CAPABILITY"].upper()
    assert torch.ops.dnrt_cpu.raa_capability() == level


def in_threads(n, fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def reference(x, g, w, b, dim, base):
    """The formula's output and gradients in float64, from the very values the kernels saw."""
    x64, b64 = x.double().requires_grad_(), b.double().requires_grad_()
    w64 = None if w is None else w.double().requires_grad_()
    y64 = formula(x64, w64, b64, dim, base, "scalar" if w is None else "vector")
    inputs = [x64, b64] if w is None else [x64, w64, b64]
    return y64.detach(), torch.autograd.grad(y64, inputs, g.double())


def assert_grads_close(got, want, rtol):
    for a, e in zip(got, want):
        scale = max(1.0, e.abs().max().item())  # parameter gradients sum many terms: error relative to their size
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=rtol * scale)


# Features last (widths with a vector tail, rows narrower than a vector) and channels first (planes with a vector
# tail, 1×1 maps, one odd middle dim); (40000, 3) and (8, 16, 40, 40) split among three threads.
CASES = [((3, 5, 48), -1), ((7, 33), -1), ((1, 20), -1), ((40000, 3), -1), ((64, 768), -1),
         ((2, 6, 3, 5), 1), ((2, 24, 7, 7), 1), ((3, 5, 1, 1), 1), ((8, 16, 40, 40), 1), ((4, 9, 13), -2)]


@pytest.mark.parametrize("shape,dim", CASES)
@pytest.mark.parametrize("base", ["gelu", "relu"])
@pytest.mark.parametrize("shift", ["vector", "scalar"])
def test_cpu_kernels_match_float64_formula(shape, dim, base, shift):
    raa_cpu = cpu_kernels_or_skip()
    torch.manual_seed(0)
    x, g = torch.randn(*shape), torch.randn(*shape)
    w, b = (torch.randn(shape[dim]) * 0.3 if shift == "vector" else None), torch.tensor(0.2)
    y, s, *grads = in_threads(3, lambda: (lambda y, s: (y, s) + raa_cpu.backward(g, x, s, w, dim, base))(
        *raa_cpu.forward(x, w, b, dim, base)))
    want_y, want_grads = reference(x, g, w, b, dim, base)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5)  # a float32 shift of 768 terms: ~1e-6
    want_s = b.double() if w is None else torch.einsum("...c,c->...", x.double().movedim(dim, -1), w.double()) + 0.2
    torch.testing.assert_close(s.double().reshape(want_s.shape), want_s, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads if w is not None else [grads[0], grads[2]], want_grads, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,dim,shift", [((5, 7, 37), -1, "vector"), ((3, 20, 5, 9), 1, "vector"),
                                             ((3, 20, 5, 9), 1, "scalar")])
def test_cpu_kernels_take_16_bit_input_with_float32_arithmetic(dtype, shape, dim, shift):
    """Output and ∂L/∂x in the input's dtype, rounded once from float32; ∂L/∂w and ∂L/∂b in float32."""
    raa_cpu = cpu_kernels_or_skip()
    torch.manual_seed(0)
    x, g = torch.randn(*shape).to(dtype), torch.randn(*shape).to(dtype)
    w, b = (torch.randn(shape[dim]) * 0.3 if shift == "vector" else None), torch.tensor(0.2)
    y, s = raa_cpu.forward(x, w, b, dim, "gelu")
    grad_x, grad_w, grad_b = raa_cpu.backward(g, x, s, w, dim, "gelu")
    assert y.dtype == grad_x.dtype == dtype and s.dtype == grad_b.dtype == torch.float32
    want_y, want_grads = reference(x, g, w, b, dim, "gelu")
    half_ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    torch.testing.assert_close(y.double(), want_y, rtol=half_ulp, atol=1e-6)
    torch.testing.assert_close(grad_x.double(), want_grads[0], rtol=half_ulp, atol=1e-6)
    assert_grads_close([grad_b] if w is None else [grad_w, grad_b], want_grads[1:], 1e-5)


@pytest.mark.parametrize("shape,dim", [((4, 9, 40), -1), ((3, 12, 5, 7), 1)])
@pytest.mark.parametrize("base", ["gelu", "relu"])
def test_cpu_kernels_spread_nan_as_the_formula_does(shape, dim, base):
    """A NaN spoils its own feature vector's output and, as in the formula, parts of the gradients; no more."""
    raa_cpu = cpu_kernels_or_skip()
    torch.manual_seed(0)
    x, g = torch.randn(*shape), torch.randn(*shape)
    x[(1, 2, 3) if dim == -1 else (1, 2, 3, 4)] = float("nan")
    w, b = torch.randn(shape[dim]) * 0.3, torch.tensor(0.2)
    y, s = raa_cpu.forward(x, w, b, dim, base)
    grads = raa_cpu.backward(g, x, s, w, dim, base)
    want_y, want_grads = reference(x, g, w, b, dim, base)
    assert want_y.isnan().sum() == shape[dim] and want_grads[1].isnan().any()
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-5, equal_nan=True)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4, equal_nan=True)


def dnrt_ops_run(module, x):
    """The names of the dnrt ops that a forward and backward of ``module(x)`` runs."""
    with torch.profiler.profile() as prof:
        module(x).square().sum().backward()
    return {e.name for e in prof.events() if e.name.startswith("dnrt")}


CPU_OPS = {"dnrt_cpu::raa_forward", "dnrt_cpu::raa_backward"}  # eagerly without the dnrt:: ops' Python dispatch


def test_default_runs_the_cpu_kernels_and_set_fused_false_plain_pytorch():
    """By default, channels first and tokens, float32 and bfloat16; ``set_fused`` as a call and as a context."""
    cpu_kernels_or_skip()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), dnrt.RAA(8, channel_dim=1), nn.Flatten(2), dnrt.RAA(36, base="relu"))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert dnrt_ops_run(m, x) == CPU_OPS
    assert dnrt_ops_run(m.bfloat16(), x.detach().bfloat16().requires_grad_()) == CPU_OPS
    m.float()
    with dnrt.set_fused(False):
        assert dnrt_ops_run(m, x) == set()
        with dnrt.set_fused("auto"):
            assert dnrt_ops_run(m, x) == CPU_OPS
        assert dnrt_ops_run(m, x) == set()
    assert dnrt_ops_run(m, x) == CPU_OPS
    dnrt.set_fused(False)
    try:
        assert dnrt_ops_run(m, x) == set()
    finally:
        dnrt.set_fused("auto")
    with pytest.raises(ValueError, match="set_fused takes True, False or 'auto', got 'yes'"):
        dnrt.set_fused("yes")


@pytest.mark.parametrize("base,shift,dim", [("gelu", "vector", -1), ("relu", "vector", 1), ("gelu", "scalar", 1)])
def test_default_and_plain_pytorch_agree_through_the_module(base, shift, dim):
    torch.manual_seed(0)
    m = dnrt.RAA(6, base=base, shift=shift, channel_dim=dim)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(3, 6, 4, 5) if dim == 1 else torch.randn(3, 6, 7).transpose(1, 2)  # rows copied first
    x.requires_grad_()
    params = [x] + list(m.parameters())
    y = m(x)
    grads = torch.autograd.grad(y.square().sum(), params)
    with dnrt.set_fused(False):
        y_plain = m(x)
        plain = torch.autograd.grad(y_plain.square().sum(), params)
    torch.testing.assert_close(y, y_plain)
    for a, e in zip(grads, plain):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", ["vector", "scalar"])
def test_a_channels_last_map_runs_as_rows_and_keeps_its_layout(shift):
    cpu_kernels_or_skip()
    torch.manual_seed(0)
    m = dnrt.RAA(12, shift=shift, channel_dim=1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 12, 5, 7).to(memory_format=torch.channels_last).requires_grad_()
    assert dnrt_ops_run(m, x) == CPU_OPS
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    params = [x] + list(m.parameters())
    got = torch.autograd.grad(y, params, y.detach())
    w = m.weight if shift == "vector" else None
    want_y = formula(x, w, m.bias, 1, "gelu", shift)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for a, e in zip(got, torch.autograd.grad(want_y, params, y.detach())):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_a_failed_build_warns_once_and_falls_back_to_plain_pytorch(monkeypatch):
    from dnrt.nn.kernels import build

    def no_compiler(source):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(build, "build", no_compiler)
    monkeypatch.setattr(build, "level", lambda: "AVX2")
    build.load_cpp.cache_clear()
    torch.manual_seed(0)
    m, x = dnrt.RAA(6), torch.randn(4, 6, requires_grad=True)
    with torch.no_grad():
        m.weight.normal_(0, 0.5)
    try:
        with pytest.warns(UserWarning, match=r"^dnrt: the CPU RAA kernels did not build \(Ninja is required to load "
                                             r"C\+\+ extensions\); using plain PyTorch instead$"):
            assert dnrt_ops_run(m, x) == set()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = m(x)
    finally:
        build.load_cpp.cache_clear()
    torch.testing.assert_close(y, formula(x, m.weight, m.bias, -1, "gelu", "vector"))


OPCHECK_CASES = [((3, 5, 6), -1, "gelu", True, torch.float32), ((2, 6, 3, 4), -3, "relu", True, torch.float32),
                 ((2, 6, 3, 4), -3, "gelu", False, torch.float32), ((4, 6), -1, "gelu", True, torch.float64),
                 ((3, 5, 6), -1, "relu", False, torch.bfloat16)]


@pytest.mark.parametrize("shape,dim,base,vector,dtype", OPCHECK_CASES)
def test_opcheck_of_every_registered_op(shape, dim, base, vector, dtype):
    """``dnrt::raa_forward`` with inputs that need gradients (its autograd formula too), ``dnrt::raa_backward``,
    and the C++ ops they call; float64 takes the plain math inside the same ops."""
    torch.manual_seed(0)
    x, g = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
    w, b = (torch.randn(shape[dim], dtype=dtype) * 0.3 if vector else None), torch.tensor(0.2, dtype=dtype)
    grad_args = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    torch.library.opcheck(torch.ops.dnrt.raa_forward.default, (*grad_args, dim, base))
    y, s = torch.ops.dnrt.raa_forward(x, w, b, dim, base)
    torch.library.opcheck(torch.ops.dnrt.raa_backward.default, (g, x, s, w, dim, base))
    if dtype != torch.float64:
        cpu_kernels_or_skip()
        w32 = None if w is None else w.float()
        torch.library.opcheck(torch.ops.dnrt_cpu.raa_forward.default, (x, w32, b, dim, base == "gelu"))
        torch.library.opcheck(torch.ops.dnrt_cpu.raa_backward.default, (g, x, s, w32, dim, base == "gelu"))


class Net(nn.Module):
    """A conv map through a channels-first RAA, its positions as tokens through a ReLU-based scalar-shift RAA."""

    def __init__(self):
        super().__init__()
        self.conv, self.act1 = nn.Conv2d(3, 8, 3), dnrt.RAA(8, channel_dim=1)
        self.fc, self.act2 = nn.Linear(8, 6), dnrt.RAA(6, base="relu", shift="scalar")
        with torch.no_grad():
            for p in (self.act1.weight, self.act1.bias, self.act2.bias):
                p.normal_(0, 0.3)

    def forward(self, x):
        return self.act2(self.fc(self.act1(self.conv(x)).flatten(2).transpose(1, 2)))


def test_compile_fullgraph_traces_the_ops_once_and_equals_eager():
    """One graph, no break, no recompile, the ops in it; aot_eager traces forward and backward as inductor does,
    without inductor's code generation (half a minute here)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for _ in range(2):
        out = compiled(x)
        out.square().sum().backward()
    assert counter.frame_count == 1
    assert counter.graphs[0].code.count("torch.ops.dnrt.raa_forward.default") == 2
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for _ in range(2):
        want = model(x)
        want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-5)


def test_without_custom_ops_a_compiler_traces_the_plain_math(monkeypatch):
    """torch < 2.4 lacks ``torch.library.custom_op``: there the kernels run eagerly only."""
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setattr(kernels, "raa_ops", None)
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8, 8)
    counter = CompileCounterWithBackend("aot_eager")
    out = torch.compile(model, backend=counter, fullgraph=True)(x)
    assert counter.frame_count == 1 and "raa_forward" not in counter.graphs[0].code
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


def test_export_of_a_model_with_raa_runs_as_eager():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))
