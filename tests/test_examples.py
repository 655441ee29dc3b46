"""The runnable examples under examples/, each run as a user would, with tiny settings (a few steps)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("transformers")


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
    data = image_folder(tmp_path / "images")
    out = run("hf_vit_image_folder.py", "--data", str(data), "--max-steps", "2", "--batch-size", "4",
              "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert "replaced 2 with 'raa' (GELUActivation ×2)" in out
    saved_converted(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoint-2" / "arr_state.safetensors").is_file()


def test_hf_bert_text(tmp_path):
    out = run("hf_bert_text.py", "--data", str(ROOT / "tests" / "data" / "sentences.tsv"), "--max-steps", "2",
              "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert "replaced 2 with 'raa' (GELUActivation ×2)" in out and "accuracy after:" in out
    saved_converted(tmp_path / "run")
