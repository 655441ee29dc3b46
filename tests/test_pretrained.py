"""Fine-tuning: weights from each kind of file (or the library's cache) load before conversion; at step 0 the
converted model computes what the pretrained one does; a classifier of another class count starts afresh."""
import urllib.error

import pytest
import timm
import torch
import torchvision

import dnrt
from dnrt.errors import DNRTError
from dnrt.tool import models as M
from dnrt.tool.cli import main_py
from tiny_config import TINY

VIT = dict(name="vit_tiny_patch4_32", in_chans=1, img_size=8,
           model_kwargs={"patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path_rate": 0.0})


def vit(num_classes=10, seed=0, **kwargs):
    torch.manual_seed(seed)
    return M.create_model(num_classes=num_classes, **{**VIT, **kwargs}).eval()


def raa_modules(model):
    return [m for m in model.modules() if isinstance(m, dnrt.RAA)]


def same_outputs(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["plain", "state_dict", "model", "ddp", "dnrt"])
def test_each_kind_of_file_gives_the_same_outputs_at_step_0(form, tmp_path, capsys):
    source = vit(seed=1)
    weights = source.state_dict()
    content = {"plain": weights, "state_dict": {"state_dict": weights, "epoch": 3},  # timm's train.py
               "model": {"model": weights, "optimizer": {}},  # torchvision's references
               "ddp": {f"module.{k}": v for k, v in weights.items()},
               "dnrt": {"model": weights, "arr": None, "optimizer": {"state": {}}, "epoch": 0, "config": {}}}[form]
    path = tmp_path / "weights.pth"
    torch.save(content, path)
    tuned = vit(act="raa", pretrained_file=str(path))
    assert len(raa_modules(tuned)) == 2  # converted after loading
    same_outputs(source, tuned, torch.randn(4, 1, 8, 8))
    n = len(weights)
    assert f"pretrained: loaded {n} of the model's {n} tensors from {path}" in capsys.readouterr().out


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    source = vit(seed=2)
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    same_outputs(source, vit(act="raa", pretrained_file=str(tmp_path / "model.safetensors")), torch.randn(2, 1, 8, 8))


def test_head_of_another_class_count_is_reinitialised(tmp_path, capsys):
    source = vit(num_classes=10, seed=1)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    tuned = vit(num_classes=5, seed=7, act="raa", pretrained_file=str(tmp_path / "w.pth"))
    fresh = vit(num_classes=5, seed=7, act="raa")
    for key, value in tuned.state_dict().items():
        if key.startswith("head."):
            assert torch.equal(value, fresh.state_dict()[key]), f"{key} is not the model's own initialisation"
        elif key in source.state_dict():
            assert torch.equal(value, source.state_dict()[key]), f"{key} was not loaded"
    assert "classifier head.bias, head.weight re-initialised (10 classes in the file)" in capsys.readouterr().out
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("head.")}, tmp_path / "body.pth")
    vit(num_classes=5, pretrained_file=str(tmp_path / "body.pth"))  # a file without a classifier
    assert "classifier head.bias, head.weight re-initialised (not in the file)" in capsys.readouterr().out


def test_dnrt_checkpoint_keeps_trained_raa(tmp_path, capsys):
    source = vit(seed=3, act="raa")
    with torch.no_grad():
        for m in raa_modules(source):
            m.weight.normal_(0, 0.2), m.bias.fill_(0.3)
    torch.save({"model": source.state_dict(), "optimizer": {}, "config": {}}, tmp_path / "checkpoint.pth")
    tuned = vit(act="raa", pretrained_file=str(tmp_path / "checkpoint.pth"))
    same_outputs(source, tuned, torch.randn(3, 1, 8, 8))
    # two RAAs, each with its weight, bias and kind
    assert "loaded 6 more tensors into the converted activations" in capsys.readouterr().out


def test_library_weights_from_torchvision_cache(tmp_path, monkeypatch):
    """pretrained=True through torchvision's own download cache (a file already there is not downloaded)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    published = torchvision.models.resnet18().eval()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(published.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    tuned = M.create_model("resnet18", num_classes=1000, img_size=32, act="raa_relu", pretrained=True).eval()
    assert len(raa_modules(tuned)) > 0
    same_outputs(published, tuned, torch.randn(2, 3, 32, 32))


def test_without_network_one_line_names_the_file(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.DEFAULT.__class__, "get_state_dict", offline)
    with pytest.raises(DNRTError, match=r"fetch https://download\.pytorch\.org/models/resnet18-f37072fd\.pth "
                                        r"and set pretrained_file"):
        M.create_model("resnet18", num_classes=10, pretrained=True)
    build = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: offline() if k.get("pretrained") else build(*a, **k))
    hub = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    with pytest.raises(DNRTError, match=f"timm could not download the weights of vit_tiny_patch16_224 .*"
                                        f"fetch https://huggingface.co/{hub}/resolve/main/model.safetensors"):
        vit(pretrained=True)


def test_clear_refusals(tmp_path):
    with pytest.raises(DNRTError, match="not by model_kwargs"):
        vit(model_kwargs={**VIT["model_kwargs"], "pretrained": True})
    with pytest.raises(DNRTError, match="resnet32_cifar is built here and has no published weights"):
        M.create_model("resnet32_cifar", num_classes=10, pretrained=True)
    with pytest.raises(DNRTError, match="pretrained_file not found"):
        vit(pretrained_file=str(tmp_path / "nothing.pth"))
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(DNRTError, match="is corrupt or not a weights file"):
        vit(pretrained_file=str(tmp_path / "notes.pth"))
    torch.save(vit(model_kwargs={**VIT["model_kwargs"], "embed_dim": 16}).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(DNRTError, match=r"do not fit the model .*cls_token \(1, 1, 16\) in the file, \(1, 1, 32\)"):
        vit(pretrained_file=str(tmp_path / "narrow.pth"))


def test_fine_tuning_run_takes_weights_not_optimizer(tmp_path, capsys):
    """`dnrt train` from a GELU run's checkpoint: the weights come, the run starts at epoch 0 with a fresh optimizer."""
    config = tmp_path / "tiny.py"
    config.write_text(TINY)
    gelu = ["--act", "gelu", "--criterion", "ce", "--epochs", "1"]
    assert main_py(["-c", str(config), "--output_dir", str(tmp_path / "gelu"), *gelu]) == 0
    checkpoint = tmp_path / "gelu" / "checkpoint.pth"
    capsys.readouterr()
    assert main_py(["-c", str(config), "--output_dir", str(tmp_path / "tuned"), "--epochs", "1",
                    "--pretrained_file", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert f"from {checkpoint}" in out and "resumed" not in out
    state = torch.load(tmp_path / "tuned" / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 0 and any(k.endswith("act.weight") for k in state["model"])
