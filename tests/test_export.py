"""Deployable models: RAA records its plain formula when traced, scripted or exported, so a converted ViT and ResNet
give the eager outputs through torch.jit.trace (saved and loaded), torch.jit.script, torch.export and ONNX."""
import io
import warnings

import pytest
import torch
from torch import nn

import dnrt
from dnrt.nn.convert import WidthDispatch
from dnrt.tool import models as M
from dnrt.tool.cli import main
from dnrt.tool.export import export_model
from tiny_config import TINY

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit is deprecated in favour of torch.export
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)


def trained_looking(model):
    """RAA parameters away from zero, so the shift and its weights are really exercised."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, dnrt.RAA):
                m.weight.normal_(0, 0.1), m.bias.uniform_(-0.5, 0.5)
    return model.eval()


MODELS = {
    "vit": lambda: M.create_model("vit_tiny_patch4_32", num_classes=10, in_chans=3, img_size=16, act="raa",
                                  model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}),
    "resnet": lambda: M.create_model("resnet18_cifar", num_classes=10, in_chans=3, img_size=16, act="raa_relu"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return trained_looking(MODELS[request.param]())


# Eager RAA runs the C++ kernels, whose sums and erf differ from the recorded formula in the last bits; through
# a ResNet-18 that grows to about 6e-5 in the logits, so exports are compared at 1e-4.
CLOSE = dict(rtol=1e-4, atol=1e-4)


def eager(model, x):
    with torch.no_grad():
        return model(x)


def test_trace_save_load(model):
    x = torch.randn(2, 3, 16, 16)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(model, x), buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), eager(model, x), **CLOSE)


def test_script(model):
    x = torch.randn(2, 3, 16, 16)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), eager(model, x), **CLOSE)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "onnx"])
def test_export_formats_at_another_batch_size(model, fmt, tmp_path):
    if fmt == "onnx":
        for module in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(module, reason=f"needs {module}: pip install -e '.[onnx]'")
    run = export_model(model, torch.randn(2, 3, 16, 16), fmt, tmp_path / f"model.{fmt}")
    x = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(run(x), eager(model, x), **CLOSE)
    assert [p.name for p in tmp_path.iterdir()] == [f"model.{fmt}"]  # no temporary file left


def test_width_dispatch_scripts():
    """One activation called at two widths (as in torchvision's Bottleneck) still scripts and traces."""
    class TwoWidths(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 6, 1), nn.GELU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    x = torch.randn(2, 3, 5, 5)
    model = trained_looking(dnrt.convert(TwoWidths(), x))
    assert isinstance(model.act, WidthDispatch)
    torch.testing.assert_close(torch.jit.script(model)(x), eager(model, x), **CLOSE)
    torch.testing.assert_close(torch.jit.trace(model, x)(x), eager(model, x), **CLOSE)


def test_dnrt_export_command(tmp_path, capsys):
    config = tmp_path / "tiny.py"
    config.write_text(TINY.replace("epochs = 2", "epochs = 1"))
    assert main(["train", "-c", str(config), "--output_dir", str(tmp_path / "run")]) == 0
    checkpoint = tmp_path / "run" / "checkpoint.pth"
    capsys.readouterr()
    assert main(["export", "-r", str(checkpoint), "--format", "pt2"]) == 0
    out = capsys.readouterr().out
    assert f"as pt2 to {tmp_path / 'run' / 'checkpoint.pt2'}" in out and "max |export - eager|" in out
    from dnrt.tool.rundir import load_run

    trained, _, _ = load_run(checkpoint)
    x = torch.randn(4, 3, 8, 8)
    program = torch.export.load(str(tmp_path / "run" / "checkpoint.pt2")).module()
    torch.testing.assert_close(program(x), eager(trained, x), **CLOSE)
    assert main(["export", "-r", str(tmp_path / "none.pth"), "--format", "onnx"]) == 1
    assert "error: checkpoint not found" in capsys.readouterr().err
    assert main(["export", "-r", str(checkpoint), "--format", "torchscript", "--out", str(checkpoint)]) == 1
    assert "error: the export would overwrite its checkpoint" in capsys.readouterr().err
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 0  # still the checkpoint
