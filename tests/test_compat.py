"""dnrt.compat and configs in the authors' form: their three runs train RAA + ARR, GELU and ReLU."""
import json
import math

import pytest
import torch
from torch import nn

import dnrt
from dnrt import compat
from dnrt.errors import DNRTError
from dnrt.tool.rundir import load_checkpoint, load_run
from dnrt.tool.cli import main, main_py
from dnrt.tool.config import load_config
from dnrt.tool.train import build_model, model_args

# the authors' configs/_base_.py keys and values (their tool's defaults for the CIFAR runs)
AUTHORS_BASE = """
device = 'cuda'
seed = 42
epochs = 300
clip_max_norm = 1.0
eval_interval = 1
num_workers = 8
pin_memory = True
sync_bn = True
find_unused_params = False
dist_url = 'env://'
dist_backend = 'nccl'
print_freq = 50
need_targets = False
amp = True
data_root = './data'
dataset = ...
model_lib = 'default'
model = ...
criterion = 'ce'
optimizer = 'adamw'
weight_decay = 5e-2
scheduler = 'cosine'
warmup_epochs = 20
warmup_lr = 1e-06
min_lr = 1e-05
evaluator = 'default'
no_pretrain = True
save_interval = 5
output_root = './runs'
"""
# their dnrt.py / gelu.py / relu.py with the import changed, on digits with a small ViT so a test can train it
AUTHORS_RUN = """
import os

from _base_ import *
from dnrt.compat import {act}

model = 'vit_tiny_patch4_32'
dataset = 'digits'

image_size = 8
batch_size = 64
lr = 0.0005 * (batch_size / 512)
output_dir = f"{{output_root}}/{{dataset}}/{{model}}/{{os.path.basename(__file__).split('.')[0]}}"
model_kwargs = dict(act_layer={act}, drop_path_rate=0.1, patch_size=2, embed_dim=32, depth=2, num_heads=2)
"""
ARR_LINES = "\nneed_targets = True\ncriterion = 'ce_arr'\narr_loss_coef = 20\n"


@pytest.fixture
def authors_configs(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "_base_.py").write_text(AUTHORS_BASE)
    (folder / "dnrt.py").write_text(AUTHORS_RUN.format(act="RAA") + ARR_LINES)
    (folder / "gelu.py").write_text(AUTHORS_RUN.format(act="GELU"))
    (folder / "relu.py").write_text(AUTHORS_RUN.format(act="ReLU"))
    monkeypatch.chdir(tmp_path)
    return folder


def built(path):
    cfg = load_config(str(path))
    return cfg, *build_model(cfg, model_args(cfg), torch.device("cpu"))


def modules(model, kind):
    return [m for m in model.modules() if type(m) is kind]


def test_authors_three_runs_build_what_theirs_train(authors_configs):
    cfg, model, arr = built(authors_configs / "dnrt.py")
    raa = modules(model, dnrt.RAA)
    assert len(raa) == 2 and all((m.base, m.shift, m.channel_dim) == ("gelu", "vector", -1) for m in raa)
    assert not modules(model, nn.GELU) and arr is not None and arr.weight == 20
    assert cfg["model_kwargs"]["act_layer"] == "dnrt.compat.RAA" and cfg["act"] == "raa"
    assert cfg["criterion"] == "arr" and cfg["model_lib"] is None
    assert cfg["output_dir"] == "./runs/digits/vit_tiny_patch4_32/dnrt"
    for name, kind, other in (("gelu", nn.GELU, nn.ReLU), ("relu", nn.ReLU, nn.GELU)):
        cfg, model, arr = built(authors_configs / f"{name}.py")
        assert len(modules(model, kind)) == 2 and not modules(model, other) and not modules(model, dnrt.RAA)
        assert arr is None and cfg["criterion"] == "ce"


