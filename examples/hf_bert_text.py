"""Train a small BERT with DNRT (RAA + ARR) on a text classification file, with the transformers Trainer.

    python examples/hf_bert_text.py --data tests/data/sentences.tsv [--max-steps 60]

The file is tab-separated with a header: label, text. A word-level tokenizer is built from it offline (the
`tokenizers` library); the BERT is built from a config with random weights (give --model for a checkpoint and its
own tokenizer). Prints the accuracy on the file before and after training, and saves model and ARR memory.
"""
import argparse
import csv

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import dnrt
from dnrt.integrations import hf


def read(path: str) -> tuple[list[str], list[int]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


def word_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer learnt from the texts themselves, wrapped for transformers."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special))
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]")


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts: list[str], labels: list[int]):
        self.items = [{**tokenizer(t), "labels": y} for t, y in zip(texts, labels)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a .tsv file with columns label and text")
    parser.add_argument("--model", default="", help="a Hugging Face BERT checkpoint (default: a small random BERT)")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--arr-weight", type=float, default=1.0, help="λ of ARR (docs/method.md §3)")
    parser.add_argument("--output-dir", default="runs/hf_bert")
    args = parser.parse_args()

    texts, labels = read(args.data)
    classes = max(labels) + 1
    if args.model:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=classes)
    else:
        tokenizer = word_tokenizer(texts)
        config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                                         num_labels=classes)
        model = transformers.BertForSequenceClassification(config)
    data = Encoded(tokenizer, texts, labels)
    dnrt.convert(model, torch.tensor([data[0]["input_ids"]]))
    print(dnrt.conversion_report(model))
    arr = dnrt.ARR(model, num_classes=classes, weight=args.arr_weight)  # the encoder's layers, [CLS] token

    training = transformers.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3, save_steps=max(args.max_steps // 2, 1), logging_steps=10, report_to=[],
        dataloader_num_workers=0)
    trainer = hf.DNRTTrainer(model=model, args=training, train_dataset=data, arr=arr,
                             data_collator=transformers.DataCollatorWithPadding(tokenizer))
    print(f"accuracy before: {accuracy(trainer, data):.2f}")
    trainer.train()
    print(f"accuracy after: {accuracy(trainer, data):.2f}")
    hf.save_pretrained(model, args.output_dir, arr=arr)
    tokenizer.save_pretrained(args.output_dir)


def accuracy(trainer: transformers.Trainer, data: Encoded) -> float:
    predictions = trainer.predict(data)
    return float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())


if __name__ == "__main__":
    main()
