"""The benchmark scripts: their baselines compute what the authors compute, each script's --dry-run runs, and
benchmarks/gpu.sh runs its steps with the right commands and reports each one's outcome in summary.md."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dnrt
from dnrt.tool import profile

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    """The benchmarks folder importable, as the scripts import each other; dynamo's caches cleared after."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import authors
    yield authors
    torch._dynamo.reset()


@pytest.mark.parametrize("channel_dim,shape", [(-1, (3, 5, 6)), (1, (2, 6, 3, 4))])
def test_authors_raa_equals_the_formula_with_the_same_parameters(bench, channel_dim, shape):
    torch.manual_seed(0)
    raa = dnrt.RAA(shape[channel_dim], channel_dim=channel_dim)
    with torch.no_grad():
        raa.weight.normal_(0, 0.5)
        raa.bias.fill_(0.3)
    x = torch.randn(*shape, dtype=torch.float64)
    w, b = raa.weight.double(), raa.bias.double()
    s = torch.tensordot(x.movedim(channel_dim, -1), w, dims=1).unsqueeze(-1) + b
    want = (x.movedim(channel_dim, -1) * 0.5 * (1 + torch.erf((x.movedim(channel_dim, -1) + s) / 2 ** 0.5)))
    got = bench.AuthorsRAA.like(raa).double()(x)
    torch.testing.assert_close(got, want.movedim(-1, channel_dim))


def test_to_authors_raa_replaces_every_raa(bench):
    model = dnrt.convert(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2),
                                             torch.nn.GELU()), torch.zeros(1, 4))
    bench.to_authors_raa(model)
    assert [type(m).__name__ for m in model] == ["Linear", "AuthorsRAA", "Linear", "AuthorsRAA"]
    assert model[1].weight.shape == (1, 8) and model[3].weight.shape == (1, 2)


def test_authors_memory_follows_the_sequential_definition_sample_by_sample(bench):
    memory = bench.AuthorsMemory(3, momentum=0.25)
    r = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    got = memory.update(r, torch.tensor([2, 2, 0, 2]))
    second = 0.75 * np.array([1.0, 2.0]) + 0.25 * np.array([3.0, 4.0])  # class 2: first sets, next blends
    fourth = 0.75 * second + 0.25 * np.array([7.0, 8.0])
    np.testing.assert_allclose(got.numpy(), [[1, 2], second, [5, 6], fourth], rtol=1e-6)
    again = memory.update(torch.tensor([[1.0, 1.0]]), torch.tensor([0]))  # the state carries over to the next batch
    np.testing.assert_allclose(again.numpy(), [0.75 * np.array([5.0, 6.0]) + 0.25], rtol=1e-6)
    assert memory.counts == [2, 0, 3]


def test_authors_memory_matches_response_memory(bench):
    torch.manual_seed(0)
    ours, theirs = dnrt.ResponseMemory(5, 4, momentum=0.1), bench.AuthorsMemory(5, momentum=0.1)
    for _ in range(3):
        r, y = torch.randn(16, 4), torch.randint(0, 5, (16,))
        torch.testing.assert_close(theirs.update(r, y), ours(r, y))


