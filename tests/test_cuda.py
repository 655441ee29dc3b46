"""CUDA-only checks (skipped without a GPU): fused kernels, their ops, CUDA graphs, AMP, a sync-free memory update,
a training step."""
import pytest
import timm
import torch
from torch import nn

import dnrt
from test_memory import Sequential
from test_raa import formula

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("base", ["gelu", "relu"])
@pytest.mark.parametrize("dim,shape", [(-1, (8, 65, 192)), (1, (4, 96, 7, 7))])
def test_fused_raa_matches_the_formula(base, dim, shape):
    torch.manual_seed(0)
    m = dnrt.RAA(shape[dim], base=base, channel_dim=dim).cuda()
    with torch.no_grad():
        m.weight.normal_(0, 0.1)
        m.bias.fill_(0.2)
    x = torch.randn(*shape, device="cuda", requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, m.weight, m.bias], g)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, m.weight, m.bias))
    want = formula(x64, w64, b64, dim, base, "vector")
    want_grads = torch.autograd.grad(want, [x64, w64, b64], g.double())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_of_the_cuda_ops(dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 24, 5, 5, device="cuda", dtype=dtype)
    w, b = torch.randn(24, device="cuda") * 0.3, torch.tensor(0.2, device="cuda")
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    torch.library.opcheck(torch.ops.dnrt.raa_forward.default, (*args, -3, "gelu"))
    y, s = torch.ops.dnrt.raa_forward(x, w, b, -3, "gelu")
    torch.library.opcheck(torch.ops.dnrt.raa_backward.default, (torch.randn_like(y), x, s, w, -3, "gelu"))


def test_a_cuda_graph_captures_forward_and_backward_without_host_sync():
    torch.manual_seed(0)
    m = dnrt.RAA(64).cuda()
    with torch.no_grad():
        m.weight.normal_(0, 0.1)
        m.bias.fill_(0.2)
    static_x = torch.randn(8, 10, 64, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(side):
            for _ in range(2):
                m(static_x).square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    m.zero_grad(set_to_none=True)
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = m(static_x)
        static_y.square().sum().backward()
    new_x = torch.randn(8, 10, 64, device="cuda")
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (new_x, m.weight, m.bias))
    want = formula(x64, w64, b64, -1, "gelu", "vector")
    want_grads = torch.autograd.grad(want.square().sum(), [x64, w64, b64])
    torch.testing.assert_close(static_y.double(), want, rtol=1e-5, atol=1e-5)
    for got, ref in zip([static_x.grad, m.weight.grad, m.bias.grad], want_grads):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast(dtype):
    torch.manual_seed(0)
    layer, act = nn.Linear(64, 128).cuda(), dnrt.RAA(128).cuda()
    with torch.no_grad():
        act.weight.normal_(0, 0.05)
    x = torch.randn(16, 10, 64, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        h = layer(x)
        y = act(h)
    assert y.dtype == dtype
    want = formula(h.double(), act.weight.double(), act.bias.double(), -1, "gelu", "vector")
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)
    y.float().square().mean().backward()
    assert act.weight.grad.dtype == torch.float32 and torch.isfinite(act.weight.grad).all()
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("order", ["reference", "paper"])
def test_memory_update_equals_sequential_without_host_sync(order):
    """The Triton kernel, two column blocks wide, bit for bit the float32 loop (multiply-adds are not fused)."""
    g = torch.Generator().manual_seed(3)
    memory, exact = dnrt.ResponseMemory(10, 300, order=order).cuda(), Sequential(10, 300, 0.1, order, torch.float32)
    batches = [(torch.randn(256, 300, generator=g), torch.randint(0, 10, (256,), generator=g)) for _ in range(4)]
    cuda_batches = [(x.cuda(), y.cuda()) for x, y in batches]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [memory(x, y) for x, y in cuda_batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (x, y), out in zip(batches, outs):
        assert torch.equal(out.cpu(), exact(x, y))
    assert torch.equal(memory.mean.cpu(), exact.mean)
    assert memory.count.cpu().tolist() == torch.bincount(torch.cat([y for _, y in batches]), minlength=10).tolist()


def test_memory_update_is_captured_by_a_cuda_graph():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 40, generator=g), torch.randint(0, 5, (64,), generator=g)
    memory, exact = dnrt.ResponseMemory(5, 40).cuda(), Sequential(5, 40, 0.1, "reference", torch.float32)
    static_x, static_y = x.cuda(), y.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        memory(static_x, static_y)  # warm-up: builds the kernel and updates the memory once
    torch.cuda.current_stream().wait_stream(side)
    exact(x, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = memory(static_x, static_y)
    for _ in range(2):
        graph.replay()
        want = exact(x, y)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), want) and torch.equal(memory.mean.cpu(), exact.mean)
    assert int(memory.count.sum()) == 3 * 64


def test_memory_opcheck_on_cuda():
    mean, count = torch.randn(4, 19, device="cuda"), torch.tensor([0, 3, 0, 1], device="cuda")
    x, y = torch.randn(10, 19, device="cuda"), torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 2, 0], device="cuda")
    for reference in (True, False):
        torch.library.opcheck(torch.ops.dnrt.memory_update.default, (mean, count, x, y, 0.1, reference))


def test_training_step_with_amp_and_compile():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, num_classes=10).cuda()
    x, y = torch.randn(32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    dnrt.convert(model, x[:1])
    arr = dnrt.ARR(model, 10, weight=10.0)
    scaler = torch.amp.GradScaler()
    opt = torch.optim.AdamW(list(model.parameters()), lr=1e-3)
    compiled = torch.compile(model)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(compiled(x), y) + arr.loss(y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert torch.isfinite(loss)
    assert model.blocks[0].mlp.act.weight.abs().sum() > 0
    assert int(arr.memory.count.sum()) == 3 * 32


def _syncs_in_one_epoch(batches: int, optimizer_class) -> int:
    """CUDA synchronisations during dnrt.tool.train.train_one_epoch over `batches` GPU batches (print_freq 100)."""
    import warnings

    from dnrt.tool.train import make_loss, train_one_epoch

    class Schedule:
        def step_update(self, num_updates):
            pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10)).cuda()
    optimizer = optimizer_class(model.parameters(), lr=0.1)
    loader = [(torch.randn(8, 1, 8, 8, device="cuda"), torch.randint(0, 10, (8,), device="cuda"))
              for _ in range(batches)]
    loss_fn = make_loss(model, None, nn.CrossEntropyLoss(), False)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(model, None, loss_fn, optimizer, Schedule(), scaler,
                            lambda: torch.autocast("cuda", enabled=False), loader, torch.device("cuda"), 0,
                            {"clip_max_norm": 1.0, "print_freq": 100})
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
def test_training_loop_syncs_per_read_not_per_step(optimizer_class):
    """The non-finite checks and the loss sums stay on the GPU: 2 or 12 steps cost the same synchronisations."""
    assert _syncs_in_one_epoch(2, optimizer_class) == _syncs_in_one_epoch(12, optimizer_class)
