"""ResponseMemory and its op against the sequential definition of docs/method.md §3, §4 (a loop over samples)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dnrt
from dnrt.nn.kernels import memory_op


class Sequential:
    """The definition literally: one sample at a time, in batch order, in ``dtype``."""

    def __init__(self, k, d, momentum, order, dtype=torch.float64):
        self.mean, self.seen, self.m, self.order = torch.zeros(k, d, dtype=dtype), [False] * k, momentum, order

    def __call__(self, x, y):
        before = self.mean.clone(), list(self.seen)
        out = []
        for xi, yi in zip(x.to(self.mean.dtype), y.tolist()):
            self.mean[yi] = xi if not self.seen[yi] else (1 - self.m) * self.mean[yi] + self.m * xi
            self.seen[yi] = True
            if self.order == "reference":
                out.append(self.mean[yi].clone())
            else:
                out.append(before[0][yi] if before[1][yi] else xi)
        return torch.stack(out)


def assert_rel_close(got, want, rel=1e-5):
    err = (got.double() - want).abs().max() / want.abs().max().clamp(min=1e-12)
    assert err <= rel, f"relative error {err:.2e}"


def updater(kernel, memory):
    """``memory`` itself (the registered op), or the plain-PyTorch fallback on its buffers."""
    if kernel == "op":
        return memory
    reference = memory.order == "reference"
    return lambda x, y: memory_op.sequential_update(memory.mean, memory.count, x, y, memory.momentum, reference)


@pytest.mark.parametrize("kernel", ["op", "fallback"])
@pytest.mark.parametrize("order", ["reference", "paper"])
@pytest.mark.parametrize("momentum", [0.01, 0.1, 0.5, 1.0])
def test_matches_sequential_exactly_over_many_batches(order, momentum, kernel):
    """Random class mixes, classes first seen in later batches, some never: equal to the float32 loop."""
    g = torch.Generator().manual_seed(1)
    memory = dnrt.ResponseMemory(9, 37, momentum, order)
    update = updater(kernel, memory)
    exact, ref = Sequential(9, 37, momentum, order, torch.float32), Sequential(9, 37, momentum, order)
    seen = []
    for batch, classes in [(1, 7), (2, 7), (33, 3), (64, 7), (17, 8), (128, 8)]:
        x, y = torch.randn(batch, 37, generator=g), torch.randint(0, classes, (batch,), generator=g)
        out = update(x, y)
        assert torch.equal(out, exact(x, y))
        assert torch.equal(memory.mean, exact.mean)
        assert_rel_close(out, ref(x, y))
        seen.append(y)
    assert memory.count.tolist() == torch.bincount(torch.cat(seen), minlength=9).tolist()
    assert memory.count[8] == 0 and not memory.mean[8].any()


@pytest.mark.parametrize("order", ["reference", "paper"])
@pytest.mark.parametrize("momentum", [0.01, 0.1, 0.999, 1.0])
def test_one_class_of_4096_samples(momentum, order):
    g = torch.Generator().manual_seed(2)
    memory = dnrt.ResponseMemory(3, 8, momentum, order)
    exact, ref = Sequential(3, 8, momentum, order, torch.float32), Sequential(3, 8, momentum, order)
    for _ in range(2):
        x, y = torch.randn(4096, 8, generator=g) + 3, torch.full((4096,), 2)
        out = memory(x, y)
        assert torch.equal(out, exact(x, y))
        assert_rel_close(out, ref(x, y))
    assert torch.equal(memory.mean, exact.mean)
    assert memory.count.tolist() == [0, 0, 2 * 4096]


def test_threads_split_the_columns_and_stay_exact():
    """1024 × 2100 is over twice the kernel's 2^20 elements per thread, so two threads take column ranges."""
    g = torch.Generator().manual_seed(6)
    memory, exact = dnrt.ResponseMemory(4, 2100, 0.2), Sequential(4, 2100, 0.2, "reference", torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(2):
            x, y = torch.randn(1024, 2100, generator=g), torch.randint(0, 4, (1024,), generator=g)
            assert torch.equal(memory(x, y), exact(x, y))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(memory.mean, exact.mean)


def test_an_infinite_first_sample_gives_what_the_definition_gives():
    """The first sample sets the mean (no lerp from zero, which turns inf into NaN)."""
    x = torch.tensor([[float("inf"), 1.0], [2.0, float("-inf")], [3.0, 4.0], [5.0, 6.0]])
    y = torch.tensor([0, 1, 0, 1])
    for order in ["reference", "paper"]:
        memory, exact = dnrt.ResponseMemory(2, 2, 0.5, order), Sequential(2, 2, 0.5, order, torch.float32)
        out, want = memory(x, y), exact(x, y)
        assert torch.equal(out, want) and torch.equal(memory.mean, exact.mean)
        assert memory.mean.tolist() == [[float("inf"), 2.5], [3.5, float("-inf")]]


def test_float64_memory_is_exact_to_float64():
    g = torch.Generator().manual_seed(4)
    memory, exact = dnrt.ResponseMemory(5, 4, 0.1).double(), Sequential(5, 4, 0.1, "reference")
    for batch in [7, 40, 3]:
        x, y = torch.randn(batch, 4, generator=g, dtype=torch.float64), torch.randint(0, 5, (batch,), generator=g)
        assert torch.equal(memory(x, y), exact(x, y))
    assert torch.equal(memory.mean, exact.mean)


def test_a_memory_in_another_dtype_is_refused():
    with pytest.raises(dnrt.DNRTError, match="float32 or float64, not torch.bfloat16"):
        dnrt.ResponseMemory(3, 4).bfloat16()(torch.randn(2, 4), torch.tensor([0, 1]))


def test_the_cpu_kernel_runs_by_default():
    dnrt.ResponseMemory(2, 3)(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
    if not memory_op.cpu_available():
        pytest.skip("no C++ compiler here")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dnrt::memory_update", "CPU")


@pytest.mark.parametrize("order", ["reference", "paper"])
def test_opcheck(order):
    mean, count = torch.randn(4, 19), torch.tensor([0, 3, 0, 1])
    x, y = torch.randn(10, 19), torch.tensor([0, 1, 0, 2, 1, 0, 3, 3, 2, 0])
    torch.library.opcheck(torch.ops.dnrt.memory_update.default, (mean, count, x, y, 0.1, order == "reference"))


FALLBACK_CHECK = """
import sys, warnings
import torch
sys.path.insert(0, {tests!r})
import dnrt
from test_memory import Sequential
g = torch.Generator().manual_seed(5)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for order in ["reference", "paper"]:
        memory, exact = dnrt.ResponseMemory(6, 5, 0.3, order), Sequential(6, 5, 0.3, order, torch.float32)
        for batch in [9, 40]:
            x, y = torch.randn(batch, 5, generator=g), torch.randint(0, 6, (batch,), generator=g)
            assert torch.equal(memory(x, y), exact(x, y)) and torch.equal(memory.mean, exact.mean)
        torch.library.opcheck(torch.ops.dnrt.memory_update.default, (memory.mean, memory.count, x, y, 0.3, True))
print("fallback agrees;", [str(w.message) for w in caught if "memory kernel" in str(w.message)][0])
"""


def test_without_a_compiler_the_fallback_runs_and_warns(tmp_path):
    code = FALLBACK_CHECK.format(tests=os.path.dirname(__file__))
    env = dict(os.environ, CXX=str(tmp_path / "no-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fallback agrees; dnrt: the CPU memory kernel did not build" in done.stdout
    assert "using a sequential loop instead" in done.stdout


TRITON_CHECK = """
import sys
import torch
sys.path.insert(0, {tests!r})
from dnrt.nn.kernels import memory_triton
from test_memory import Sequential
g = torch.Generator().manual_seed(1)
for order in ["reference", "paper"]:
    for momentum, k, batches in [(0.1, 5, (1, 40)), (1.0, 4, (12,)), (1e-3, 2, (150,))]:
        exact, mean = Sequential(k, 300, momentum, order, torch.float32), torch.zeros(k, 300)
        count, want = torch.zeros(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)
        for batch in batches:
            x, y = (torch.randn(300, batch, generator=g).t() + 2,  # transposed: dense, not contiguous
                    torch.randint(0, k, (batch,), generator=g))
            out = memory_triton.memory_update(mean, count, x, y, momentum, order == "reference")
            want += torch.bincount(y, minlength=k)
            assert torch.equal(out, exact(x, y)) and torch.equal(mean, exact.mean) and torch.equal(count, want)
print("memory kernel agrees")
"""


def test_triton_kernel_in_the_interpreter():
    """The CUDA kernel's code, run by Triton's CPU interpreter against the sequential definition."""
    pytest.importorskip("triton")
    code = TRITON_CHECK.format(tests=os.path.dirname(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "memory kernel agrees" in done.stdout


@pytest.mark.parametrize("order", ["reference", "paper"])
def test_an_unseen_class_ignores_whatever_its_mean_buffer_holds(order):
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 2, 1, 0])
    fresh, loaded = dnrt.ResponseMemory(3, 3, order=order), dnrt.ResponseMemory(3, 3, order=order)
    loaded.mean.fill_(float("nan"))
    torch.testing.assert_close(loaded.eval()(x, y), x)
    torch.testing.assert_close(loaded.train()(x, y), fresh(x, y))
    torch.testing.assert_close(loaded.mean, fresh.mean)


def test_counts_classes_and_orders_agree_on_memory():
    x, y = torch.randn(50, 4), torch.randint(0, 6, (50,))
    a, b = dnrt.ResponseMemory(6, 4, order="reference"), dnrt.ResponseMemory(6, 4, order="paper")
    a(x, y), b(x, y)
    torch.testing.assert_close(a.mean, b.mean)
    assert a.count.tolist() == torch.bincount(y, minlength=6).tolist()


def test_first_sample_of_a_class_has_zero_loss_in_both_orders():
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
    for order in ["reference", "paper"]:
        out = dnrt.ResponseMemory(2, 4, order=order)(x, y)
        torch.testing.assert_close(out[:2], x[:2])


def test_eval_reads_without_writing_and_state_round_trips():
    memory = dnrt.ResponseMemory(4, 3)
    memory(torch.randn(10, 3), torch.randint(0, 4, (10,)))
    state = {k: v.clone() for k, v in memory.state_dict().items()}
    memory.eval()
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    out = memory(x, y)
    assert all(torch.equal(v, memory.state_dict()[k]) for k, v in state.items())
    seen = state["count"][y] > 0
    torch.testing.assert_close(out[seen], state["mean"][y][seen])
    restored = dnrt.ResponseMemory(4, 3)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(x, y), memory.train()(x, y))
    torch.testing.assert_close(restored.mean, memory.mean)


def test_empty_batch_changes_nothing():
    memory = dnrt.ResponseMemory(4, 3)
    memory(torch.randn(5, 3), torch.tensor([0, 1, 0, 2, 1]))
    state = {k: v.clone() for k, v in memory.state_dict().items()}
    assert memory(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)).shape == (0, 3)
    assert all(torch.equal(v, memory.state_dict()[k]) for k, v in state.items())


def test_output_is_detached():
    x = torch.randn(4, 3, requires_grad=True)
    assert not dnrt.ResponseMemory(2, 3)(x, torch.tensor([0, 1, 0, 1])).requires_grad


@pytest.mark.parametrize("targets,message", [
    (torch.tensor([0, 5]), r"targets must lie in \[0, 3\], got values in \[0, 5\]"),
    (torch.tensor([0, -1]), r"targets must lie in \[0, 3\]"),
    (torch.tensor([0.0, 1.0]), "integer class targets"),
    (torch.tensor([0, 1, 2]), r"targets of shape \[2\]"),
])
def test_bad_targets(targets, message):
    with pytest.raises(dnrt.DNRTError, match=message):
        dnrt.ResponseMemory(4, 3)(torch.randn(2, 3), targets)


def test_wrong_width_and_bad_options():
    with pytest.raises(dnrt.DNRTError, match=r"responses of shape \[B, 3\], got \(2, 4\)"):
        dnrt.ResponseMemory(4, 3)(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(dnrt.DNRTError, match="momentum must lie in"):
        dnrt.ResponseMemory(4, 3, momentum=0.0)
    with pytest.raises(dnrt.DNRTError, match="unknown ARR order 'eq4'"):
        dnrt.ResponseMemory(4, 3, order="eq4")


def _worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(10)
    batches = [(torch.randn(world, 6, 3, generator=g), torch.randint(0, 4, (world, 6), generator=g)) for _ in range(3)]
    memory = dnrt.ResponseMemory(4, 3)
    outs = [memory(x[rank], y[rank]) for x, y in batches]
    results[rank] = (memory.mean.clone(), torch.stack(outs))
    dist.destroy_process_group()


def test_processes_share_one_memory(tmp_path):
    world = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(world, str(tmp_path / "init"), results), nprocs=world)
        results = dict(results)
    g = torch.Generator().manual_seed(10)
    ref = Sequential(4, 3, 0.1, "reference")
    want = []
    for _ in range(3):
        x, y = torch.randn(world, 6, 3, generator=g), torch.randint(0, 4, (world, 6), generator=g)
        want.append(ref(x.reshape(-1, 3), y.reshape(-1)).reshape(world, 6, 3))
    want = torch.stack(want, dim=1)
    for rank in range(world):
        assert_rel_close(results[rank][0], ref.mean)
        assert_rel_close(results[rank][1], want[rank])
