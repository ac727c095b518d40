"""Training throughput of multi-task rankers: mtl's MMoE / HoME against torch-rechub's MMoE.

Every variant trains on the same encoded tensors (mtl's data layer: Census-Income
from ``../shared/data`` relative to the repo root, and the synthetic CTR log),
with the same batch size (1024), epochs and Adam(lr=1e-3). mtl's models are built
as ``mtl train`` builds them, from their ``_target_`` configs
(``conf/model/mmoe.yaml``, ``conf/model/home.yaml``, the ``embedding`` node of
``conf/train.yaml``, ``conf/optim/adam.yaml``) into a
:class:`~mtl.models.rec.ranker.Ranker`. mtl's MMoE is the same network as
rechub's ``MMOE`` (:data:`RECHUB_LAYOUT`: batch norm in experts, gates and
towers, dropout in experts and towers, rechub's embedding initialisation); the
script stops if the parameter counts differ, or if mtl's MMoE given rechub's
weights predicts differently.

* ``mtl``             -- :class:`mtl.training.rec_module.RecModule` (ranker +
  loss) in a plain loop over mtl's :class:`TensorBatchLoader` (tensor slicing).
* ``mtl_trainer``     -- the same model trained by pytorch-lightning's Trainer, as
  ``mtl train`` runs it (``rec_lightning.py``): what a user's run gets.
* ``mtl_bf16``        -- the same under CPU bf16 autocast (``precision: bf16-mixed``).
* ``mtl_compile``     -- the same with the model ``torch.compile``d (``compile: true``);
  only when asked for. Its first epoch includes the compilation, which the
  median over three or more epochs leaves out.
* ``rechub``          -- torch-rechub's ``MMOE`` fed the way its trainers do:
  a ``torch.utils.data.DataLoader`` over its ``TorchDataset`` of per-feature
  arrays (per-sample indexing and collation).
* ``rechub_tensor``   -- the same rechub model fed by the same in-memory tensor
  slicing as mtl, to separate the data path from the model.

Epochs are interleaved (epoch e of every variant, then epoch e + 1), so the
variants share the machine's load. Throughput = train rows / median epoch
time. Test AUC per task after the last epoch. With ``--seeds N`` every variant
trains N times (initialisation and batch order from seeds 0..N-1, same split):
AUC is reported as mean +- std over seeds, the speed-up with its range over
seeds.

torch-rechub is optional: install it in its own environment (never let it pull
a CUDA torch), then run the script with that interpreter::

    python -m venv --system-site-packages /tmp/rechub-venv
    /tmp/rechub-venv/bin/pip install --no-deps torch-rechub
    /tmp/rechub-venv/bin/pip install scikit-learn pandas tqdm   # its import-time deps
    /tmp/rechub-venv/bin/python benchmarks/rec_train.py [--quick]

Without it the rechub variants are skipped with a message.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO_ROOT,
    base_parser,
    environment,
    fmt_num,
    markdown_table,
    median,
    report_written,
    setup_process,
    write_json,
)
from rec_lightning import OneOptimizerRecModule, trainer_epoch_runner

from mtl.data.datamodule import RecDataModule
from mtl.data.features import FeatureSpec
from mtl.data.tabular import RecBatch, TabularTensors
from mtl.data.tensor_loader import TensorBatchLoader
from mtl.models.rec.ranker import Ranker
from mtl.training.build import build, build_net
from mtl.training.compile import compile_model
from mtl.training.gate_config import model_config as gate_model_config
from mtl.training.rec_module import RecModule

CENSUS_PATH = REPO_ROOT.parent / "shared" / "data" / "census-income-kdd" / "census-income.test.gz"
CONF_DIR = REPO_ROOT / "conf"
BATCH_SIZE = 1024
LR = 1e-3
EMBED_DIM = 16
"""One width for every categorical feature: rechub's embedding layer requires it."""
EMBED_INIT_STD = 1e-4
"""rechub's ``SparseFeature`` default initialiser, ``RandomNormal(0, 1e-4)``; mtl's
embedding gets the same (its own default is 0.01)."""
SIZES: dict[str, dict[str, Any]] = {
    # conf/experiment/census_mmoe.yaml: the MMoE paper's census setting, CPU-sized
    "small": {"num_experts": 8, "expert_hidden": [64], "tower_hidden": [32], "dropout": 0.1},
    # conf/model/mmoe.yaml defaults
    "large": {"num_experts": 8, "expert_hidden": [256, 128], "tower_hidden": [64], "dropout": 0.1},
}
"""MMoE sizes shared by mtl's and rechub's MMoE."""
RECHUB_LAYOUT = {"expert_norm": True, "tower_norm": True, "gate_norm": True}
"""rechub's MMOE builds every MLP as ``Linear -> BatchNorm -> act -> Dropout``: experts
``Linear -> BN -> ReLU -> Dropout``, gates ``Linear -> BN -> Softmax``, towers
``Linear -> BN -> ReLU -> Dropout -> Linear``. These options (with
``expert_dropout = dropout``) make mtl's MMoE the same network, parameter for
parameter; :func:`bench_dataset` checks that the counts agree."""
MMOE_CFG: dict[str, Any] = dict(SIZES["small"])
ModuleT = TypeVar("ModuleT", bound=RecModule)


