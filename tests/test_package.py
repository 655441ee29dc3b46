"""The package as installed: `import dnrt` stays light, and the wheel holds what an install outside a clone needs."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL_LIBRARIES = ("timm", "torchvision", "sklearn", "matplotlib", "tensorboard")


def python(code: str, cwd: Path, path: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(path)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout


def test_import_dnrt_loads_no_tool_library(tmp_path):
    code = ("import json, sys, torch, dnrt\n"
            "model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU())\n"
            "dnrt.convert(model, torch.randn(2, 4))\n"
            f"print(json.dumps([type(model[1]).__name__] + [m for m in {TOOL_LIBRARIES!r} if m in sys.modules]))")
    assert json.loads(python(code, tmp_path, REPO)) == ["RAA"]


def test_convert_finds_timm_gelu_once_timm_is_loaded():
    import torch
    from timm.layers.activations import GELU

    import dnrt

    model = dnrt.convert(torch.nn.Sequential(torch.nn.Linear(4, 8), GELU()), torch.randn(2, 4))
    assert isinstance(model[1], dnrt.RAA)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the source tree (so the clone gets no build/ or egg-info)."""
    work = tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "data", "*.egg-info", "__pycache__",
                                  ".pytest_cache")
    shutil.copytree(REPO, work / "src", symlinks=True, ignore=skip)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(work / "dist"), str(work / "src")], check=True, capture_output=True)
    (built,) = (work / "dist").glob("dnrt-*.whl")
    return built


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    expected = {"dnrt/py.typed", "dnrt/__main__.py", "dnrt/tool/paper_results.json", "dnrt/nn/kernels/raa_cpu.cpp",
                f"{info}/licenses/LICENSE", f"{info}/entry_points.txt"}
    expected |= {f"dnrt/configs/{name}.py" for name in ("_base_", "dnrt", "gelu", "relu", "quickstart",
                                                        "quickstart_gelu")}
    assert expected <= names
    assert not [n for n in names if n.startswith(("configs/", "tests/", "benchmarks/")) or "/paper/" in n]
    read = zipfile.ZipFile(wheel).read
    assert read(f"{info}/licenses/LICENSE").decode().split()[:3] == ["Apache", "License", "Version"]
    metadata = read(f"{info}/METADATA").decode()
    for line in ("License-Expression: Apache-2.0", "Requires-Python: >=3.9", "Classifier: Typing :: Typed",
                 "Classifier: Programming Language :: Python :: 3.11", "Project-URL: Homepage, ",
                 "Project-URL: Issues, "):
        assert line in metadata
    assert "dnrt = dnrt.tool.cli:main" in read(f"{info}/entry_points.txt").decode()


def test_installed_wheel_finds_its_configs_from_any_folder(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import dnrt\nfrom dnrt.tool.config import load_config\nfrom dnrt.tool.configs import BUILTIN\n"
            "cfg = load_config('quickstart')\nprint(dnrt.__file__, BUILTIN, cfg['act'], cfg['criterion'])")
    module, builtin, act, criterion = python(code, elsewhere, site).split()
    assert Path(module).is_relative_to(site) and Path(builtin) == site / "dnrt" / "configs"
    assert (act, criterion) == ("raa", "arr")


def test_configs_by_name_and_by_path(tmp_path, monkeypatch, capsys):
    from dnrt.errors import DNRTError
    from dnrt.tool.cli import main
    from dnrt.tool.config import load_config
    from dnrt.tool.configs import BUILTIN

    monkeypatch.chdir(tmp_path)
    assert load_config("quickstart") == load_config("quickstart.py") == load_config(str(REPO / "configs/quickstart.py"))
    assert load_config("dnrt")["arr_loss_coef"] == 20.0  # its `from _base_ import *` finds the built-in _base_
    (tmp_path / "quickstart.py").write_text("epochs = 3\n")  # a file of that name wins over the built-in
    assert load_config("quickstart.py")["epochs"] == 3
    with pytest.raises(DNRTError, match=r"config file not found: configs/quickstart\.py \(built-in configs, by "
                                        r"name from any folder: dnrt, gelu, quickstart, quickstart_gelu, relu"):
        load_config("configs/quickstart.py")
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing[:-1]] == ["dnrt", "gelu", "quickstart", "quickstart_gelu", "relu"]
    assert main(["configs", "_base_"]) == 0
    assert capsys.readouterr().out == (BUILTIN / "_base_.py").read_text()
    assert main(["configs", "nothing"]) == 1
    assert "error: no built-in config 'nothing'" in capsys.readouterr().err


def test_clone_configs_are_the_builtin_files():
    """configs/*.py in a clone are links to the package's files, so both spellings run the same config."""
    from dnrt.tool.configs import BUILTIN

    linked = sorted(p for p in (REPO / "configs").glob("*.py"))
    assert [p.name for p in linked] == sorted(p.name for p in BUILTIN.glob("*.py"))
    assert all(p.resolve() == (BUILTIN / p.name).resolve() for p in linked)
