"""The run folder's file names and the one writer every file of dnrt goes through: a temporary file beside the
target, fsync, rename, fsync of the folder, with the mode the umask gives (0o666 & ~umask), and strict JSON."""
from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

from dnrt.errors import DNRTError

CONFIG, LOG, EVAL, LATEST, BEST = "config.json", "log.txt", "eval.json", "checkpoint.pth", "checkpoint_best.pth"
LOCK, MANIFEST, TENSORBOARD = "dnrt.lock", "manifest.json", "tensorboard"
JOB = "job.json"  # the launcher's record of the job that trains the run (dnrt.tool.launch)
TEMP_SUFFIX = ".tmp"


def numbered(epoch: int) -> str:
    """The name of the checkpoint kept for `epoch` (0-based) every save_interval epochs."""
    return f"checkpoint_{epoch:04d}.pth"


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the folder's entry is data of its own)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_mode() -> int:
    """The mode open() would give a new file: 0o666 without the process's umask (read from /proc where it can be,
    since setting the umask to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def temp_beside(path: str | os.PathLike, suffix: str = TEMP_SUFFIX) -> Iterator[str]:
    """A temporary file name beside `path` (the umask's mode) to write whole, renamed onto `path` when the block
    ends without error and removed when it fails: a killed process leaves the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600 whatever the umask
        os.close(fd)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through `write(file)` into a temporary file beside `path`, fsync, rename, fsync the folder: a killed
    process leaves the old file or the new one, never a torn one. OSError (full disk, no permission) propagates."""
    with temp_beside(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, so that it is strict JSON (null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(data: Any, indent: Optional[int] = None) -> str:
    """Strict JSON (no NaN/Infinity tokens: non-finite numbers become null)."""
    return json.dumps(finite(data), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DNRTError(f"{path}: not valid JSON ({getattr(e, 'msg', 'not text')})") from None


def usable_folder(folder: str | os.PathLike, key: str = "output_dir") -> Path:
    """`folder`, created if missing; a path that is a file, or one that cannot be created, is a DNRTError."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DNRTError(f"{key} {folder} is a file, not a folder; choose another {key}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DNRTError(f"cannot create {key} {folder}: {e.strerror or e}") from None
    return folder


def remove_temp_files(folder: Path) -> None:
    """Delete the temporary files a killed process left behind (atomic_write's `.<name>.*.tmp`)."""
    for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def is_folder_target(out: str | os.PathLike) -> bool:
    """Whether an --out names a folder: an existing folder, or a name ending in '/' (dots in it are no suffix)."""
    return Path(out).is_dir() or str(out).endswith(("/", os.sep))


def output_path(out: Optional[str | os.PathLike], default_dir: str | os.PathLike, name: str) -> Path:
    """Where a command writes its output `name`: --out as a folder when it is one (existing, or ending in '/'),
    as a file when it has a suffix, else as a folder to create; default_dir without --out."""
    target = Path(out) if out else Path(default_dir)
    as_file = out is not None and not is_folder_target(out) and bool(target.suffix)
    folder = target.parent if as_file else target
    if folder.exists() and not folder.is_dir():
        raise DNRTError(f"--out {folder} is a file, not a folder")
    with output_error(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return target if as_file else target / name


@contextmanager
def output_error(path: str | os.PathLike) -> Iterator[None]:
    """An OSError while writing a command's output (read-only folder, no permission, full disk) as one line
    naming the path."""
    try:
        yield
    except OSError as e:
        where = e.filename if isinstance(e.filename, str) and not Path(e.filename).name.startswith(".") else path
        raise DNRTError(f"cannot write {where}: {e.strerror or e}; choose a writable --out") from None


def write_eval(out_dir: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    """eval.json of `dnrt eval` (strict JSON) in `out_dir` (beside the checkpoint evaluated, or --out)."""
    path = output_path(out_dir, out_dir, EVAL)
    with output_error(path):
        write_json(path, metrics)
    return path