def config_node(*parts: str) -> dict[str, Any]:
    """A ``conf/`` YAML file (or one node of it) as a plain dict, interpolations unresolved.

    Example:
        >>> config_node("model", "mmoe.yaml")["_target_"]
        'mtl.models.rec.MMoE'
    """
    *path, last = parts
    if last.endswith(".yaml"):
        node = OmegaConf.load(CONF_DIR.joinpath(*path, last))
    else:  # a key of the file named before it
        node = OmegaConf.load(CONF_DIR.joinpath(*path))[last]
    return dict(OmegaConf.to_container(node, resolve=False))  # type: ignore[arg-type]


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """``conf/model/<name>.yaml`` with ``overrides``: what ``mtl train model=<name>`` builds."""
    return {**gate_model_config(name), **overrides}


def model_name(config: dict[str, Any]) -> str:
    """A model config's class name, lower case (``mmoe``, ``home``)."""
    return str(config["_target_"]).rsplit(".", 1)[-1].lower()


def mmoe_config() -> dict[str, Any]:
    """mtl's MMoE in rechub's layout at the chosen :data:`SIZES` (``MMOE_CFG``)."""
    return model_config("mmoe", **RECHUB_LAYOUT, expert_dropout=MMOE_CFG["dropout"], **MMOE_CFG)


def home_config() -> dict[str, Any]:
    """mtl's HoME with its ``conf/model/home.yaml`` defaults (no rechub counterpart)."""
    return model_config("home")


def embedding_config() -> dict[str, Any]:
    """``conf/train.yaml``'s feature embedding with rechub's initialisation."""
    return {**config_node("train.yaml", "embedding"), "init_std": EMBED_INIT_STD}


def optimizer_config() -> dict[str, Any]:
    """``conf/optim/adam.yaml`` at :data:`LR`."""
    return {**config_node("optim", "adam.yaml"), "lr": LR}


def build_ranker(dm: RecDataModule, model: dict[str, Any], fold: bool = True) -> Ranker:
    """The ranker ``mtl train`` builds for ``model`` on ``dm``'s features (global RNG);
    ``fold=False`` as ``embedding.fold=false``."""
    embedding = {**embedding_config(), "fold": fold}
    cfg = OmegaConf.create({"kind": "rec", "embedding": embedding, "model": model})
    net, _ = build_net(cfg, dm)
    assert isinstance(net, Ranker)
    return net


def rechub_available() -> str | None:
    """torch-rechub's version, or None when it cannot be imported."""
    try:
        import torch_rechub
    except ImportError:
        return None
    return str(getattr(torch_rechub, "__version__", "unknown"))


def load_data(name: str, quick: bool) -> RecDataModule:
    """Census-Income or the synthetic CTR log, encoded by mtl's data layer."""
    if name == "census":
        kw: dict[str, Any] = {"n_rows": 20_000} if quick else {}
        dm = RecDataModule(
            source="census_income",
            path=str(CENSUS_PATH),
            source_kwargs=kw,
            batch_size=BATCH_SIZE,
            eval_batch_size=8192,
            embed_dim=EMBED_DIM,
        )
    elif name == "synthetic":
        kw = {"n": 25_000} if quick else {}
        dm = RecDataModule(
            source="synthetic_ctr",
            source_kwargs=kw,
            batch_size=BATCH_SIZE,
            eval_batch_size=8192,
            embed_dim=EMBED_DIM,
        )
    else:
        raise ValueError(f"unknown dataset {name!r}")
    dm.setup("fit")
    return dm


