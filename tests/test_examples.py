"""The runnable examples under examples/: the docs' library examples print what the docs say they show; the
integration examples run as a user would, with tiny settings (a few steps)."""
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXPECTED = {
    "raa.py": ["fresh RAA is GELU: True", "gradients of w and b: (64,) (1,)", "plain PyTorch agrees: True",
               "ReLU-based, NCHW: (8, 32, 14, 14)", "by name: RAA(32, base='relu', shift='vector', channel_dim=1)"],
    "convert.py": ["9 RAA modules, e.g. relu: RAA(64, base='relu', shift='vector', channel_dim=1)",
                   "outputs unchanged: True", "stem activation: ELU(alpha=1.0)"],
    "arr.py": ["tapped: ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.3']", "memory: (10, 256) classes seen: 10"],
}


# examples run by a test in another file: that file
ELSEWHERE = {"lightning_ddp.py": "test_lightning.py"}


def test_every_example_is_tested():
    run_here = set(re.findall(r'run\("([\w.]+)"', Path(__file__).read_text()))  # the integration examples below
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted({*EXPECTED, *run_here, *ELSEWHERE})
    for name, test_file in ELSEWHERE.items():
        assert f'"{name}"' in (Path(__file__).with_name(test_file)).read_text(), (name, test_file)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs_and_prints_what_the_docs_say(name, capsys):
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    for line in EXPECTED[name]:
        assert line in lines, (line, lines)
    if name == "arr.py":  # three training steps, each with a finite cross-entropy and an ARR term
        steps = [line for line in lines if line.startswith("step ")]
        assert len(steps) == 3 and all("nan" not in line for line in steps)


ROOT = Path(__file__).resolve().parent.parent


def image_folder(root: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(4):
            pixels = rng.uniform(0, 50, (20, 20, 3)) + np.array(colour)
            Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(root / f"class{c}" / f"{i}.png")
    return root


def run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def saved_converted(folder: Path) -> None:
    """The saved config records the replaced activations; ARR's memory lies beside the weights."""
    entry = json.loads((folder / "config.json").read_text())["dnrt"]
    assert [m["activation"] for m in entry["modules"]] == ["raa", "raa"]
    assert (folder / "arr_state.safetensors").is_file() and (folder / "model.safetensors").is_file()


def test_hf_vit_image_folder(tmp_path):
    pytest.importorskip("transformers")
    data = image_folder(tmp_path / "images")
    out = run("hf_vit_image_folder.py", "--data", str(data), "--max-steps", "2", "--batch-size", "4",
              "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert "replaced 2 with 'raa' (GELUActivation ×2)" in out
    saved_converted(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint-2" / "arr_state.safetensors").is_file()


def test_hf_bert_text(tmp_path):
    pytest.importorskip("transformers")
    out = run("hf_bert_text.py", "--data", str(ROOT / "tests" / "data" / "sentences.tsv"), "--max-steps", "2",
              "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert "replaced 2 with 'raa' (GELUActivation ×2)" in out and "accuracy after:" in out
    saved_converted(tmp_path / "run")


def test_accelerate_saves_and_loads_the_memory(tmp_path):
    pytest.importorskip("accelerate")
    out = run("accelerate_arr.py", "--output-dir", str(tmp_path / "state"), "--steps", "3", cwd=tmp_path)
    assert "after 3 steps" in out and "classes seen 4" in out
    assert "ARR memory restored by load_state: True" in out.splitlines()
    assert any((tmp_path / "state").rglob("custom_checkpoint_0.pkl"))  # ARR's state, saved by save_state


def test_timm_act_layer_lazy_raa(tmp_path):
    out = run("timm_lazy_raa.py", cwd=tmp_path)
    assert "vit_tiny: 2 RAA modules (first RAA(768, base='gelu', shift='vector', channel_dim=-1))" in out
    assert "resnet18: 17 RAA modules (first RAA(64, base='relu', shift='vector', channel_dim=1))" in out


def test_torch_func_per_sample_gradients(tmp_path):
    out = run("torch_func_per_sample.py", cwd=tmp_path)
    assert "1.weight   per-sample gradients (8, 32)" in out and "largest difference" in out
