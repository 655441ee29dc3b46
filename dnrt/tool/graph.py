"""Node classification with GCN / GraphSAGE (PyTorch Geometric, an optional extra): the graph part of Table 5.

Full-batch training; the activation is chosen by `act`; with criterion 'arr' every hidden layer's node
embeddings gather per class in a dnrt.ResponseMemory (the labelled training nodes are the samples).
Runs write config.json and log.txt as `dnrt train` does; `test_acc1` holds the test metric in percent
(ROC-AUC for two classes, else accuracy) and `valid_acc1` the validation one, which picks the epoch reported.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dnrt.errors import DNRTError
from dnrt.tool import rundir

DGRAPH_KEYS = ("x", "y", "edge_index", "train_mask", "valid_mask", "test_mask")


def _pyg() -> Any:
    """torch_geometric, or a DNRTError saying how to install it."""
    try:
        import torch_geometric
    except ImportError:
        raise DNRTError("node classification needs PyTorch Geometric: pip install dnrt[graph]") from None
    return torch_geometric


def _indices(mask: np.ndarray, num_nodes: int) -> torch.Tensor:
    """A split as node indices, from either a boolean mask or an index array (the DGraph-Fin release)."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
        if mask.shape != (num_nodes,):
            raise DNRTError(f"a boolean split mask must have one entry per node ({num_nodes}), got {mask.shape}")
        return torch.from_numpy(np.flatnonzero(mask))
    return torch.from_numpy(mask.astype(np.int64).reshape(-1))


def _make_data(x: torch.Tensor, y: torch.Tensor, edge_index: torch.Tensor, splits: list[torch.Tensor]) -> Any:
    """A torch_geometric Data with undirected edges, split indices and num_classes counted on labelled nodes."""
    from torch_geometric.data import Data
    from torch_geometric.utils import to_undirected

    labelled = torch.cat(splits)
    data = Data(x=x, y=y, edge_index=to_undirected(edge_index, num_nodes=x.shape[0]))
    data.train_idx, data.valid_idx, data.test_idx = splits
    data.num_labels = int(y[labelled].max()) + 1
    return data


def load_dgraphfin(data_root: str) -> Any:
    """DGraph-Fin from data_root/dgraphfin.npz (the public release): features standardised, edges made undirected."""
    _pyg()
    path = Path(data_root).expanduser() / "dgraphfin.npz"
    if not path.is_file():
        raise DNRTError(f"DGraph-Fin not found: {path}; download DGraphFin.zip from https://dgraph.xinye.com "
                        f"and put its dgraphfin.npz into {Path(data_root)}")
    with np.load(path) as raw:  # allow_pickle=False: a data file runs no code
        missing = [k for k in DGRAPH_KEYS if k not in raw.files]
        if missing:
            raise DNRTError(f"{path} lacks {', '.join(missing)}; expected keys {', '.join(DGRAPH_KEYS)}")
        arrays = {k: _array(raw, k, path) for k in DGRAPH_KEYS}
    x = torch.tensor(arrays["x"], dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)  # as the DGraph-Fin baselines do
    edges = torch.tensor(arrays["edge_index"], dtype=torch.long)
    if edges.shape[0] != 2:  # the release stores [E, 2]
        edges = edges.t()
    splits = [_indices(arrays[k], x.shape[0]) for k in ("train_mask", "valid_mask", "test_mask")]
    return _make_data(x, torch.tensor(arrays["y"], dtype=torch.long), edges.contiguous(), splits)


def _array(npz: Any, key: str, path: Path) -> np.ndarray:
    """One array of an .npz file; an object array (loadable only by unpickling) is a DNRTError naming it."""
    try:
        return npz[key]
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise DNRTError(f"cannot read array {key!r} of {path}: {e}") from None
        raise DNRTError(f"array {key!r} of {path} holds Python objects, which load only by unpickling (not done for "
                        f"data files); save it as a numeric array") from None


