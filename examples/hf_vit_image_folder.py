"""Fine-tune a Hugging Face ViT with DNRT (RAA + ARR) on a local image folder, with the transformers Trainer.

    python examples/hf_vit_image_folder.py --data DIR [--model google/vit-base-patch16-224-in21k] [--max-steps 100]

DIR holds one sub-folder per class (torchvision's ImageFolder). Without --model a small ViT is built from a config
(random weights, runs anywhere); with it, the pretrained checkpoint is loaded and converted: its outputs at step 0
are the checkpoint's own. The converted model and ARR's memory are saved to --output-dir, and come back with
dnrt.integrations.hf.from_pretrained and load_arr.
"""
import argparse

import torch
import transformers
from torchvision import datasets, transforms

import dnrt
from dnrt.integrations import hf


class Pixels(torch.utils.data.Dataset):
    """An ImageFolder as the dicts the Trainer passes to the model: pixel_values and labels."""

    def __init__(self, root: str, size: int):
        tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                                 transforms.Normalize([0.5] * 3, [0.5] * 3)])
        self.images = datasets.ImageFolder(root, transform=tf)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x, y = self.images[i]
        return {"pixel_values": x, "labels": y}


def build_model(name: str, num_labels: int, size: int) -> transformers.PreTrainedModel:
    if name:
        return transformers.AutoModelForImageClassification.from_pretrained(
            name, num_labels=num_labels, ignore_mismatched_sizes=True)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                    image_size=size, patch_size=8, num_labels=num_labels)
    return transformers.ViTForImageClassification(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="an image folder: one sub-folder per class")
    parser.add_argument("--model", default="", help="a Hugging Face ViT/DeiT checkpoint (default: a small random ViT)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--arr-weight", type=float, default=5.0, help="λ of ARR (docs/method.md §3)")
    parser.add_argument("--output-dir", default="runs/hf_vit")
    args = parser.parse_args()

    train_set = Pixels(args.data, args.image_size)
    classes = len(train_set.images.classes)
    model = build_model(args.model, classes, args.image_size)
    example = torch.stack([train_set[0]["pixel_values"]])
    dnrt.convert(model, example)  # GELU -> RAA; the checkpoint's outputs are unchanged at step 0
    print(dnrt.conversion_report(model))
    arr = dnrt.ARR(model, num_classes=classes, weight=args.arr_weight)  # the encoder's blocks, class token

    training = transformers.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=5e-4, save_steps=max(args.max_steps // 2, 1), logging_steps=10, report_to=[],
        dataloader_num_workers=0)
    trainer = hf.DNRTTrainer(model=model, args=training, train_dataset=train_set, arr=arr)
    trainer.train()
    hf.save_pretrained(model, args.output_dir, arr=arr)
    print(f"saved the converted model and ARR's memory to {args.output_dir}")


if __name__ == "__main__":
    main()
