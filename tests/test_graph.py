"""Node classification: the DGraph-Fin loader, the bundled graphs, GCN/GraphSAGE with RAA and ARR."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dnrt.errors import DNRTError
from dnrt.tool.config import resolve

pytest.importorskip("torch_geometric", reason="needs torch_geometric: pip install -e '.[graph]'")
from dnrt.tool import graph as G  # noqa: E402


def _write_dgraph(path, n=40, edges=120, seed=0, **replace):
    """A small file with the layout of the public dgraphfin.npz: [E, 2] edges, index-array splits, y in 0..3."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    labelled = np.flatnonzero(y < 2)  # classes 2 and 3 are background nodes, in no split
    arrays = dict(x=rng.normal(3.0, 2.0, (n, 17)), y=y, edge_index=rng.integers(0, n, (edges, 2)),
                  train_mask=labelled[::3], valid_mask=labelled[1::3], test_mask=labelled[2::3])
    arrays.update(replace)
    np.savez(path / "dgraphfin.npz", **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_dgraphfin_loader(tmp_path):
    raw = _write_dgraph(tmp_path)
    data = G.load_dgraphfin(str(tmp_path))
    x = raw["x"]
    np.testing.assert_allclose(data.x.numpy(), (x - x.mean(0)) / x.std(0, ddof=1), rtol=1e-4, atol=1e-5)
    expected = {(int(a), int(b)) for a, b in raw["edge_index"]}
    expected |= {(b, a) for a, b in expected}
    assert set(map(tuple, data.edge_index.t().tolist())) == expected
    assert data.train_idx.tolist() == raw["train_mask"].tolist()
    assert data.test_idx.tolist() == raw["test_mask"].tolist()
    assert data.num_labels == 2


def test_dgraphfin_boolean_masks_and_errors(tmp_path):
    raw = _write_dgraph(tmp_path)
    mask = np.zeros(40, dtype=bool)
    mask[raw["train_mask"]] = True
    _write_dgraph(tmp_path, train_mask=mask)
    assert G.load_dgraphfin(str(tmp_path)).train_idx.tolist() == raw["train_mask"].tolist()
    _write_dgraph(tmp_path, valid_mask=None)
    with pytest.raises(DNRTError, match="lacks valid_mask"):
        G.load_dgraphfin(str(tmp_path))
    with pytest.raises(DNRTError, match=r"DGraph-Fin not found: .*elsewhere.dgraphfin\.npz"):
        G.load_dgraphfin(str(tmp_path / "elsewhere"))


def test_bundled_graphs():
    karate = G.load_karate()
    assert (karate.num_nodes, karate.edge_index.shape[1]) == (34, 156)
    assert karate.y.bincount().tolist() == [17, 17]  # Mr. Hi's members and the officer's
    digits = G.load_digits_knn()
    splits = [digits.train_idx, digits.valid_idx, digits.test_idx]
    assert sorted(torch.cat(splits).tolist()) == list(range(1797))
    assert [len(s) for s in splits] == [179, 179, 1439] and digits.num_labels == 10  # 10 %, 10 %, 80 % (floored)


def test_missing_torch_geometric_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_geometric", None)
    with pytest.raises(DNRTError, match=r"pip install dnrt\[graph\]"):
        G.load_karate()


def test_metric_is_auc_for_two_classes_else_accuracy():
    y = torch.tensor([0, 0, 1, 1])
    logits = torch.tensor([[0.0, 0.1], [0.0, 0.4], [0.0, 0.35], [0.0, 0.8]])
    assert G.metric(logits, y) == pytest.approx(75.0)  # 3 of the 4 (positive, negative) pairs ranked right
    three = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0]])
    assert G.metric(three, torch.tensor([0, 1, 2])) == pytest.approx(200 / 3)


