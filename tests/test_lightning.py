"""examples/lightning_ddp.py: Lightning's DDP on 2 CPU processes keeps equal ARR memories, saves them in its
checkpoint and restores them on resume."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning", reason="needs lightning: pip install -e '.[lightning]'")

ROOT = Path(__file__).resolve().parents[1]


def run_example(out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_ddp.py"), "--out", str(out), *extra],
                          env=env, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_keep_equal_memories_and_a_resume_restores_them(tmp_path):
    out = tmp_path / "run"
    run_example(out)
    first, second = (torch.load(out / f"memory_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert int(first["memory.count"].sum()) == 5 * 2 * 32  # 5 steps, 2 processes, 32 samples each: all gathered
    saved = torch.load(out / "last.ckpt", weights_only=False)["state_dict"]
    for key, value in first.items():
        assert torch.equal(saved[f"arr.{key}"], value), key

    run_example(out, "--resume")
    for r in (0, 1):
        restored = torch.load(out / f"restored_rank{r}.pt", weights_only=True)
        for key in first:
            assert torch.equal(restored[key], first[key]), key
    after = torch.load(out / "memory_rank0.pt", weights_only=True)
    assert int(after["memory.count"].sum()) == 7 * 2 * 32