def test_authors_dnrt_config_trains_and_its_saved_config_rebuilds_the_model(authors_configs, capsys):
    assert main_py(["-c", "configs/dnrt.py", "--epochs", "1", "--num_workers", "0", "--note", "from their config"]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "device 'cuda': CUDA is not available, running on the CPU" in out
    assert "Note: from their config" in out
    run = authors_configs.parent / "runs" / "digits" / "vit_tiny_patch4_32" / "dnrt"
    saved = json.loads((run / "config.json").read_text())
    assert saved["model_kwargs"]["act_layer"] == "dnrt.compat.RAA" and saved["note"] == "from their config"
    model, arr, _ = load_run(run / "checkpoint.pth")  # from the saved config alone
    assert len(modules(model, dnrt.RAA)) == 2 and arr is not None
    state = load_checkpoint(run / "checkpoint.pth")["model"]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert main(["eval", "-r", str(run / "checkpoint.pth")]) == 0


@pytest.mark.parametrize("act, base, shift", [
    ("SimpleRAA", "gelu", "scalar"), ("ElementWiseRAA", "gelu", "elementwise"), ("RAA2", "relu", "vector"),
    ("SimpleRAA2", "relu", "scalar"), ("ElementWiseRAA2", "relu", "elementwise")])
def test_ablation_forms_become_their_raa(authors_configs, act, base, shift):
    (authors_configs / "ablation.py").write_text(AUTHORS_RUN.format(act=act))
    cfg, model, _ = built(authors_configs / "ablation.py")
    raa = modules(model, dnrt.RAA)
    assert len(raa) == 2 and all((m.base, m.shift) == (base, shift) for m in raa)
    assert cfg["model_kwargs"]["act_layer"] == f"dnrt.compat.{act}"


def test_act_layer_must_be_known_and_agree_with_act(authors_configs):
    silu = AUTHORS_RUN.format(act="GELU").replace("act_layer=GELU", "act_layer=__import__('torch').nn.SiLU")
    (authors_configs / "silu.py").write_text(silu)
    with pytest.raises(DNRTError, match=r"model_kwargs = .* in configs/silu.py: must be a dict .*act_layer: a class"):
        load_config("configs/silu.py")
    with pytest.raises(DNRTError, match="act = 'gelu' contradicts model_kwargs act_layer = dnrt.compat.RAA"):
        load_config("configs/dnrt.py", ["--act", "gelu"])


def phi(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def test_compat_classes_are_the_authors_formulas():
    torch.manual_seed(0)
    d = 6
    x = torch.randn(4, 5, d)
    w, b, W, bv = torch.randn(d), torch.randn(()), torch.randn(d, d), torch.randn(d)
    expected = {
        "GELU": x * phi(x), "ReLU": x.clamp_min(0),
        "RAA": x * phi(x + (x @ w)[..., None] + b), "RAA2": (x + (x @ w)[..., None] + b).clamp_min(0),
        "SimpleRAA": x * phi(x + b), "SimpleRAA2": (x + b).clamp_min(0),
        "ElementWiseRAA": x * phi(x + x @ W.T + bv), "ElementWiseRAA2": (x + x @ W.T + bv).clamp_min(0),
    }
    for name, want in expected.items():
        cls = getattr(compat, name)
        module = cls() if name in ("GELU", "ReLU") else cls(d)
        if isinstance(module, dnrt.RAA):
            with torch.no_grad():
                module.bias.copy_(bv if module.shift == "elementwise" else b)
                if module.weight is not None:
                    module.weight.copy_(W if module.shift == "elementwise" else w)
        torch.testing.assert_close(module(x), want, atol=1e-5, rtol=1e-5, msg=name)
    maps = torch.randn(2, d, 3, 3)
    tokens = maps.permute(0, 2, 3, 1)
    formulas = {"RAA_CNN": lambda t: t * phi(t + (t @ w)[..., None] + b),
                "RAA2_CNN": lambda t: (t + (t @ w)[..., None] + b).relu()}
    for name, formula in formulas.items():
        module = getattr(compat, name)(d)
        with torch.no_grad():
            module.weight.copy_(w)
            module.bias.copy_(b)
        torch.testing.assert_close(module(maps), formula(tokens).permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


def test_fresh_compat_raa_is_its_base():
    x = torch.randn(3, 8)
    assert torch.allclose(compat.RAA(8)(x), nn.functional.gelu(x), atol=1e-6)
    assert torch.equal(compat.RAA2(8)(x), x.relu())


def test_authors_configs_get_the_authors_arr_layer_weighting(authors_configs):
    from dnrt.tool.config import resolve
    from dnrt.tool.rundir import changed_keys

    cfg, model, arr = built(authors_configs / "dnrt.py")
    assert cfg["arr_layer_weighting"] == compat.ARR_LAYER_WEIGHTING == "reference" == arr.layer_weighting
    assert load_config("configs/dnrt.py", ["--arr_layer_weighting", "paper"])["arr_layer_weighting"] == "paper"
    assert resolve(cfg)["arr_layer_weighting"] == "reference"  # the saved config rebuilds the same ARR
    assert load_config("dnrt")["arr_layer_weighting"] == "paper"  # the tool's own configs: the paper's formula
    older = {k: v for k, v in cfg.items() if k != "arr_layer_weighting"}  # a run of dnrt before the key, which
    assert changed_keys(older, resolve(older)) == {"arr_layer_weighting": ("paper", "reference")}  # used 'paper'
