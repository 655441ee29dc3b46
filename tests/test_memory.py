"""ResponseMemory against the sequential definition of docs/method.md §3–§4 (a Python loop over samples, float64)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dnrt


class Sequential:
    """docs/method.md §3 literally: one sample at a time, in batch order."""

    def __init__(self, k, d, momentum, order):
        self.mean, self.seen, self.m, self.order = torch.zeros(k, d, dtype=torch.float64), [False] * k, momentum, order

    def __call__(self, x, y):
        before = self.mean.clone(), list(self.seen)
        out = []
        for xi, yi in zip(x.double(), y.tolist()):
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


@pytest.fixture(params=["rank loop", "scan"])
def algorithm(request, monkeypatch):
    """Run a test with each of the memory's two algorithms (the CPU picks by the longest class run)."""
    if request.param == "scan":
        monkeypatch.setattr(dnrt.nn.memory, "RANK_LOOP_MAX_RUN", 0)
    return request.param


@pytest.mark.parametrize("order", ["reference", "paper"])
@pytest.mark.parametrize("momentum", [0.01, 0.1, 0.5, 1.0])
def test_matches_sequential_over_many_batches(order, momentum, algorithm):
    g = torch.Generator().manual_seed(1)
    memory, ref = dnrt.ResponseMemory(7, 5, momentum, order), Sequential(7, 5, momentum, order)
    seen = []
    for batch in [1, 2, 33, 64, 17, 128]:
        x, y = torch.randn(batch, 5, generator=g), torch.randint(0, 7, (batch,), generator=g)
        assert_rel_close(memory(x, y), ref(x, y))
        assert_rel_close(memory.mean, ref.mean)
        seen.append(y)
    assert memory.count.tolist() == torch.bincount(torch.cat(seen), minlength=7).tolist()


@pytest.mark.parametrize("momentum", [1e-3, 0.1, 0.999, 1.0])
@pytest.mark.parametrize("batch", [4096, 64])
def test_long_runs_of_one_class(momentum, batch):
    g = torch.Generator().manual_seed(2)
    memory, ref = dnrt.ResponseMemory(3, 8, momentum), Sequential(3, 8, momentum, "reference")
    for _ in range(2):
        x, y = torch.randn(batch, 8, generator=g) + 3, torch.full((batch,), 2)
        assert_rel_close(memory(x, y), ref(x, y))
    assert_rel_close(memory.mean, ref.mean)
    assert memory.count.tolist() == [0, 0, 2 * batch]


TRITON_CHECK = """
import sys
import torch
sys.path.insert(0, {tests!r})
from dnrt.nn.kernels import memory_triton
from test_memory import Sequential, assert_rel_close
g = torch.Generator().manual_seed(1)
for momentum, k, batches in [(0.1, 7, (1, 33, 200)), (1.0, 7, (64, 5)), (1e-3, 3, (4096,))]:
    ref, mean, seen = Sequential(k, 300, momentum, "reference"), torch.zeros(k, 300), torch.zeros(k, dtype=torch.bool)
    for batch in batches:
        x, y = (torch.randn(300, batch, generator=g).t() + 2,  # transposed: dense, not contiguous
                torch.randint(0, k, (batch,), generator=g) % (2 if batch > 1000 else k))
        after, classes, final = memory_triton.sequential_means(mean, seen, x, y, momentum)
        assert_rel_close(after, ref(x, y))
        mean, seen = mean.index_copy(0, classes, final), seen | (torch.bincount(y, minlength=k) > 0)
        assert_rel_close(mean, ref.mean)
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


def test_float64_memory_is_exact_to_float64(algorithm):
    g = torch.Generator().manual_seed(4)
    memory, ref = dnrt.ResponseMemory(5, 4, 0.1).double(), Sequential(5, 4, 0.1, "reference")
    for batch in [7, 40, 3]:
        x, y = torch.randn(batch, 4, generator=g, dtype=torch.float64), torch.randint(0, 5, (batch,), generator=g)
        assert_rel_close(memory(x, y), ref(x, y), rel=1e-12)
    assert_rel_close(memory.mean, ref.mean, rel=1e-12)


@pytest.mark.parametrize("order", ["reference", "paper"])
def test_an_unseen_class_ignores_whatever_its_mean_buffer_holds(algorithm, order):
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


def test_empty_batch_changes_nothing(algorithm):
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
