"""`dnrt configs`: the built-in configs, shipped inside the package (dnrt/configs/) and found by name from any folder.

`-c quickstart` (or `-c quickstart.py` where no such file lies) runs the built-in one; any other path is a file.
In a clone, configs/*.py are links to the same files, so `python main.py -c configs/quickstart.py` keeps working.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from dnrt.errors import DNRTError

BUILTIN = Path(__file__).resolve().parents[1] / "configs"


def builtin_configs() -> dict[str, Path]:
    """Name -> file of every built-in config (not `_base_.py`, which the others import)."""
    return {p.stem: p for p in sorted(BUILTIN.glob("*.py")) if not p.stem.startswith("_")}


def find_config(name_or_path: str) -> Path:
    """The config file a `-c` value means: the path when it is a file, else the built-in config of that bare name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    configs = builtin_configs()
    stem = path.name[:-3] if path.name.endswith(".py") else path.name
    if path.parent == Path(".") and stem in configs:
        return configs[stem]
    if path.is_dir():
        raise DNRTError(f"config {name_or_path} is a folder, not a config file; give -c a .py file (or a built-in "
                        f"config's name: {', '.join(configs)})")
    raise DNRTError(f"config file not found: {name_or_path} (built-in configs, by name from any folder: "
                    f"{', '.join(configs)}; `dnrt configs` lists them)")


def _summary(path: Path) -> str:
    """The first comment line of a config file."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dnrt configs`."""
    parser.add_argument("name", nargs="?", help="print this built-in config, or _base_ (to copy it and edit the copy)")


def run(args: argparse.Namespace) -> int:
    """List the built-in configs, or print one."""
    configs = builtin_configs()
    if args.name:
        files = {p.stem: p for p in BUILTIN.glob("*.py")}  # _base_ too, which a copied config may import
        stem = args.name[:-3] if args.name.endswith(".py") else args.name
        if stem not in files:
            raise DNRTError(f"no built-in config '{args.name}'; built-in: {', '.join(sorted(files))}")
        print(files[stem].read_text(), end="")
        return 0
    width = max(map(len, configs))
    for name, path in configs.items():
        print(f"{name:{width}s}  {_summary(path)}")
    print(f"(in {BUILTIN}; run one with `dnrt train -c NAME`, print one with `dnrt configs NAME`)")
    return 0