def tensor_batches(t: TabularTensors, epoch: int, seed: int = 0) -> Iterator[TabularTensors]:
    """Shuffled mini-batches by slicing in-memory tensors (mtl's data path)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(t), generator=g)
    for start in range(0, len(t), BATCH_SIZE):
        yield t.select(order[start : start + BATCH_SIZE])


# ------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One trainer: ``run_epoch(epoch)`` trains an epoch, ``predict(split)`` gives test probs.

    ``run_epoch`` may return the epoch's seconds as it measured them itself (the
    Lightning variant leaves its fit's set-up out); otherwise it is timed around.
    """

    name: str
    model_name: str
    run_epoch: Callable[[int], float | None]
    predict: Callable[[TabularTensors], Tensor]
    num_params: int
    epoch_times: list[float] = field(default_factory=list)


def mtl_variant(
    dm: RecDataModule,
    model_cfg: dict[str, Any],
    label: str,
    bf16: bool = False,
    seed: int = 0,
    compiled: bool = False,
    fold: bool = True,
) -> Variant:
    """mtl's RecModule in a plain training loop over its TensorBatchLoader.

    With ``bf16`` the forward runs under CPU bf16 autocast (what the trainer's
    ``precision: bf16-mixed`` does); weights, optimizer and losses stay float32.
    ``seed`` sets the initialisation and the batch order. ``compiled`` compiles
    the model in place as ``mtl train compile=true`` does. ``fold=False`` gathers
    every embedding (``embedding.fold=false``), the A/B of the fold.
    """
    module = _seeded_module(RecModule, dm, model_cfg, seed, fold=fold)
    # as `mtl train compile=true`: the model only, not the embedding
    compile_model(module.net.model, compiled)
    opt = module.configure_optimizers()["optimizer"]
    loader: TensorBatchLoader = dm.train_dataloader()
    loader.seed += seed * 1_000_003  # seed 0: the datamodule's own order

    def run_epoch(epoch: int) -> None:
        module.train()
        loader.set_epoch(epoch)
        for batch in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = module(batch)
            loss, _ = module.compute_loss(out, batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    n = sum(p.numel() for p in module.parameters())
    return Variant(label, model_name(model_cfg), run_epoch, _predictor(module), n)


def trainer_variant(dm: RecDataModule, model_cfg: dict[str, Any], seed: int = 0) -> Variant:
    """mtl's RecModule trained by pytorch-lightning's Trainer, as ``mtl train`` does.

    Same module, optimizer, loader and seeds as :func:`mtl_variant`
    (``rec_lightning.py`` says how the Trainer is set up and timed).
    """
    module = _seeded_module(OneOptimizerRecModule, dm, model_cfg, seed)
    loader: TensorBatchLoader = dm.train_dataloader()
    loader.seed += seed * 1_000_003  # as in mtl_variant

    n = sum(p.numel() for p in module.parameters())
    run_epoch = trainer_epoch_runner(module, loader)
    return Variant("mtl_trainer", model_name(model_cfg), run_epoch, _predictor(module), n)


def _seeded_module(
    cls: type[ModuleT], dm: RecDataModule, model_cfg: dict[str, Any], seed: int, fold: bool = True
) -> ModuleT:
    """A ``cls`` around ``model_cfg``'s ranker on ``dm``, initialised from ``seed``.

    The optimizer is ``conf/optim/adam.yaml``'s at :data:`LR`.
    """
    torch.manual_seed(seed)
    net = build_ranker(dm, model_cfg, fold=fold)
    return cls(
        net=net,
        optimizer=build(optimizer_config(), what="optim"),
        seed=seed,
        diagnostics=False,
    )


def _predictor(module: RecModule) -> Callable[[TabularTensors], Tensor]:
    """``predict(tensors) -> (N, tasks)`` probabilities of ``module`` in eval mode."""

    @torch.no_grad()
    def predict(t: TabularTensors) -> Tensor:
        module.eval()
        out = module(RecBatch(cat=t.cat_BF, num=t.num_BF, labels=t.labels_BT))
        preds = module.predictions(out)
        return torch.stack([preds[task] for task in module.task_names], dim=1)

    return predict


def rechub_model(
    spec: FeatureSpec, dropout: float | None = None
) -> tuple[nn.Module, list[str], list[str]]:
    """torch-rechub's MMOE over the same features and sizes as mtl's MMoE.

    ``dropout`` overrides ``MMOE_CFG["dropout"]`` (experts and towers).
    """
    p = MMOE_CFG["dropout"] if dropout is None else dropout
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE

    sparse = [f"c{j}" for j in range(spec.n_categorical)]
    dense = [f"n{j}" for j in range(spec.n_numeric)]
    features = [
        SparseFeature(name, vocab_size=f.vocab_size + 1, embed_dim=f.embed_dim)
        for name, f in zip(sparse, spec.categorical, strict=True)
    ] + [DenseFeature(name) for name in dense]
    tower = {"dims": MMOE_CFG["tower_hidden"], "dropout": p, "activation": "relu"}
    model = MMOE(
        features=features,
        task_types=["classification"] * len(spec.tasks),
        n_expert=MMOE_CFG["num_experts"],
        expert_params={
            "dims": MMOE_CFG["expert_hidden"],
            "dropout": p,
            "activation": "relu",
        },
        tower_params_list=[dict(tower) for _ in spec.tasks],
    )
    return model, sparse, dense


def copy_rechub_into_mtl(rechub: nn.Module, module: RecModule, sparse: list[str]) -> None:
    """Give mtl's MMoE (built with :data:`RECHUB_LAYOUT`) the weights of rechub's ``MMOE``.

    rechub's ``MLP`` holds four modules per hidden layer (``Linear``,
    ``BatchNorm1d``, activation, ``Dropout``), so hidden layer ``l`` is
    ``mlp.{4 l}`` / ``mlp.{4 l + 1}``, and a tower's output ``Linear`` follows
    the last one.
    """
    sd = rechub.state_dict()
    model = module.net.model
    bank = model.mixture.experts
    stats = ("weight", "bias", "running_mean", "running_var")
    with torch.no_grad():
        for j, name in enumerate(sparse):
            module.net.embedding.feature_weight(j).copy_(sd[f"embedding.embed_dict.{name}.weight"])
        for layer in range(len(bank.dims) - 1):
            H = bank.dims[layer + 1]
            for e in range(bank.num_experts):
                src = f"experts.{e}.mlp."
                bank.weights[layer][e].copy_(sd[f"{src}{4 * layer}.weight"].T)
                bank.biases[layer][e].copy_(sd[f"{src}{4 * layer}.bias"])
                for st in stats:
                    getattr(bank.norms[layer], st)[e * H : (e + 1) * H].copy_(
                        sd[f"{src}{4 * layer + 1}.{st}"]
                    )
        for i, task in enumerate(model.tasks):
            gate = model.mixture.gates[task]
            gate.proj.weight.copy_(sd[f"gates.{i}.mlp.0.weight"])
            gate.proj.bias.copy_(sd[f"gates.{i}.mlp.0.bias"])
            for st in stats:
                getattr(gate.logit_norm, st).copy_(sd[f"gates.{i}.mlp.1.{st}"])
            tower = model.towers.towers[task]
            linears = [m for m in tower.mlp if isinstance(m, nn.Linear)]
            norms = [m for m in tower.mlp if isinstance(m, nn.BatchNorm1d)]
            n_hidden = len(linears)
            for layer, (linear, norm) in enumerate(zip(linears, norms, strict=True)):
                src = f"towers.{i}.mlp."
                linear.weight.copy_(sd[f"{src}{4 * layer}.weight"])
                linear.bias.copy_(sd[f"{src}{4 * layer}.bias"])
                for st in stats:
                    getattr(norm, st).copy_(sd[f"{src}{4 * layer + 1}.{st}"])
            tower.head.weight.copy_(sd[f"towers.{i}.mlp.{4 * n_hidden}.weight"])
            tower.head.bias.copy_(sd[f"towers.{i}.mlp.{4 * n_hidden}.bias"])


def same_network_check(dm: RecDataModule, mmoe: dict[str, Any]) -> dict[str, float]:
    """Max difference of mtl's and rechub's predictions from the same weights.

    rechub's weights are copied into mtl's MMoE (its ranker folds the embedding
    into the first layer at this batch size, as in training); both then predict
    one training batch in eval mode (running statistics) and, with dropout off,
    in training mode (batch statistics). Raises if they differ by more than
    float rounding.
    """
    batch = next(tensor_batches(dm.tensors("train"), 0))
    out: dict[str, float] = {}
    for mode, dropout in (("eval", MMOE_CFG["dropout"]), ("train", 0.0)):
        rechub, sparse, dense = rechub_model(dm.spec, dropout=dropout)
        cfg = {**mmoe, "dropout": dropout, "expert_dropout": dropout}
        module = RecModule(net=build_ranker(dm, cfg), diagnostics=False)
        copy_rechub_into_mtl(rechub, module, sparse)
        rechub.train(mode == "train")
        module.train(mode == "train")
        with torch.no_grad():
            p_rechub = rechub(as_feature_dict(batch, sparse, dense))
            res = module(RecBatch(cat=batch.cat_BF, num=batch.num_BF, labels=batch.labels_BT))
            preds = module.predictions(res)
            p_mtl = torch.stack([preds[t] for t in module.task_names], dim=1)
        out[mode] = float((p_mtl - p_rechub).abs().max())
    if max(out.values()) > 1e-4:
        raise RuntimeError(f"mtl's and rechub's MMoE disagree on the same weights: {out}")
    return out


def as_feature_dict(t: TabularTensors, sparse: list[str], dense: list[str]) -> dict[str, Tensor]:
    """rechub's input: one ``(B,)`` tensor per feature name."""
    x = {name: t.cat_BF[:, j] for j, name in enumerate(sparse)}
    x.update({name: t.num_BF[:, j] for j, name in enumerate(dense)})
    return x


def rechub_variants(dm: RecDataModule, seed: int = 0) -> list[Variant]:
    """rechub's MMOE fed by its DataLoader path, and by mtl's tensor slicing.

    ``seed`` sets the initialisation and the batch order.
    """
    from torch.utils.data import DataLoader
    from torch_rechub.utils.data import TorchDataset

    train = dm.tensors("train")
    out = []
    for label in ("rechub", "rechub_tensor"):
        torch.manual_seed(seed)
        model, sparse, dense = rechub_model(dm.spec)
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        if label == "rechub":
            arrays = {k: v.numpy() for k, v in as_feature_dict(train, sparse, dense).items()}
            dataset = TorchDataset(arrays, train.labels_BT.numpy())
            g = torch.Generator().manual_seed(seed)
            loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, generator=g)

            def batches(epoch: int, loader: DataLoader = loader) -> Iterator[Any]:
                return iter(loader)
        else:

            def batches(epoch: int, sparse: list[str] = sparse, dense: list[str] = dense) -> Any:
                return (
                    (as_feature_dict(b, sparse, dense), b.labels_BT)
                    for b in tensor_batches(train, epoch, seed)
                )

        def run_epoch(
            epoch: int, model: nn.Module = model, opt: Any = opt, batches: Any = batches
        ) -> None:
            # torch-rechub's MTLTrainer step: BCE on its sigmoid outputs, mean over tasks
            model.train()
            for x, y in batches(epoch):
                probs = model(x)
                n_task = y.shape[1]
                loss = sum(F.binary_cross_entropy(probs[:, i], y[:, i]) for i in range(n_task))
                loss = loss / n_task
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        @torch.no_grad()
        def predict(
            t: TabularTensors,
            model: nn.Module = model,
            sparse: list[str] = sparse,
            dense: list[str] = dense,
        ) -> Tensor:
            model.eval()
            return model(as_feature_dict(t, sparse, dense))

        n = sum(p.numel() for p in model.parameters())
        out.append(Variant(label, "mmoe", run_epoch, predict, n))
    return out


