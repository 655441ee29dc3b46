"""The docs' examples (examples/*.py, included in docs/library.md) run and print what the docs say they show."""
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXPECTED = {
    "raa.py": ["fresh RAA is GELU: True", "gradients of w and b: (64,) ()", "plain PyTorch agrees: True",
               "ReLU-based, NCHW: (8, 32, 14, 14)", "by name: RAA(32, base='relu', shift='vector', channel_dim=1)"],
    "convert.py": ["9 RAA modules, e.g. relu: RAA(64, base='relu', shift='vector', channel_dim=1)",
                   "outputs unchanged: True", "stem activation: ELU(alpha=1.0)"],
    "arr.py": ["tapped: ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.3']", "memory: (10, 256) classes seen: 10"],
}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_and_prints_what_the_docs_say(name, capsys):
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    for line in EXPECTED[name]:
        assert line in lines, (line, lines)
    if name == "arr.py":  # three training steps, each with a finite cross-entropy and an ARR term
        steps = [line for line in lines if line.startswith("step ")]
        assert len(steps) == 3 and all("nan" not in line for line in steps)
