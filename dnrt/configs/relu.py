# Baseline: ViT-Tiny with ReLU, cross-entropy only, CIFAR-100.
from _base_ import *  # noqa: F403

act = "relu"
output_dir = "./runs/vit_tiny_cifar100_relu"
