"""The table of keys: the authors' command line in all its forms, every bad value, --help and the docs' tables."""
import json
import re
import runpy
from pathlib import Path

import pytest
import torch

from dnrt.errors import DNRTError
from dnrt.tool import keys
from dnrt.tool.cli import main, main_py, run_parser
from dnrt.tool.config import load_config, namespace_values, parse_overrides, resolve

ROOT = Path(__file__).resolve().parents[1]

# every option of the authors' main.py (horrible-dong/DNRT) but -c/--config, which is not a config key
AUTHORS_OPTIONS = [
    "device", "seed", "batch_size", "epochs", "start_epoch", "clip_max_norm", "eval", "eval_interval",
    "num_workers", "pin_memory", "sync_bn", "find_unused_params", "world_size", "dist_url", "dist_backend",
    "local_rank", "print_freq", "need_targets", "drop_lr_now", "drop_last", "amp", "no_dist", "data_root",
    "dataset", "image_size", "train_aug_kwargs", "eval_aug_kwargs", "model_lib", "model", "model_kwargs",
    "criterion", "optimizer", "lr", "lr_drop", "momentum", "weight_decay", "scheduler", "warmup_epochs",
    "warmup_steps", "warmup_lr", "min_lr", "step_size", "milestones", "gamma", "evaluator", "no_pretrain",
    "resume", "load_pos", "output_dir", "save_interval", "save_pos", "note",
]
AUTHORS_FLAGS = ["eval", "amp", "need_targets", "drop_last", "find_unused_params", "no_dist", "drop_lr_now"]
# a value the authors' tool takes for each option, as typed on its command line, and what it means here
AUTHORS_VALUES = {
    "device": ("cpu", "cpu"), "seed": ("7", 7), "batch_size": ("32", 32), "epochs": ("90", 90),
    "start_epoch": ("3", 3), "clip_max_norm": ("0.5", 0.5), "eval_interval": ("2", 2), "num_workers": ("0", 0),
    "pin_memory": ("False", False), "sync_bn": ("True", True), "world_size": ("2", 2),
    "dist_url": ("tcp://127.0.0.1:23456", "tcp://127.0.0.1:23456"), "dist_backend": ("gloo", "gloo"),
    "local_rank": ("0", 0), "print_freq": ("10", 10), "data_root": ("/data/x", "/data/x"),
    "dataset": ("cifar10", "cifar10"), "image_size": ("64", 64), "train_aug_kwargs": ("{'hflip': 0.0}", {"hflip": 0.0}),
    "eval_aug_kwargs": ("{'crop_pct': 1.0}", {"crop_pct": 1.0}), "model_lib": ("default", None),
    "model": ("resnet18", "resnet18"), "model_kwargs": ("{'drop_rate': 0.1}", {"drop_rate": 0.1}),
    "criterion": ("ce_arr", "arr"), "optimizer": ("sgd", "sgd"), "lr": ("1e-3", 1e-3), "lr_drop": ("30", 30),
    "momentum": ("0.8", 0.8), "weight_decay": ("1e-4", 1e-4), "scheduler": ("step", "step"),
    "warmup_epochs": ("0", 0), "warmup_steps": ("0", 0), "warmup_lr": ("1e-5", 1e-5), "min_lr": ("0", 0),
    "step_size": ("30", 30), "milestones": ("30", [30]), "gamma": ("0.5", 0.5), "evaluator": ("default", "default"),
    "no_pretrain": ("True", True), "resume": ("runs/x/checkpoint.pth", "runs/x/checkpoint.pth"),
    "load_pos": ("w.pth", "w.pth"), "output_dir": ("runs/x", "runs/x"), "save_interval": ("5", 5),
    "save_pos": ("s.pth", "s.pth"), "note": ("first try", "first try"),
    **{flag: ("True", True) for flag in AUTHORS_FLAGS},
}


def test_every_authors_option_is_a_key_with_the_authors_value():
    assert set(AUTHORS_OPTIONS) <= set(keys.KEYS) and set(AUTHORS_VALUES) == set(AUTHORS_OPTIONS)
    tokens = [word for option, (text, _) in AUTHORS_VALUES.items() for word in (f"--{option}", text)]
    cfg = resolve(parse_overrides(tokens))
    assert {option: cfg[option] for option in AUTHORS_OPTIONS} == {k: v for k, (_, v) in AUTHORS_VALUES.items()}


