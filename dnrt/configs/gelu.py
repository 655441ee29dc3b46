# Baseline: ViT-Tiny with GELU, cross-entropy only, CIFAR-100.
from _base_ import *  # noqa: F403

act = "gelu"
output_dir = "./runs/vit_tiny_cifar100_gelu"