def load_karate(split_seed: int = 0) -> Any:
    """Zachary's karate club from networkx: one-hot node features, the club each member joined as the label.

    A fixed stratified split (40 % train, 20 % validation, 40 % test) so that seeds change only the training.
    """
    _pyg()
    import networkx as nx
    from sklearn.model_selection import train_test_split

    graph = nx.karate_club_graph()
    y = torch.tensor([graph.nodes[n]["club"] == "Officer" for n in graph.nodes], dtype=torch.long)
    edges = torch.tensor(list(graph.edges), dtype=torch.long).t().contiguous()
    nodes = np.arange(graph.number_of_nodes())
    train, rest = train_test_split(nodes, train_size=0.4, stratify=y.numpy(), random_state=split_seed)
    valid, test = train_test_split(rest, test_size=2 / 3, stratify=y.numpy()[rest], random_state=split_seed)
    splits = [torch.from_numpy(np.sort(s)) for s in (train, valid, test)]
    return _make_data(torch.eye(len(nodes)), y, edges, splits)


def load_digits_knn(split_seed: int = 0, neighbours: int = 8) -> Any:
    """scikit-learn's digits as a k-nearest-neighbour graph of its 1797 images (pixels as features, 10 classes).

    A fixed stratified split (10 % train, 10 % validation, 80 % test): few labels, so the graph has to carry them.
    """
    _pyg()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import kneighbors_graph

    x, y = load_digits(return_X_y=True)
    adjacency = kneighbors_graph(x, neighbours).tocoo()
    edges = torch.tensor(np.stack([adjacency.row, adjacency.col]), dtype=torch.long)
    nodes = np.arange(len(y))
    train, rest = train_test_split(nodes, train_size=0.1, stratify=y, random_state=split_seed)
    valid, test = train_test_split(rest, train_size=1 / 9, stratify=y[rest], random_state=split_seed)
    splits = [torch.from_numpy(np.sort(s)) for s in (train, valid, test)]
    features = torch.tensor(x, dtype=torch.float32)
    features = (features - features.mean(0)) / features.std(0).clamp_min(1e-12)
    return _make_data(features, torch.tensor(y, dtype=torch.long), edges, splits)


GRAPHS = {"dgraphfin": lambda cfg: load_dgraphfin(cfg["data_root"]), "karate": lambda cfg: load_karate(),
          "digits_knn": lambda cfg: load_digits_knn()}


def load_graph(cfg: dict) -> Any:
    """The graph named by cfg['dataset']: 'dgraphfin' (from data_root), 'karate' or 'digits_knn' (bundled)."""
    if cfg["dataset"] not in GRAPHS:
        raise DNRTError(f"unknown graph dataset '{cfg['dataset']}'; graph datasets: {', '.join(GRAPHS)}")
    return GRAPHS[cfg["dataset"]](cfg)