# ------------------------------------------------------------------------- harness
def test_auc(v: Variant, dm: RecDataModule) -> dict[str, float]:
    """Per-task test AUC (binary tasks)."""
    test = dm.tensors("test")
    probs = v.predict(test)
    return {
        task.name: float(binary_auroc(probs[:, j], test.labels_BT[:, j].long()))
        for j, task in enumerate(dm.spec.tasks)
    }


def train_interleaved(variants: list[Variant], epochs: int) -> None:
    """Epoch ``e`` of every variant, then epoch ``e + 1``: the variants share the load."""
    for epoch in range(epochs):
        for v in variants:
            t = time.perf_counter()
            seconds = v.run_epoch(epoch)
            v.epoch_times.append(time.perf_counter() - t if seconds is None else seconds)
        print(
            f"    epoch {epoch}: "
            + ", ".join(f"{v.name}/{v.model_name} {v.epoch_times[-1]:.1f}s" for v in variants),
            flush=True,
        )


def bench_dataset(
    name: str,
    epochs: int,
    quick: bool,
    with_rechub: bool,
    only: list[str] | None = None,
    seeds: int = 1,
) -> dict[str, Any]:
    """Train every variant ``epochs`` epochs, interleaved, on one dataset, once per seed.

    A seed sets every variant's initialisation and batch order; the split is
    the same for all. Throughput pools the epochs of all seeds; test AUC is the
    mean (and standard deviation) over seeds. The speed-up over rechub is the
    median over seeds of each seed's ratio (its variants ran side by side).
    """
    t0 = time.perf_counter()
    dm = load_data(name, quick)
    print(
        f"  {name}: {len(dm.tensors('train')):,} train rows, "
        f"loaded in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    mmoe = mmoe_config()
    home = home_config()
    builders: dict[str, Callable[[int], list[Variant]]] = {
        "mtl": lambda s: [mtl_variant(dm, mmoe, "mtl", seed=s)],
        "mtl_trainer": lambda s: [trainer_variant(dm, mmoe, seed=s)],
        "mtl_bf16": lambda s: [mtl_variant(dm, mmoe, "mtl_bf16", bf16=True, seed=s)],
        "mtl_compile": lambda s: [mtl_variant(dm, mmoe, "mtl_compile", seed=s, compiled=True)],
        "mtl_nofold": lambda s: [mtl_variant(dm, mmoe, "mtl_nofold", seed=s, fold=False)],
        "home": lambda s: [mtl_variant(dm, home, "mtl", seed=s)],
        "home_bf16": lambda s: [mtl_variant(dm, home, "mtl_bf16", bf16=True, seed=s)],
        "rechub": lambda s: rechub_variants(dm, seed=s) if with_rechub else [],
    }
    every = [v for v in builders if v not in ("mtl_compile", "mtl_nofold")]  # only when asked for
    chosen = only or (["mtl", "mtl_trainer", "mtl_bf16", "home", "rechub"] if quick else every)
    same: dict[str, float] | None = None
    if with_rechub and "rechub" in chosen:
        same = same_network_check(dm, mmoe)
        print(
            "    same network: max |p_mtl - p_rechub| from rechub's weights: "
            + ", ".join(f"{k} {v:.1e}" for k, v in same.items()),
            flush=True,
        )
    runs: list[list[Variant]] = []  # per seed, its variants
    aucs: list[list[dict[str, float]]] = []
    for seed in range(seeds):
        if seeds > 1:
            print(f"    seed {seed}:", flush=True)
        variants = [v for key in chosen for v in builders[key](seed)]
        counts = {v.num_params for v in variants if v.model_name == "mmoe"}
        if len(counts) > 1:
            raise RuntimeError(
                f"mtl's and rechub's MMoE differ in parameter count: {sorted(counts)}"
            )
        train_interleaved(variants, epochs)
        runs.append(variants)
        aucs.append([test_auc(v, dm) for v in variants])
    n_train = len(dm.tensors("train"))
    rows = [
        _result_row([run[i] for run in runs], [a[i] for a in aucs], n_train)
        for i in range(len(runs[0]))
    ]
    ref = next((r for r in rows if r["impl"] == "rechub"), None)
    for r in rows:
        if ref is None:
            r["speedup_vs_rechub"] = r["speedup_by_seed"] = None
            continue
        # per seed, from that seed's interleaved epochs; the figure is their median
        r["speedup_by_seed"] = [
            median(ref_t) / median(t)
            for t, ref_t in zip(r["epoch_times_by_seed"], ref["epoch_times_by_seed"], strict=True)
        ]
        r["speedup_vs_rechub"] = median(r["speedup_by_seed"])
    return {
        "dataset": name,
        "train_rows": n_train,
        "tasks": dm.spec.task_names,
        "d_in": sum(f.embed_dim for f in dm.spec.categorical) + dm.spec.n_numeric,
        "seeds": seeds,
        "same_network_max_abs_diff": same,
        "results": rows,
    }


def _result_row(
    per_seed: list[Variant], aucs: list[dict[str, float]], n_train: int
) -> dict[str, Any]:
    """One variant's figures pooled over seeds."""
    v = per_seed[0]
    times = [t for run in per_seed for t in run.epoch_times]
    ep = median(times)
    tasks = list(aucs[0])
    return {
        "impl": v.name,
        "model": v.model_name,
        "params": v.num_params,
        "epoch_times_s": times,
        "epoch_times_by_seed": [run.epoch_times for run in per_seed],
        "median_epoch_s": ep,
        "samples_per_s": n_train / ep,
        "test_auc": {t: statistics.fmean(a[t] for a in aucs) for t in tasks},
        "test_auc_std": {
            t: statistics.stdev([a[t] for a in aucs]) if len(aucs) > 1 else 0.0 for t in tasks
        },
        "test_auc_by_seed": aucs,
    }


def report(points: list[dict[str, Any]]) -> str:
    head = ["dataset", "model", "impl", "params", "epoch s", "samples/s", "x rechub", "test AUC"]
    rows = []
    for p in points:
        several = p.get("seeds", 1) > 1
        for r in p["results"]:
            if several:
                auc = ", ".join(
                    f"{k} {v:.4f} +- {r['test_auc_std'][k]:.4f}" for k, v in r["test_auc"].items()
                )
            else:
                auc = ", ".join(f"{k} {v:.4f}" for k, v in r["test_auc"].items())
            sp = r["speedup_vs_rechub"]
            speed = "-" if sp is None else f"{sp:.1f}x"
            if several and sp is not None:
                by_seed = r["speedup_by_seed"]
                speed += f" ({min(by_seed):.1f}-{max(by_seed):.1f})"
            rows.append(
                [
                    p["dataset"],
                    r["model"],
                    r["impl"],
                    fmt_num(r["params"]),
                    f"{r['median_epoch_s']:.2f}",
                    fmt_num(r["samples_per_s"]),
                    speed,
                    auc,
                ]
            )
    return markdown_table(head, rows)


def main() -> None:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="epochs per variant")
    parser.add_argument(
        "--datasets", nargs="*", default=["census", "synthetic"], help="census and/or synthetic"
    )
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="small", help="MMoE expert/tower sizes"
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=[
            "mtl",
            "mtl_trainer",
            "mtl_bf16",
            "mtl_compile",
            "mtl_nofold",
            "home",
            "home_bf16",
            "rechub",
        ],
        default=None,
        help="run only these (rechub = both rechub feeds); default: all",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train every variant once per seed (initialisation and batch order) and "
        "report test AUC as mean +- std over seeds",
    )
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    MMOE_CFG.clear()
    MMOE_CFG.update(SIZES[args.size])
    process = setup_process(args)
    epochs = args.epochs or (3 if args.quick else 5)
    if args.variants and "mtl_compile" in args.variants and epochs < 3:
        parser.error(
            f"mtl_compile needs --epochs 3 or more: its first epoch compiles, and the "
            f"median of {epochs} epoch(s) would time the compilation"
        )
    version = rechub_available()
    if version is None:
        print(
            "torch-rechub is not importable: skipping the rechub variants "
            "(see benchmarks/README.md for the install line)",
            flush=True,
        )
    env = environment(torch.device("cpu"))
    env.update(process)
    env["torch_rechub"] = version
    print(
        f"# rec_train on {env['cpu']}, torch {env['torch']}, {env['torch_threads']} threads, "
        f"batch {BATCH_SIZE}, {epochs} epochs, load avg {env['load_avg_1m_start']:.1f}",
        flush=True,
    )
    points = [
        bench_dataset(d, epochs, args.quick, version is not None, args.variants, args.seeds)
        for d in args.datasets
    ]
    print(report(points))
    path = write_json(
        "rec_train",
        {
            "env": env,
            "config": {
                "batch_size": BATCH_SIZE,
                "epochs": epochs,
                "lr": LR,
                "size": args.size,
                "mmoe": mmoe_config(),
                "home": home_config(),
                "embedding": embedding_config(),
                "optim": optimizer_config(),
                "quick": args.quick,
                "variants": args.variants,
                "seeds": args.seeds,
            },
            "points": points,
        },
        args.out,
    )
    report_written(path, args)


if __name__ == "__main__":
    main()
