# Quickstart: a small ViT with RAA + ARR on scikit-learn's bundled digits (no download),
# about two minutes on 2 CPU cores.
dataset = "digits"
image_size = 8
model = "vit_tiny_patch4_32"
model_kwargs = {"patch_size": 2, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0, "drop_path_rate": 0.1}
act = "raa"
criterion = "arr"
arr_loss_coef = 5.0
batch_size = 64
lr = 2e-3
epochs = 80
warmup_epochs = 5
warmup_lr = 1e-5
min_lr = 1e-5
optimizer = "adamw"
weight_decay = 0.05
clip_max_norm = 1.0
amp = False
seed = 42
num_workers = 0
device = "cpu"
save_interval = 1000
print_freq = 1000
output_dir = "./runs/quickstart"