@pytest.mark.parametrize("kind", ["gcn", "sage"])
def test_gnn_with_raa_and_arr_trains(kind):
    torch.manual_seed(0)
    from dnrt import RAA, ResponseMemory

    data = G.load_karate()
    model = G.GNN(kind, data.num_features, 2, hidden=8, num_layers=3, act="raa")
    memories = torch.nn.ModuleList(ResponseMemory(2, 8) for _ in model.convs).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        logits, hidden = model(data.x, data.edge_index)
        assert len(hidden) == 2 and hidden[0].shape == (34, 8)
        arr = G.arr_loss(hidden, memories, data.train_idx, data.y)
        loss = F.cross_entropy(logits[data.train_idx], data.y[data.train_idx]) + arr
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    raa = [m for m in model.modules() if isinstance(m, RAA)]
    assert len(raa) == 2 and all(any(p.abs().sum() > 0 for p in m.parameters()) for m in raa)
    assert memories[0].count.sum().item() == 5 * len(data.train_idx)
    # the ARR term is the mean |h - mu| of the labelled nodes: zero against means equal to the responses
    memories.eval()
    h = hidden[0].detach()
    means = torch.stack([h[data.train_idx][data.y[data.train_idx] == k].mean(0) for k in (0, 1)])
    memories[0].mean.copy_(means)
    expected = (h[data.train_idx] - means[data.y[data.train_idx]]).abs().mean()
    assert G.arr_loss([h], memories[:1], data.train_idx, data.y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_train_graph_writes_a_run(tmp_path):
    cfg = resolve(dict(dataset="karate", model="sage", act="raa", criterion="arr", arr_loss_coef=1.0, epochs=4,
                       lr=0.01, optimizer="adam", weight_decay=0.0, device="cpu", output_dir=str(tmp_path),
                       model_kwargs={"hidden": 8, "num_layers": 2, "dropout": 0.0}))
    summary = G.train_graph(cfg)
    rows = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and rows[0]["metric"] == "roc_auc"
    assert all(r["train_arr"] > 0 for r in rows[1:])
    best = max(rows, key=lambda r: r["valid_acc1"])
    assert summary["test_at_best_valid"] == best["test_acc1"]
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "sage"
    with pytest.raises(DNRTError, match="unknown graph model 'gat'"):
        G.train_graph({**cfg, "model": "gat"})



def test_dnrt_train_runs_a_graph_config_and_refuses_eval(tmp_path, capsys):
    from dnrt.tool.cli import main

    config = str(Path(__file__).parent.parent / "configs/paper/gnn_small/digits_knn_gcn_dnrt.py")
    assert main(["train", "-c", config, "--epochs", "2", "--output_dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    best = max(rows, key=lambda r: r["valid_acc1"])
    assert f"done: test {best['test_acc1']:.2f} at the best validation epoch {best['epoch']}" in capsys.readouterr().out
    assert main(["train", "-c", config, "--eval", "-r", str(tmp_path / "checkpoint.pth")]) == 1
    assert "graph runs (digits_knn) train in one go" in capsys.readouterr().err


def test_graph_runs_refuse_pretrained_weights(tmp_path, capsys):
    from dnrt.tool.cli import main

    config = str(Path(__file__).parent.parent / "configs/paper/gnn_small/digits_knn_gcn_dnrt.py")
    assert main(["train", "-c", config, "--pretrained", "True", "--output_dir", str(tmp_path)]) == 1
    assert "graph runs (digits_knn) train from scratch: pretrained / pretrained_file do not apply" in \
        capsys.readouterr().err


def test_dgraphfin_object_array_is_one_line_naming_file_and_key(tmp_path):
    _write_dgraph(tmp_path, y=np.array([{"label": 1}] * 40, dtype=object))
    with pytest.raises(DNRTError) as error:
        G.load_dgraphfin(str(tmp_path))
    assert str(error.value) == (f"array 'y' of {tmp_path / 'dgraphfin.npz'} holds Python objects, which load only by "
                                f"unpickling (not done for data files); save it as a numeric array")