def test_short_forms_bare_flags_equals_and_lists():
    args, rest = run_parser("main.py", "").parse_known_args(
        ["-c", "cfg.py", "-r", "ck.pth", "-b", "32", "-d", "digits", "-m", "mlp", "-o", "out", *map("--{}".format,
         AUTHORS_FLAGS), "--milestones", "30", "60", "--lr=0.01", "--amp", "--gamma=0.5"])
    assert rest == [] and args.config == "cfg.py"
    values = namespace_values(args)
    assert values == {"resume": "ck.pth", "batch_size": 32, "dataset": "digits", "model": "mlp", "output_dir": "out",
                      **{flag: True for flag in AUTHORS_FLAGS}, "milestones": [30, 60], "lr": 0.01, "gamma": 0.5}
    assert parse_overrides(["--amp", "False", "--eval", "--sync_bn=True"]) == {"amp": False, "eval": True,
                                                                              "sync_bn": True}
    assert parse_overrides(["--amp", "bf16", "--drop_last", "-b", "8"]) == {"amp": "bf16", "drop_last": True,
                                                                            "batch_size": 8}
    assert parse_overrides(["--milestones=[10, 20]", "--note", "2024", "--lr", "-1"]) == {
        "milestones": [10, 20], "note": "2024", "lr": -1}


def test_plain_text_values_and_literals():
    assert parse_overrides(["--output_dir", "runs/a b", "--act", "None", "--model_lib", "None",
                            "--compile", "max-autotune", "--arr_layers", "blocks.0", "blocks.1"]) == {
        "output_dir": "runs/a b", "act": None, "model_lib": None, "compile": "max-autotune",
        "arr_layers": ["blocks.0", "blocks.1"]}


BAD_VALUES = [
    (["--batch_size", "abc"], "batch_size = 'abc' in the command line: must be an integer ≥ 1"),
    (["--batch_size", "0"], "batch_size = 0 in the command line: must be an integer ≥ 1"),
    (["--batch_size", "2.5"], "batch_size = 2.5 in the command line: must be an integer ≥ 1"),
    (["--epochs", "0"], "epochs = 0 in the command line: must be an integer ≥ 1"),
    (["--lr", "-1"], "lr = -1 in the command line: must be a number > 0"),
    (["--lr", "0"], "lr = 0 in the command line: must be a number > 0"),
    (["--lr", "nan"], "lr = 'nan' in the command line: must be a number > 0"),
    (["--amp", "maybe"], "amp = 'maybe' in the command line: must be one of True, False, 'bf16'"),
    (["--drop_last", "5"], "drop_last = 5 in the command line: must be None (drop a last partial batch"),
    (["--weight_decay", "-0.1"], "weight_decay = -0.1 in the command line: must be a number ≥ 0"),
    (["--momentum", "2"], "momentum = 2 in the command line: must be a number ≥ 0 and ≤ 1"),
    (["--warmup_epochs", "-1"], "warmup_epochs = -1 in the command line: must be an integer ≥ 0"),
    (["--scheduler", "cosin"], "scheduler = 'cosin' in the command line: must be one of 'cosine', 'step'"),
    (["--optimizer", "adamx"], "optimizer = 'adamx' in the command line: must be a timm.optim optimizer name"),
    (["--criterion", "arrr"], "criterion = 'arrr' in the command line: must be one of 'ce', 'arr', 'ce_arr'"),
    (["--act", "raaa"], "act = 'raaa' in the command line: must be None (keep the model's own) or one of 'relu'"),
    (["--model_kwargs", "[1]"], "model_kwargs = [1] in the command line: must be a dict"),
    (["--milestones", "60", "30"], "milestones = [60, 30] in the command line: must be None or a list of increasing"),
    (["--device", "gpu"], "device = 'gpu' in the command line: must be None (CUDA when available) or a torch device"),
    (["--image_size", "0"], "image_size = 0 in the command line: must be None (the dataset's own size) or an integer"),
    (["--arr_momentum", "0"], "arr_momentum = 0 in the command line: must be a number > 0 and ≤ 1"),
    (["--seed", "-3"], "seed = -3 in the command line: must be an integer ≥ 0"),
    (["--compile", "fast"], "compile = 'fast' in the command line: must be one of False, True, 'default'"),
    (["--evaluator", "coco"], "evaluator = 'coco' in the command line: must be one of 'default'"),
    (["--model_lib", "hf"], "model_lib = 'hf' in the command line: must be one of None, 'timm', 'torchvision'"),
    (["--warmup_epochs", "2", "--warmup_steps", "5"], "warmup_epochs = 2 and warmup_steps = 5: set one of them"),
    (["--epochs", "3", "--start_epoch", "3"], "start_epoch = 3 must be below epochs = 3"),
    (["--scheduler", "step"], "scheduler = 'step' needs step_size (or lr_drop)"),
    (["--scheduler", "multistep"], "scheduler = 'multistep' needs milestones"),
    (["--scheduler", "poly", "--warmup_epochs", "0", "--warmup_steps", "3"],
     "warmup_steps = 3: the poly schedule takes warmup_epochs"),
    (["--act", "relu", "--model_kwargs", "{'act_layer': 'dnrt.compat.RAA'}"],
     "act = 'relu' contradicts model_kwargs act_layer = dnrt.compat.RAA (which means act = 'raa')"),
]


