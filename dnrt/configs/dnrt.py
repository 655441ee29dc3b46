# DNRT: RAA in place of every activation and ARR (weight 20 on CIFAR-100) on ViT-Tiny, CIFAR-100.
from _base_ import *  # noqa: F403

act = "raa"
criterion = "arr"
arr_loss_coef = 20.0
need_targets = True
output_dir = "./runs/vit_tiny_cifar100_dnrt"
