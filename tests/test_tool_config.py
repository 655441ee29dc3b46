"""Config files, overrides and key checking of the training tool."""
import pytest

from dnrt.errors import DNRTError
from dnrt.tool.config import DEFAULTS, load_config, parse_overrides, resolve


def write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return path


def test_base_import_and_overrides(tmp_path):
    write(tmp_path, "_base_.py", "dataset = 'digits'\nepochs = 300\nlr = 5e-4 * 256 / 512\nimport math\n")
    cfg_file = write(tmp_path, "exp.py", "from _base_ import *\nepochs = 7\nact = 'raa'\n")
    cfg = load_config(str(cfg_file),
                      ["--batch_size", "32", "--model_kwargs", '{"depth": 2}', "--amp=False", "--no_aug"])
    assert cfg["dataset"] == "digits" and cfg["lr"] == pytest.approx(2.5e-4)
    assert cfg["epochs"] == 7 and cfg["act"] == "raa"
    assert cfg["batch_size"] == 32 and cfg["model_kwargs"] == {"depth": 2}
    assert cfg["amp"] is False and cfg["no_aug"] is True
    assert cfg["output_dir"].endswith("exp")  # derived from the file name
    assert set(cfg) == set(DEFAULTS)


def test_base_of_another_folder_is_not_reused(tmp_path):
    for name, epochs in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        write(tmp_path / name, "_base_.py", f"epochs = {epochs}\n")
        write(tmp_path / name, "c.py", "from _base_ import *\n")
    assert load_config(str(tmp_path / "a" / "c.py"))["epochs"] == 1
    assert load_config(str(tmp_path / "b" / "c.py"))["epochs"] == 2


def test_unknown_key_in_file_names_closest(tmp_path):
    cfg_file = write(tmp_path, "bad.py", "warmup_epoch = 3\n")
    with pytest.raises(DNRTError, match="unknown config key 'warmup_epoch'.*warmup_epochs"):
        load_config(str(cfg_file))


def test_unknown_override_names_closest(tmp_path):
    cfg_file = write(tmp_path, "ok.py", "epochs = 3\n")
    with pytest.raises(DNRTError, match="'arr_los_coef'.*arr_loss_coef"):
        load_config(str(cfg_file), ["--arr_los_coef", "3"])


def test_override_values_are_literals_or_strings():
    assert parse_overrides(["--lr", "1e-3", "--model", "resnet18", "--act", "None", "--eval"]) == {
        "lr": 1e-3, "model": "resnet18", "act": None, "eval": True}
    with pytest.raises(DNRTError, match="unexpected argument .epochs.: give keys as --key value"):
        parse_overrides(["epochs", "2"])


def test_missing_config_file(tmp_path):
    with pytest.raises(DNRTError, match="config file not found"):
        load_config(str(tmp_path / "nope.py"))


def test_the_authors_common_file_is_a_sibling_like_base(tmp_path):
    write(tmp_path, "_common_.py", "epochs = 5\nbatch_size = 0\n")
    cfg_file = write(tmp_path, "exp.py", "from _common_ import *\nlr = 0.1\n")
    with pytest.raises(DNRTError, match=f"batch_size = 0 in {tmp_path / '_common_.py'}: must be an integer ≥ 1"):
        load_config(str(cfg_file))
    write(tmp_path, "_common_.py", "epochs = 5\n")
    assert load_config(str(cfg_file))["epochs"] == 5  # read afresh, not the module cached by the first load


def test_values_from_a_saved_config_resolve_to_themselves(tmp_path):
    cfg_file = write(tmp_path, "exp.py", "criterion = 'ce_arr'\nmodel_lib = 'default'\nnum_workers = None\n"
                                         "no_pretrain = False\n")
    cfg = load_config(str(cfg_file))
    assert (cfg["criterion"], cfg["model_lib"], cfg["pretrained"]) == ("arr", None, True)
    assert cfg["num_workers"] is None and resolve(cfg, "exp") == cfg  # None: train chooses (dnrt/tool/threads.py)
