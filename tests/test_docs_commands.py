"""The shell commands of README.md and docs/getting-started.md work as written, in order, in one bash shell,
and no command in the docs writes into a tracked file."""
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_PAGES = ["README.md", "docs/getting-started.md"]
SETUP = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && "
# The commands not run as written: (what runs instead, or None for nothing; why). Every other command runs verbatim.
NOT_VERBATIM = {
    SETUP + ".venv/bin/python main.py -c configs/quickstart.py": (
        ".venv/bin/python main.py -c configs/quickstart.py --epochs 1",
        "the venv is the one running this test (no venv made, nothing installed); 1 of the 80 epochs"),
    SETUP + ".venv/bin/python -m pytest -q": (None, "the test suite itself: CI runs this very line"),
    "dnrt train -c quickstart_gelu": ("dnrt train -c quickstart_gelu --epochs 1", "1 of the 80 epochs"),
    "pip wheel --no-deps -w dist .": (None, "builds a wheel: .ci/run builds and installs one"),
    "pip install dist/dnrt-0.1.0-py3-none-any.whl": (None, "installs: .ci/run does, into a fresh folder"),
}
IGNORED = (".git", ".venv", "runs", "data", "site", "build", "dist", "__pycache__", "*.egg-info", ".pytest_cache",
           ".whl")
OUTPUT_OPTIONS = ("--out", "-o", "--output-dir", "--output_dir", ">")


def shell_commands(page: str) -> list[str]:
    """The commands of a page's ```bash blocks, continuation lines joined, comments dropped."""
    text = (ROOT / page).read_text()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s+)# .*$", "", line).strip()
            if line:
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def doc_pages() -> list[str]:
    return ["README.md", *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md")))]


def test_the_table_of_commands_not_run_verbatim_is_current():
    commands = [c for page in RUN_PAGES for c in shell_commands(page)]
    assert set(NOT_VERBATIM) <= set(commands), set(NOT_VERBATIM) - set(commands)
    assert ". .venv/bin/activate" in shell_commands("README.md")
    assert len([c for c in commands if c not in NOT_VERBATIM]) >= 10  # most commands do run as written


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and ".venv" not in p.parts}


@pytest.mark.parametrize("page", RUN_PAGES)
def test_a_pages_commands_run_in_order_in_one_shell(page, tmp_path):
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs to run from a venv, which stands in for the .venv the commands make")
    work = tmp_path / "clone"
    shutil.copytree(ROOT, work, symlinks=True, ignore=shutil.ignore_patterns(*IGNORED))
    (work / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    before = file_digests(work)
    script = ["set -e"]
    for number, command in enumerate(shell_commands(page)):
        command = NOT_VERBATIM.get(command, (command,))[0]
        if command is not None:
            script += [f"echo '@@ {number}' >&2", command]
    venv_bin = Path(sys.prefix, "bin").resolve()
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != venv_bin]
    env = {**os.environ, "PATH": os.pathsep.join(path), "PYTHONPATH": str(work), "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    env.pop("VIRTUAL_ENV", None)  # the shell starts as a new user's: the venv not activated, dnrt not on PATH
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    failed = re.findall(r"^@@ (\d+)$", done.stderr, flags=re.M)
    assert done.returncode == 0, (shell_commands(page)[int(failed[-1])] if failed else None, done.stderr[-3000:])
    after = file_digests(work)
    assert {name: after.get(name) for name in before} == before  # nothing the clone holds was changed or removed
    assert (work / "runs/quickstart/log.txt").is_file()


def output_targets(command: str) -> list[str]:
    words = shlex.split(command.replace(">", " > "), comments=True)
    targets = [words[i + 1] for i, word in enumerate(words[:-1]) if word in OUTPUT_OPTIONS]
    return targets + [word.split("=", 1)[1] for word in words if word.startswith(("--out=", "--output_dir="))]


def test_no_command_in_the_docs_writes_into_the_clones_files():
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    names = listed.stdout.split() if listed.returncode == 0 else [p.name for p in ROOT.iterdir()]
    tracked = {Path(name).parts[0] for name in names} - {".venv", "runs", "data", "site", "build", "dist"}
    checked = 0
    for page in doc_pages():
        for command in shell_commands(page):
            for target in output_targets(command):
                checked += 1
                assert Path(target).parts[0] not in tracked, f"{page}: {command}"
    assert checked >= 3


def test_the_readmes_links_lead_to_files():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    local = [link for link in links if "://" not in link]
    assert len(local) >= 8 and [link for link in local if not (ROOT / link).is_file()] == []