def test_authors_arr_is_reference_layer_weighting_on_mixed_widths(bench):
    """timm's ResNet-18 taps act1 and layer1 (width 64) and layers 2-4 (128, 256, 512): the authors' ARR averages
    over widths, which dnrt.ARR does with layer_weighting='reference' and not by default."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=5)
    ours = {w: dnrt.ARR(model, 5, layer_weighting=w, weight=10.0) for w in ("paper", "reference")}
    theirs = bench.AuthorsARR(model, 5, weight=10.0)
    assert ours["paper"].memory.mean.shape[1] == 64 + 64 + 128 + 256 + 512
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
        model(x)
        got = {w: arr.loss(y) for w, arr in ours.items()}
        want = theirs.loss(y)
        torch.testing.assert_close(got["reference"], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got["paper"], want, rtol=1e-3)


def test_ops_dry_run_prints_every_row(bench, capsys, monkeypatch):
    import ops
    monkeypatch.setattr(sys, "argv", ["ops.py", "--device", "cpu", "--dry-run"])
    ops.main()
    out = capsys.readouterr().out
    for row in ("RAA fwd+bwd vs GELU", "RAA(channel_dim=1) vs GELU, NCHW", "bytes kept for backward",
                "memory update, 2 × 4, vs the authors' loop", "memory update, 1 × 8, vs the authors' loop",
                "torch.compile(fullgraph=True)", "the step compiled without fullgraph"):
        assert f"| {row}" in out
    assert "authors' RAA (plain autograd)" in out and "per-sample Python loop" not in out


def test_train_step_dry_run_times_every_kind_eager_and_compiled(bench, capsys, monkeypatch):
    import train_step
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--device", "cpu", "--dry-run", "--compile"])
    train_step.main()
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith(("| eager",
                                                                                                    "| compiled"))]
    kinds = ["GELU", "RAA", "RAA + ARR", "authors' RAA + ARR"]
    assert [(row[0], row[1]) for row in rows] == [("| eager", k) for k in kinds] + [("| compiled (default)", k)
                                                                                     for k in kinds]
    assert rows[0][3] == rows[4][3] == "1.000 (1.000–1.000)"  # each mode against its own GELU
    assert all(row[-1] == "n/a |" for row in rows)  # no profiler counts on the CPU


@pytest.mark.parametrize("mode,passed", [("default", None), ("reduce-overhead", "reduce-overhead")])
def test_profile_compile_adds_a_compiled_latency_column(monkeypatch, mode, passed):
    modes = []

    def fake_compile(model, mode=None):  # the wiring, not inductor, is under test
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    result = profile.profile_model("mlp", img_size=8, num_classes=10, min_run_time=0.01, compile_mode=mode)
    assert modes == [passed, passed]  # the original model and the DNRT one
    assert result["compile"] == mode
    assert all(row["compiled_latency_ms"] > 0 for row in result["rows"].values())
    header = profile.format_profile(result).splitlines()[0]
    assert header.endswith(f"| compiled latency (ms, {mode}) |")


FAKE_PYTHON = """\
#!/usr/bin/env bash
# stands in for python: records each command; the import check reads its script from stdin
printf '%s\\n' "$*" >> "$CALLS"
[ "$1" = - ] && { cat > /dev/null; echo "python fake"; exit 0; }
case "$*" in *ops.py*) echo "ops figures"; exit "${OPS_RC:-0}" ;; esac
echo "output of $*"
"""


def _gpu_sh(tmp_path, *args, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), *args, str(tmp_path / "out")],
                         env={**os.environ, "PYTHON": str(fake), "CALLS": str(calls), **env},
                         capture_output=True, text=True, timeout=60)
    summary = (tmp_path / "out" / "summary.md").read_text()
    return run, summary, calls.read_text().splitlines()[1:]  # after the import check


STEPS = ["test_cuda", "ops", "vit_eager_compiled", "profile_batch1", "vit_cudagraphs", "resnet18_cifar",
         "profile_batch128"]


def test_gpu_sh_runs_every_step_on_cuda_and_summarises(tmp_path):
    run, summary, calls = _gpu_sh(tmp_path)
    assert run.returncode == 0, run.stderr
    for step in STEPS:
        assert f"| {step} | passed |" in summary
    assert "## ops: passed\n\n```\nops figures\n```" in summary
    assert calls[0] == "-m pytest -q -ra tests/test_cuda.py"
    assert calls[1] == "benchmarks/ops.py --device cuda"
    assert calls[2].endswith("train_step.py --device cuda --rounds 5 --min-time 0.3 --batch-size 256 --compile")
    assert calls[4].endswith("--batch-size 256 --compile-mode reduce-overhead --no-eager")
    assert calls[5].endswith("--model resnet18_cifar --batch-size 256 --kinds gelu raa_arr --compile")
    assert calls[3].endswith("profile -m vit_tiny_patch16_224 --device cuda --min-time 0.5 --batch-size 1 --compile")
    assert calls[6].endswith("--device cuda --min-time 0.5 --batch-size 128 --compile")
    assert (tmp_path / "out" / "full.log").read_text().count("### ") == len(STEPS)


def test_gpu_sh_reports_a_failed_step_and_exits_non_zero(tmp_path):
    run, summary, _ = _gpu_sh(tmp_path, OPS_RC="3")
    assert run.returncode == 1
    assert "| ops | failed (exit 3) |" in summary and "| test_cuda | passed |" in summary
    assert "| profile_batch128 | passed |" in summary  # one failure does not stop the later steps


def test_gpu_sh_skips_steps_past_its_budget(tmp_path):
    run, summary, calls = _gpu_sh(tmp_path, GPU_SH_BUDGET="10")
    assert run.returncode == 1 and calls == []
    assert summary.count("skipped (budget of 10 s spent)") == len(STEPS)


def test_gpu_sh_dry_run_passes_the_cpu_flags(tmp_path):
    run, summary, calls = _gpu_sh(tmp_path, "--dry-run")
    assert run.returncode == 0 and "(dry run on the CPU" in summary
    assert calls[1] == "benchmarks/ops.py --device cpu --dry-run"
    assert all("--dry-run" in call for call in calls if "train_step.py" in call)
    assert all("--device cpu --img-size 32" in call for call in calls if " profile " in call)


def test_gpu_sh_refuses_an_unknown_option(tmp_path):
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--fast"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip() == "error: unknown option --fast (see --help)"
