"""Python config files as in the authors' tool: module-level variables, `from _base_ import *`, CLI overrides.

Every key is declared once in `dnrt.tool.keys.KEYS`; `resolve` checks every value against it and reports every
problem of the files and the command line at once, in one DNRTError of one line per problem.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import json
import runpy
import sys
import types
from pathlib import Path
from typing import Any, Mapping, Sequence

from dnrt.errors import DNRTError
from dnrt.tool.configs import find_config
from dnrt.tool.keys import GROUPS, KEYS, Key

DEFAULTS: dict[str, Any] = {key.name: key.default for key in KEYS.values()}
COMMAND_LINE = "the command line"


def _public_values(namespace: dict[str, Any]) -> dict[str, Any]:
    """The config's settings: public module-level names that are not modules, functions or classes."""
    skip = (types.ModuleType, types.FunctionType, type)
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not isinstance(v, skip)}


def _modules_of(folder: Path) -> list[tuple[str, Path]]:
    """Config modules imported from `folder` (e.g. `_base_`): (module name, file)."""
    found = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).parent == folder:
            found.append((name, Path(file)))
    return found


def _run_file(path: Path) -> tuple[dict[str, Any], list[Path]]:
    """Execute a config file with its own folder importable, so `from _base_ import *` finds its sibling.

    Returns its namespace and the files it consists of (itself, then the siblings it imported)."""
    folder = path.parent
    sys.path.insert(0, str(folder))
    sys.modules.pop("_base_", None)  # a _base_ of another folder may be cached
    try:
        namespace = runpy.run_path(str(path))
        return namespace, [path] + [file for _, file in _modules_of(folder) if file != path]
    except DNRTError:
        raise
    except Exception as e:
        raise DNRTError(f"config {path} failed to load: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(str(folder))
        for name, _ in _modules_of(folder):  # another folder's namesake must load afresh
            del sys.modules[name]


def _assigned_names(file: Path) -> set[str]:
    """Names a file assigns at module level (what it 'holds'), read from its syntax tree."""
    try:
        tree = ast.parse(file.read_text(), str(file))
    except (OSError, SyntaxError, ValueError):
        return set()
    targets = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets += node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets.append(node.target)
    return {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}


def _sources(keys: Sequence[str], files: Sequence[Path], shown: str) -> dict[str, str]:
    """For each key, the file that sets it last: the config itself, else the first sibling that assigns it."""
    assigned = [(file, _assigned_names(file)) for file in files]
    result = {}
    for key in keys:
        holders = [file for file, names in assigned if key in names]
        result[key] = shown if not holders or holders[0] == files[0] else str(Path(shown).with_name(holders[0].name))
    return result


def parse_value(text: str) -> Any:
    """A command-line value as a Python literal where it is one, else the plain string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _from_text(key: Key | None, raw: Any) -> Any:
    """A command-line value: the literal, unless only its plain text is valid for the key (`--note 2024`)."""
    if isinstance(raw, list):
        return parse_value(raw[0]) if len(raw) == 1 else [parse_value(word) for word in raw]
    if not isinstance(raw, str):
        return raw  # a bare flag: True
    value = parse_value(raw)
    if key is None:
        return value
    try:
        key.check(value)
        return value
    except ValueError:
        try:
            key.check(raw)
            return raw
        except ValueError:
            return value


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are DNRTErrors (one `error:` line, exit status 1), never argparse's exit 2."""

    def error(self, message: str):
        raise DNRTError(message)


def add_key_options(parser: argparse.ArgumentParser) -> None:
    """Every key as --key (and the authors' short forms), grouped as in the docs."""
    groups = {group: parser.add_argument_group(f"{title} keys") for group, title in GROUPS.items()}
    for key in KEYS.values():
        names = [f"--{key.name}"] + ([key.short] if key.short else [])
        nargs = "+" if key.check.many else ("?" if key.check.flag else None)
        extra = {"const": True} if nargs == "?" else {}
        groups[key.group].add_argument(*names, dest=key.name, nargs=nargs, default=argparse.SUPPRESS,
                                       metavar="V", help=f"{key.help} [{key.check.expected}; default {key.default!r}]",
                                       **extra)


def key_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """A parser of the key options alone (help off: callers add their own)."""
    parser = _Parser(add_help=False, allow_abbrev=False, **kwargs)
    add_key_options(parser)
    return parser


def namespace_values(args: argparse.Namespace) -> dict[str, Any]:
    """The keys given on the command line, converted from their text."""
    return {k: _from_text(KEYS[k], v) for k, v in vars(args).items() if k in KEYS}


def unknown_options(rest: Sequence[str]) -> dict[str, Any]:
    """What argparse left over: `--name value...` of unknown names (reported with the file's unknown keys)."""
    result: dict[str, Any] = {}
    current = None
    for token in rest:
        if token.startswith("-") and not _is_number(token):
            name, eq, value = token.lstrip("-").partition("=")
            current = name.replace("-", "_") or token
            result[current] = parse_value(value) if eq else True
        elif current is None:
            raise DNRTError(f"unexpected argument {token!r}: give keys as --key value")
        else:
            result[current] = parse_value(token)
    return result


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """`--key value`, `--key=value`, bare `--flag` (True), `--milestones 30 60`, `-b 32` into a dict."""
    args, rest = key_parser().parse_known_args(list(overrides))
    return {**unknown_options(rest), **namespace_values(args)}


def jsonable(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config as plain JSON types (tuples become lists), for config.json and checkpoints."""
    try:
        return json.loads(json.dumps(cfg))
    except TypeError as e:
        raise DNRTError(f"config values must be plain Python literals: {e}") from None


def _unknown(key: str, source: str) -> str:
    close = difflib.get_close_matches(key, DEFAULTS, n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown config key '{key}' in {source}{hint}"


def _cross_checks(cfg: dict[str, Any]) -> list[str]:
    """Problems of keys that are valid alone but not together."""
    problems = []
    if cfg["warmup_epochs"] > 0 and cfg["warmup_steps"] > 0:
        problems.append(f"warmup_epochs = {cfg['warmup_epochs']} and warmup_steps = {cfg['warmup_steps']}: "
                        f"set one of them (the other 0)")
    if cfg["warmup_steps"] > 0 and cfg["scheduler"] not in ("cosine", "step", "multistep"):
        problems.append(f"warmup_steps = {cfg['warmup_steps']}: the {cfg['scheduler']} schedule takes warmup_epochs")
    if cfg["start_epoch"] >= cfg["epochs"]:
        problems.append(f"start_epoch = {cfg['start_epoch']} must be below epochs = {cfg['epochs']}")
    if cfg["scheduler"] == "step" and cfg["step_size"] is None and cfg["lr_drop"] <= 0:
        problems.append("scheduler = 'step' needs step_size (or lr_drop), the epochs between drops")
    if cfg["scheduler"] == "multistep" and not cfg["milestones"]:
        problems.append("scheduler = 'multistep' needs milestones, the epochs at which the lr drops")
    act_layer = cfg["model_kwargs"].get("act_layer")
    if act_layer is not None:
        from dnrt.compat import ACT_LAYERS

        wanted = ACT_LAYERS[act_layer][0]
        if cfg["act"] is not None and cfg["act"] != wanted:
            problems.append(f"act = {cfg['act']!r} contradicts model_kwargs act_layer = {act_layer} "
                            f"(which means act = {wanted!r}); set one of them")
    return problems


def _derived(cfg: dict[str, Any], name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults that depend on other keys (`given`: the keys the files and command line set)."""
    if cfg["output_dir"] is None:
        cfg["output_dir"] = str(Path(cfg["output_root"]) / name)
    if not cfg["no_pretrain"]:
        cfg["pretrained"] = True
    act_layer = cfg["model_kwargs"].get("act_layer")
    if act_layer is not None:  # a config in the authors' form
        from dnrt.compat import ACT_LAYERS, ARR_LAYER_WEIGHTING

        if cfg["act"] is None:
            cfg["act"] = ACT_LAYERS[act_layer][0]
        if "arr_layer_weighting" not in given:
            cfg["arr_layer_weighting"] = ARR_LAYER_WEIGHTING
    return cfg


def resolve(values: Mapping[str, Any], name: str = "run", sources: Mapping[str, str] | None = None) -> dict[str, Any]:
    """DEFAULTS updated with `values`, every value checked, derived defaults filled in.

    `sources` names where each key was set (a file or the command line), for the messages; all problems are
    raised together, one line each."""
    sources = sources or {}
    problems = [_unknown(k, sources.get(k, name)) for k in values if k not in DEFAULTS]
    cfg = dict(DEFAULTS)
    for key, value in values.items():
        if key not in KEYS:
            cfg[key] = value
            continue
        if value is Ellipsis:  # the authors' _base_.py leaves dataset and model as `...` for each config to set
            problems.append(f"{key} is not set (it is ... in {sources.get(key, name)})")
            continue
        try:
            cfg[key] = KEYS[key].check(value)
        except ValueError as e:
            problems.append(f"{key} = {value!r} in {sources.get(key, name)}: {e}")
    if problems:
        raise DNRTError("\n".join(problems))
    problems = _cross_checks(cfg)
    if problems:
        raise DNRTError("\n".join(problems))
    return jsonable(_derived(cfg, name, values))


def load_config(path: str, overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Load a python config file, apply command-line overrides (tokens, or values already parsed), check every
    key and value, and return the full config."""
    file = find_config(path)  # a file, or a built-in config by name
    namespace, files = _run_file(file.resolve())
    values = _public_values(namespace)
    sources = _sources(list(values), files, str(path))
    extra = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    sources.update({k: COMMAND_LINE for k in extra})
    return resolve({**values, **extra}, file.stem, sources)


def ignored(cfg: Mapping[str, Any], distributed: bool, device_type: str) -> str | None:
    """One line naming the keys set to something that cannot mean anything in this run, or None."""
    notes = []
    if cfg["world_size"] != 1:
        notes.append(f"world_size={cfg['world_size']} (torchrun's WORLD_SIZE decides)")
    if cfg["local_rank"] != -1:
        notes.append(f"local_rank={cfg['local_rank']} (torchrun's LOCAL_RANK decides)")
    if cfg["dist_url"] != "env://":
        notes.append(f"dist_url={cfg['dist_url']!r} (torchrun's env:// decides)")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if distributed and cfg["dist_backend"] != backend:
        notes.append(f"dist_backend={cfg['dist_backend']!r} ({backend} on {device_type})")
    for key in ("load_pos", "save_pos"):
        if cfg[key] is not None:
            notes.append(f"{key}={cfg[key]!r} (unused, as in the authors' tool)")
    if cfg["scheduler"] in ("step", "multistep") and (cfg["warmup_epochs"] or cfg["warmup_steps"]):
        notes.append(f"warmup_epochs={cfg['warmup_epochs']}, warmup_steps={cfg['warmup_steps']} "
                     f"(the {cfg['scheduler']} schedule has no warm-up, as in the authors' tool)")
    if cfg["scheduler"] != "step" and cfg["lr_drop"] > 0:
        notes.append(f"lr_drop={cfg['lr_drop']} (only the step schedule uses it)")
    return f"ignored: {'; '.join(notes)}" if notes else None