class GNN(nn.Module):
    """GCN or GraphSAGE: hidden graph convolutions each followed by `act`, then a graph convolution to logits."""

    def __init__(self, kind: str, in_features: int, num_classes: int, hidden: int = 128, num_layers: int = 2,
                 act: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        pyg = _pyg()
        convs = {"gcn": lambda a, b: pyg.nn.GCNConv(a, b, cached=True), "sage": pyg.nn.SAGEConv}
        if kind not in convs:
            raise DNRTError(f"unknown graph model '{kind}'; graph models: {', '.join(convs)}")
        if num_layers < 2:
            raise DNRTError(f"num_layers must be at least 2 (one hidden layer), got {num_layers}")
        from dnrt import make_activation

        widths = [in_features] + [hidden] * (num_layers - 1)
        self.convs = nn.ModuleList(convs[kind](a, hidden) for a in widths[:-1])
        self.acts = nn.ModuleList(make_activation(act, num_features=hidden) for _ in widths[:-1])
        self.head = convs[kind](hidden, num_classes)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits of every node and the hidden node embeddings (after each activation), for ARR."""
        hidden = []
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x, edge_index))
            hidden.append(x)
            x = F.dropout(x, self.dropout, self.training)
        return self.head(x, edge_index), hidden


def metric(logits: torch.Tensor, y: torch.Tensor) -> float:
    """ROC-AUC of class 1 for two classes, else accuracy; in percent."""
    if logits.shape[1] == 2:
        from sklearn.metrics import roc_auc_score

        if len(y.unique()) < 2:
            raise DNRTError("ROC-AUC needs both classes among the evaluated nodes")
        return 100.0 * roc_auc_score(y.cpu().numpy(), logits.softmax(1)[:, 1].cpu().numpy())
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


def arr_loss(hidden: list[torch.Tensor], memories: nn.ModuleList, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the mean |h − μ_y| of the labelled nodes (the memories update in train mode); the hidden
    layers have one width, so arr_layer_weighting (docs/method.md §3) makes no difference here."""
    losses = [(h[idx] - memory(h[idx], y[idx])).abs().mean() for h, memory in zip(hidden, memories)]
    return torch.stack(losses).mean()


def best_of(rows: list[dict]) -> dict:
    """The result of a graph run's log: the test metric at the best validation epoch (the first such epoch)."""
    best = max(rows, key=lambda r: (r["valid_acc1"], -r["epoch"]))
    return {"best_valid": best["valid_acc1"], "test_at_best_valid": best["test_acc1"], "epoch": best["epoch"]}


def train_graph(cfg: dict) -> dict:
    """Train a GNN full-batch by a resolved config; log every epoch; return the test metric at the best validation."""
    _pyg()
    if cfg["pretrained"] or cfg["pretrained_file"]:
        raise DNRTError(f"graph runs ({cfg['dataset']}) train from scratch: pretrained / pretrained_file do not apply")
    from timm.optim import create_optimizer_v2

    from dnrt import ResponseMemory

    torch.manual_seed(cfg["seed"])
    device = torch.device(cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_graph(cfg).to(device)
    kwargs = dict(cfg["model_kwargs"])
    model = GNN(cfg["model"], data.num_features, data.num_labels, act=cfg["act"] or "relu", **kwargs).to(device)
    if cfg["criterion"] not in ("ce", "arr"):
        raise DNRTError(f"unknown criterion '{cfg['criterion']}'; use 'ce' or 'arr'")
    use_arr = cfg["criterion"] == "arr"
    memories = nn.ModuleList(
        ResponseMemory(data.num_labels, conv.out_channels, momentum=cfg["arr_momentum"], order=cfg["arr_order"])
        for conv in model.convs if use_arr).to(device)
    optimizer = create_optimizer_v2(model, opt=cfg["optimizer"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                    momentum=cfg["momentum"])
    out = Path(cfg["output_dir"])
    with rundir.owned(out):  # one owner per run folder, as for image runs
        plan = rundir.plan_run(cfg, resumable=False)  # no checkpoints: an unfinished graph run starts again
        if plan.message:
            print(plan.message, flush=True)
        if plan.action == "finished":
            return best_of(rundir.read_log(out))
        rundir.remove_temp_files(out)
        rundir.record(out, rundir.CONFIG, rundir.LOG)
        rundir.write_config(out, cfg, [])
        rundir.start_log(out, 0)
        rows = []
        n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for epoch in range(cfg["epochs"]):
            start = time.time()
            model.train()
            memories.train()
            logits, hidden = model(data.x, data.edge_index)
            ce = F.cross_entropy(logits[data.train_idx], data.y[data.train_idx])
            arr = arr_loss(hidden, memories, data.train_idx, data.y) if use_arr else torch.zeros((), device=device)
            loss = ce + cfg["arr_loss_coef"] * arr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.eval()
            with torch.no_grad():
                logits, _ = model(data.x, data.edge_index)
            row = dict(epoch=epoch, lr=optimizer.param_groups[0]["lr"], train_loss=loss.item(), train_ce=ce.item(),
                       train_arr=arr.item(),
                       test_loss=F.cross_entropy(logits[data.test_idx], data.y[data.test_idx]).item(),
                       valid_acc1=metric(logits[data.valid_idx], data.y[data.valid_idx]),
                       test_acc1=metric(logits[data.test_idx], data.y[data.test_idx]),
                       metric="roc_auc" if data.num_labels == 2 else "accuracy",
                       epoch_time=time.time() - start, n_parameters=n_parameters)
            rundir.append_log(out, row)
            rows.append(row)
        return best_of(rows)
