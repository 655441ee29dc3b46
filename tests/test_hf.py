"""DNRT on Hugging Face transformers: tiny random models built from configs, offline."""
import subprocess
import sys

import pytest
import torch

import dnrt

T = pytest.importorskip("transformers")
hf = pytest.importorskip("dnrt.integrations.hf")


def vit(**kw):
    config = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=32, patch_size=8, num_labels=3, **kw)
    return T.ViTForImageClassification(config)


def bert():
    config = T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=16, num_labels=2)
    return T.BertForSequenceClassification(config)


def deit():
    config = T.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8, num_labels=3)
    return T.DeiTForImageClassification(config)


def roberta():
    config = T.RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=32, num_labels=2)
    return T.RobertaForSequenceClassification(config)


def convnext():
    config = T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3, image_size=32)
    return T.ConvNextForImageClassification(config)


def gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                          bos_token_id=0, eos_token_id=0))


def llama():
    return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=2, vocab_size=50))


IMAGES = torch.randn(4, 3, 32, 32)
TOKENS = torch.randint(1, 50, (4, 9))
MODELS = {"vit": (vit, IMAGES), "bert": (bert, TOKENS), "convnext": (convnext, IMAGES), "deit": (deit, IMAGES),
          "roberta": (roberta, TOKENS)}


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def block_outputs(model, names, x):
    modules, out = dict(model.named_modules()), {}
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: out.__setitem__(n, o)) for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return {n: o[0] if isinstance(o, tuple) else o for n, o in out.items()}


def test_import_dnrt_loads_no_transformers_and_registers_nothing():
    code = "import sys, dnrt, dnrt.integrations; assert 'transformers' not in sys.modules, 'loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import dnrt.integrations.hf as hf, transformers.activations as a; assert 'raa' not in a.ACT2CLS; "
            "hf.register(); assert a.ACT2CLS['raa'] is dnrt.LazyRAA and 'raa_relu' in a.ACT2FN")
    subprocess.run([sys.executable, "-c", "import dnrt; " + code], check=True)


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_replaces_every_gelu_and_keeps_the_outputs(name):
    torch.manual_seed(0)
    build, x = MODELS[name]
    model = build().eval()
    gelus = sum(type(m) is T.activations.GELUActivation for m in model.modules())
    before = logits(model, x)
    dnrt.convert(model, x)
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=1e-5)
    assert gelus == 2 and sum(isinstance(m, dnrt.RAA) for m in model.modules()) == gelus
    assert dnrt.conversion_report(model).replaced == {"GELUActivation": gelus}
    assert not any(type(m) is T.activations.GELUActivation for m in model.modules())


@pytest.mark.parametrize("build, cls", [(gpt2, "NewGELUActivation"), (llama, "SiLUActivation")])
def test_approximated_gelu_and_silu_convert_only_on_request(build, cls):
    model = build().eval()
    with pytest.raises(dnrt.DNRTError, match=rf"kept: {cls} ×2 \(converted only on request: replace='all' or "
                                             rf"replace=\({cls},\)"):
        dnrt.convert(model, TOKENS)
    assert not any(isinstance(m, dnrt.RAA) for m in model.modules())
    dnrt.convert(model, TOKENS, replace="all")
    assert dnrt.conversion_report(model).replaced == {cls: 2}
    assert sum(isinstance(m, dnrt.RAA) for m in model.modules()) == 2


@pytest.mark.parametrize("name, layers", [("vit", ["vit.layers.0", "vit.layers.1"]),
                                          ("bert", ["bert.encoder.layer.0", "bert.encoder.layer.1"]),
                                          ("deit", ["deit.layers.0", "deit.layers.1"]),
                                          ("roberta", ["roberta.encoder.layer.0", "roberta.encoder.layer.1"])])
def test_arr_auto_finds_the_blocks_and_takes_the_class_token(name, layers):
    torch.manual_seed(0)
    build, x = MODELS[name]
    model = build().eval()
    arr = dnrt.ARR(model, num_classes=3)
    assert arr.layers == layers
    raw = block_outputs(model, layers, x)
    for layer in layers:
        torch.testing.assert_close(arr.responses[layer], raw[layer][:, 0])
    assert arr.chosen == dict.fromkeys(layers, "cls") and "reduce='auto' (cls)" in repr(arr)


def test_arr_auto_pools_convnext_stages_and_averages_gpt2_tokens():
    model = convnext().eval()
    arr = dnrt.ARR(model, num_classes=3)
    assert arr.layers == ["convnext.encoder.stages.0", "convnext.encoder.stages.1"]
    raw = block_outputs(model, arr.layers, IMAGES)
    torch.testing.assert_close(arr.responses[arr.layers[1]], raw[arr.layers[1]].mean(dim=(2, 3)))
    decoder = gpt2().eval()
    arr = dnrt.ARR(decoder, num_classes=3)
    raw = block_outputs(decoder, arr.layers, TOKENS)
    assert arr.layers == ["transformer.h.0", "transformer.h.1"] and set(arr.chosen.values()) == {"mean"}
    torch.testing.assert_close(arr.responses[arr.layers[0]], raw[arr.layers[0]].mean(dim=1))


