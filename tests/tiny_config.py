"""The tiny RAA + ARR config the end-to-end tests train: two epochs of a 2-block ViT on synthetic data."""
from pathlib import Path

TINY = """
dataset = "fake"
image_size = 8
model = "vit_tiny_patch4_32"
model_kwargs = {"depth": 2, "embed_dim": 32, "num_heads": 2, "drop_path_rate": 0.0}
act = "raa"
criterion = "arr"
arr_loss_coef = 1.0
batch_size = 32
lr = 1e-3
epochs = 2
warmup_epochs = 1
num_workers = 0
amp = False
device = "cpu"
save_interval = 1
"""


def train_tiny(folder: Path) -> tuple[Path, Path]:
    """Train TINY to the end in `folder`: (its config file, its run folder)."""
    from dnrt.tool.cli import main_py

    config, run = folder / "tiny.py", folder / "run"
    config.write_text(TINY)
    assert main_py(["-c", str(config), "--output_dir", str(run)]) == 0
    return config, run