@pytest.mark.parametrize("tokens, message", BAD_VALUES, ids=[" ".join(t) for t, _ in BAD_VALUES])
def test_bad_value_is_one_line_naming_the_key(tokens, message):
    with pytest.raises(DNRTError) as caught:
        resolve(parse_overrides(tokens), sources={k: "the command line" for k in parse_overrides(tokens)})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_cli_reports_every_problem_at_once_without_traceback(tmp_path, capsys):
    config = tmp_path / "c.py"
    config.write_text("dataset = 'digits'\nepochs = 0\n")
    assert main_py(["-c", str(config), "--batch_size", "abc", "--lr", "-1", "--amp", "maybe"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert sorted(err) == sorted(["error: batch_size = 'abc' in the command line: must be an integer ≥ 1",
                   "error: lr = -1 in the command line: must be a number > 0",
                   f"error: epochs = 0 in {config}: must be an integer ≥ 1",
                   "error: amp = 'maybe' in the command line: must be one of True, False, 'bf16'"])


def test_all_unknown_keys_at_once_each_with_its_file(tmp_path, capsys):
    (tmp_path / "_base_.py").write_text("pin_memry = True\nzzqx_flag = 1\nepochs = 3\n")
    config = tmp_path / "exp.py"
    config.write_text("from _base_ import *\nwarmup_epoch = 3\nepochs = 4\n")
    with pytest.raises(DNRTError) as caught:
        load_config(str(config), ["--epoch", "2", "--lr=0.1"])
    lines = str(caught.value).splitlines()
    assert sorted(lines) == sorted([
        f"unknown config key 'pin_memry' in {tmp_path / '_base_.py'} (did you mean pin_memory?)",
        f"unknown config key 'zzqx_flag' in {tmp_path / '_base_.py'}",
        f"unknown config key 'warmup_epoch' in {config} (did you mean warmup_epochs?)",
        "unknown config key 'epoch' in the command line (did you mean epochs?)",
    ])
    assert main(["train", "-c", str(config), "--epoch", "2"]) == 1
    assert len(capsys.readouterr().err.splitlines()) == 4


@pytest.mark.parametrize("base, config, message", [
    ("batch_size = 'big'\n", "", "batch_size = 'big' in {base}: must be"),  # blamed on the file that sets it
    ("dataset = ...\nmodel = ...\n", "model = 'mlp'\n", "dataset is not set (it is ... in {base})"),  # the authors' ...
])
def test_a_key_from_base_is_reported_with_base(tmp_path, base, config, message):
    (tmp_path / "_base_.py").write_text(base)
    (tmp_path / "exp.py").write_text("from _base_ import *\n" + config)
    with pytest.raises(DNRTError, match=re.escape(message.format(base=tmp_path / "_base_.py"))):
        load_config(str(tmp_path / "exp.py"))


@pytest.mark.parametrize("argv", [["main.py"], ["dnrt", "train"], ["dnrt", "eval"]])
def test_help_lists_every_key_grouped(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main_py(["--help"]) if argv == ["main.py"] else main([argv[1], "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for group in keys.GROUPS.values():
        assert f"{group} keys:" in out
    for key in keys.KEYS.values():
        assert re.search(rf"--{key.name}\b", out), key.name
        assert key.short is None or re.search(rf"--{key.name}[^\n]*{key.short} V", out), key.short
    positions = [out.index(f"--{k} ") for k in ("dataset", "model", "criterion", "batch_size", "scheduler")]
    assert positions == sorted(positions)  # in the README's group order


def test_the_docs_key_tables_are_the_table():
    """docs/hooks.py puts the tables into the tool page when the site is built: one place, every key, no marker left."""
    hooks = runpy.run_path(str(ROOT / "docs" / "hooks.py"))
    page = (ROOT / "docs" / "tool.md").read_text()
    assert page.count(hooks["MARKER"]) == 1
    built = hooks["on_page_markdown"](page, None, None, None)
    assert keys.markdown() in built and hooks["MARKER"] not in built
    assert built.count("| key | default | accepts | meaning |") == len(keys.GROUPS)
    for key in keys.KEYS.values():
        assert f"| `{key.name}`" in built, key.name
    assert hooks["on_page_markdown"]("# Other page\n", None, None, None) == "# Other page\n"


def test_defaults_pass_their_own_checks():
    for key in keys.KEYS.values():
        assert key.check(key.default) == key.default, key.name


def test_keys_that_cannot_mean_anything_are_named_in_one_line():
    from dnrt.tool.config import ignored

    assert ignored(resolve({}), distributed=False, device_type="cpu") is None
    cfg = resolve({"dist_url": "tcp://10.0.0.1:23456", "world_size": 4, "local_rank": 0, "dist_backend": "nccl",
                   "load_pos": "w.pth", "scheduler": "step", "step_size": 30, "warmup_epochs": 5})
    line = ignored(cfg, distributed=True, device_type="cpu")
    assert line.startswith("ignored: ") and "\n" not in line
    for part in ("world_size=4", "local_rank=0", "dist_url='tcp://10.0.0.1:23456'", "dist_backend='nccl' (gloo on cpu)",
                 "load_pos='w.pth'", "warmup_epochs=5, warmup_steps=0 (the step schedule has no warm-up"):
        assert part in line


def test_cuda_without_cuda_falls_back_to_the_cpu_with_one_line(monkeypatch, capsys):
    from dnrt.tool import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.select_device("cuda") == torch.device("cpu")
    assert capsys.readouterr().out == "device 'cuda': CUDA is not available, running on the CPU\n"


def test_no_dist_under_torchrun_is_refused(monkeypatch):
    from dnrt.tool import distributed

    distributed.refuse_no_dist(True)  # one process: nothing to disable
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.refuse_no_dist(False)
    with pytest.raises(DNRTError, match="no_dist=True, but torchrun started 2 processes"):
        distributed.refuse_no_dist(True)


@pytest.mark.parametrize("drop_last, batches", [(None, 3), (True, 3), (False, 4)])
def test_drop_last_and_pin_memory_reach_the_loader(drop_last, batches):
    from torch.utils.data import TensorDataset

    from dnrt.tool.train import train_loader

    cfg = resolve({"batch_size": 3, "num_workers": 0, "drop_last": drop_last, "pin_memory": False})
    loader, _ = train_loader(cfg, TensorDataset(torch.zeros(10, 1)))
    assert len(loader) == batches and loader.pin_memory is False


def test_start_epoch_starts_a_fresh_run_there(tmp_path):
    from tiny_config import TINY

    config = tmp_path / "tiny.py"
    config.write_text(TINY)
    assert main_py(["-c", str(config), "--output_dir", str(tmp_path / "run"), "--start_epoch", "1"]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1]


def test_a_cuda_index_past_the_machines_devices_is_refused(monkeypatch):
    from dnrt.tool import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DNRTError, match="device 'cuda:3': this machine has 1 CUDA device"):
        distributed.select_device("cuda:3")