def trained_looking(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = dnrt.convert(vit(), IMAGES)
    trained_looking(model)
    arr = dnrt.ARR(model, num_classes=3, weight=2.0)
    model.train()
    model(IMAGES)
    arr.loss(torch.tensor([0, 1, 2, 0])).backward()
    model.eval()
    hf.save_pretrained(model, tmp_path, arr=arr)
    loaded = hf.from_pretrained(T.AutoModelForImageClassification, tmp_path).eval()
    assert type(loaded) is T.ViTForImageClassification
    assert isinstance(loaded.vit.layers[1].mlp.activation_fn, dnrt.RAA)
    assert torch.equal(logits(loaded, IMAGES), logits(model, IMAGES))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    arr2 = hf.load_arr(loaded, tmp_path)
    assert (arr2.layers, arr2.weight, arr2.num_classes) == (arr.layers, 2.0, 3)
    assert torch.equal(arr2.memory.mean, arr.memory.mean) and torch.equal(arr2.memory.count, arr.memory.count)


def test_plain_checkpoint_loaded_and_converted_starts_equal(tmp_path):
    torch.manual_seed(0)
    plain = trained_looking(bert()).eval()
    plain.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(T.AutoModelForSequenceClassification, tmp_path).eval()
    dnrt.convert(loaded, TOKENS)
    torch.testing.assert_close(logits(loaded, TOKENS), logits(plain, TOKENS), atol=1e-5, rtol=1e-5)


def test_from_pretrained_refuses_missing_raa_weights(tmp_path):
    model = dnrt.convert(vit(), IMAGES)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in state.items() if "activation_fn.weight" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(dnrt.DNRTError, match="the weights lack 2 tensors of the RAA modules its config records"):
        hf.from_pretrained(T.ViTForImageClassification, tmp_path)


class Batches(torch.utils.data.Dataset):
    """24 samples of two classes: token ids for BERT, images for ViT."""

    def __init__(self, name):
        g = torch.Generator().manual_seed(0)
        self.key = "input_ids" if name == "bert" else "pixel_values"
        shape = (24, 9) if name == "bert" else (24, 3, 32, 32)
        self.x = torch.randint(1, 50, shape, generator=g) if name == "bert" else torch.randn(shape, generator=g)
        self.y = torch.arange(24) % 2

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {self.key: self.x[i], "labels": self.y[i]}


class AtStart(T.TrainerCallback):
    """Copies of the model's and ARR's state as training (re)starts, after a resume has loaded them."""

    def __init__(self, model, arr):
        self.model, self.arr, self.seen = model, arr, None

    def on_train_begin(self, args, state, control, **kwargs):
        clone = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.seen = (clone, {k: v.clone() for k, v in self.arr.state_dict().items()})


def trainer(tmp_path, model, arr, steps, name):
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                               save_steps=1, report_to=[], use_cpu=True, logging_steps=1, learning_rate=1e-3,
                               dataloader_num_workers=0, seed=0, disable_tqdm=True)
    return hf.DNRTTrainer(model=model, args=args, train_dataset=Batches(name), arr=arr)


@pytest.mark.parametrize("name", ["bert", "vit"])  # ViT: transformers 5 saves its keys renamed
def test_trainer_adds_arr_saves_its_memory_and_resumes_it(tmp_path, name):
    torch.manual_seed(0)
    build, x = MODELS[name]
    model = dnrt.convert(build(), x)
    arr = dnrt.ARR(model, num_classes=2, weight=5.0)
    losses = []
    original = arr.loss
    arr.loss = lambda y: losses.append(original(y)) or losses[-1]
    trainer(tmp_path, model, arr, 3, name).train()
    assert len(losses) == 3 and all(loss > 0 for loss in losses[1:])
    assert int(arr.memory.count.sum()) == 3 * 4  # three batches of four went into the memory
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / hf.ARR_FILE).is_file()
    torch.manual_seed(1)
    fresh = dnrt.convert(build(), x)
    arr2 = dnrt.ARR(fresh, num_classes=2, weight=5.0)
    resumed = trainer(tmp_path, fresh, arr2, 4, name)
    start = AtStart(fresh, arr2)
    resumed.add_callback(start)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    weights, memory = start.seen
    assert torch.equal(memory["memory.mean"], arr.memory.mean) and torch.equal(memory["memory.count"],
                                                                               arr.memory.count)
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value), key
    assert int(arr2.memory.count.sum()) == 4 * 4  # the fourth step went on from the restored memory
    (checkpoint / hf.ARR_FILE).unlink()
    (tmp_path / "checkpoint-4" / hf.ARR_FILE).unlink()
    with pytest.raises(dnrt.DNRTError, match="no ARR memory in .*checkpoint-4"):
        trainer(tmp_path, fresh, dnrt.ARR(fresh, num_classes=2), 5, name).train(resume_from_checkpoint=True)


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_hidden_act_raa_builds_trains_and_round_trips(name, tmp_path):
    hf.register()
    torch.manual_seed(0)
    build, x = MODELS[name]
    if name == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=64, image_size=32, patch_size=8,
                                                        num_labels=3, hidden_act="raa"))
    else:
        model = T.BertForSequenceClassification(T.BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, num_labels=2, hidden_act="raa_relu"))
    model(x)  # sizes the LazyRAA modules
    raas = [m for m in model.modules() if isinstance(m, dnrt.RAA)]
    assert len(raas) == 2 and all(m.num_features == 64 and m.channel_dim == -1 for m in raas)
    assert raas[0].base == ("gelu" if name == "vit" else "relu")
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    model(x).logits.sum().backward()
    assert raas[0].weight.grad.abs().sum() > 0
    trained_looking(model).eval()
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(type(model), tmp_path).eval()
    assert torch.equal(logits(loaded, x), logits(model, x))
