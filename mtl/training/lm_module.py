"""LightningModule for (MoE) language models.

Loss: the model's next-token cross-entropy (``LMOutput.loss``) plus its weighted
router losses. Logged:
``train/loss`` (cross-entropy), ``train/aux_loss`` and each router loss,
``train/ppl``, ``train/tokens_per_s``, ``val/loss``, ``val/ppl`` (exp of the
token-weighted mean loss) and per MoE layer ``moe/layer{i}/load_max_over_mean``,
``dropped_fraction``, ``dropped_tokens`` (tokens no expert computed),
``dropped_token_fraction``, ``experts_per_token``, ``router_entropy`` (plus their
mean over layers); ``val_load`` keeps each layer's per-expert load. Training
values are logged on the steps that the logger writes or the progress bar shows
(:func:`~mtl.training.step_logging.step_metrics_due`), not on every step.

Distributed runs (``trainer=ddp``): every logged value covers every rank's tokens.
A training step's losses are the means over the ranks (equal batches: the global
batch's loss) and its routing statistics those of the global batch
(:func:`~mtl.training.routing_totals.sum_over_ranks`); the validation loss is a
token-weighted torchmetrics mean, and the validation routing statistics and loads
are those of the whole pass over all ranks
(:class:`~mtl.training.routing_totals.RoutingTotals`): ``dropped_tokens`` is the
pass's total and ``load_max_over_mean`` comes from the pass's summed load.

Checkpoints carry the tokenizer (state + fingerprint); resuming with data whose
vocabulary differs raises :class:`VocabularyMismatchError` before any weight is
loaded.

Expert parallelism (``net.expert_parallel > 1``) lives in
:mod:`mtl.training.lm_expert_parallel`, which the hooks below call; the
aux-loss-free bias callback :class:`~mtl.training.aux_free_bias.AuxFreeBiasUpdate`
is re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from mtl.data.tokenizers import Tokenizer
from mtl.models.lm.generate import generate as generate_ids
from mtl.models.lm.transformer import LMOutput, TransformerLM
from mtl.moe.expert_parallel_plan import ExpertParallelPlan
from mtl.moe.group_counts import count_routing_over
from mtl.training.aux_free_bias import AuxFreeBiasUpdate
from mtl.training.expert_load import ExpertLoad, log_load_histograms
from mtl.training.lm_expert_parallel import (
    check_equal_batch_counts,
    configure_expert_parallel,
    gather_expert_checkpoint,
    slice_expert_checkpoint,
)
from mtl.training.ranks import is_multi_process, rank_sum, trainer_world_size
from mtl.training.routing_logging import log_routing
from mtl.training.routing_totals import RoutingTotals, sum_over_ranks
from mtl.training.schedules import OptimizerFactory, SchedulerFactory, optimizers_with_schedule
from mtl.training.step_logging import step_metrics_due

__all__ = ["AuxFreeBiasUpdate", "LMModule", "VocabularyMismatchError", "check_vocabulary"]


class VocabularyMismatchError(ValueError):
    """A checkpoint's tokenizer differs from the data's: token ids would mean other things."""


class LMModule(pl.LightningModule):
    """Train, evaluate and sample a :class:`~mtl.models.lm.TransformerLM`.

    Args:
        net: the language model, built outside.
        tokenizer: the data's tokenizer; stored in checkpoints (state and
            fingerprint) and used by :meth:`generate`.
        tokenizer_state: the same as ``tokenizer.state_dict()`` (how the
            checkpoint's hyper-parameters store it); alternative to ``tokenizer``.
        optimizer: ``optimizer(param_groups)``; ``weight_decay`` applies to matrices
            only (vectors go in a group with none). None: AdamW with lr 3e-3.
        scheduler: ``scheduler(optimizer)``, stepped every step (e.g.
            :func:`mtl.training.schedules.warmup_cosine`); None for a constant rate.
        net_config: the config ``net`` was built from, kept in the checkpoint's
            hyper-parameters so that :func:`mtl.training.build.load_module` can rebuild it.

    Shapes:
        ``forward(idx (B, T)) -> LMOutput`` with ``logits (B, T, V)``.

    Example:
        >>> from mtl.data.tokenizers import CharTokenizer
        >>> tok = CharTokenizer.fit("hello world")
        >>> lm = TransformerLM(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
        ...                    d_ff=32, max_seq_len=8)
        >>> module = LMModule(net=lm, tokenizer=tok)
        >>> len(module.generate("he", max_new_tokens=3, seed=0))
        5
    """

    def __init__(
        self,
        *,
        net: TransformerLM,
        tokenizer: Tokenizer | None = None,
        tokenizer_state: Mapping[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        net_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if tokenizer is not None and tokenizer_state is not None:
            raise ValueError("pass tokenizer or tokenizer_state, not both")
        if tokenizer_state is not None:
            tokenizer = Tokenizer.from_state(dict(tokenizer_state))
        if tokenizer is not None and net.vocab_size != tokenizer.vocab_size:
            raise VocabularyMismatchError(
                f"model has vocab_size={net.vocab_size} but the tokenizer has {tokenizer.vocab_size}"
            )
        self.save_hyperparameters(
            {
                # not "tokenizer": the data module's hparams use that name for the kind
                "tokenizer_state": None if tokenizer is None else tokenizer.state_dict(),
                "net_config": None if net_config is None else dict(net_config),
            },
            logger=False,
        )
        self.net = net
        self.tokenizer: Tokenizer | None = tokenizer
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.val_loss = MeanMetric()
        self.val_load = ExpertLoad()
        """Per MoE layer, the token slots each expert computed in the last validation."""
        self.val_routing = RoutingTotals()
        self._step_start: float | None = None
        self.expert_plan: ExpertParallelPlan | None = None
        """Set in :meth:`configure_model` when ``net.expert_parallel > 1``."""

    default_monitor = "val/loss"
    """The key checkpoints watch unless the config names another."""
    monitor_prefixes: tuple[str, ...] = ("val/moe/",)
    """Routing keys a run may also monitor (per layer)."""

    def monitor_keys(self) -> list[str]:
        """Validation keys this module logs (per-layer routing keys aside)."""
        return ["val/loss", "val/ppl"]

    # ------------------------------------------------------------------ model
    def forward(
        self, idx_BT: Tensor, targets_BT: Tensor | None = None, domain_B: Tensor | None = None
    ) -> LMOutput:
        # Domain ids (DomainTextDataModule's batches) go to a model that routes on them;
        # any other model trains on the same batches without them (a baseline).
        if domain_B is None or getattr(self.net, "domain_embed", None) is None:
            return self.net(idx_BT, targets_BT)
        return self.net(idx_BT, targets_BT, domain_B=domain_B)

    def configure_model(self) -> None:
        # trainer=fsdp (mtl.training.fsdp.FSDPStrategy): shard each transformer block
        # over the ranks; other strategies have no `shard` and leave the model whole.
        shard = getattr(self._trainer.strategy, "shard", None) if self._trainer else None
        if self.net.expert_parallel > 1 and self.expert_plan is None:
            # rank-specific expert shards, ignored by DDP, reduced by the plan
            self.expert_plan = configure_expert_parallel(
                self, self.net, expert_parallel=self.net.expert_parallel, fsdp=shard is not None
            )
        elif is_multi_process():
            # data parallelism: router losses count every rank's tokens (as the expert-parallel
            # plan's do), so a run equals one process on the global batch
            count_routing_over(self.net, torch.distributed.group.WORLD)
        if shard is not None:
            shard(self.net)

    # --------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> dict[str, Any]:
        inputs_BT, targets_BT, *domain_B = batch  # a third field: the domain ids
        out = self(inputs_BT, targets_BT, *domain_B)
        assert out.loss is not None
        ce = out.loss
        loss = ce + out.aux_loss
        B = inputs_BT.shape[0]
        losses = {"train/loss": ce.detach()}
        if out.aux_losses:
            losses["train/aux_loss"] = out.aux_loss.detach()
            losses |= {f"train/aux/{k}": v.detach() for k, v in out.aux_losses.items()}
        layer_stats = out.layer_stats
        world_size = trainer_world_size(self)
        if world_size > 1:
            # Every step on every rank, logged or not: whether a step logs can differ
            # between ranks (the progress bar runs on rank 0 only) and a collective
            # that one rank skips would hang the others. One small vector per step.
            reduce_sum = rank_sum(self)
            mean = reduce_sum(torch.stack(list(losses.values())).float()) / world_size
            losses = dict(zip(losses, mean.unbind(), strict=True))
            layer_stats = sum_over_ranks(layer_stats, reduce_sum)
        # Step values only where the logger or the progress bar reads them: a step logs
        # about 20 keys (routing statistics per layer), each with a fixed host cost
        # that adds up over a step.
        if step_metrics_due(self, batch_idx):
            for key, value in losses.items():
                self.log(key, value, prog_bar=key == "train/loss", batch_size=B)
                if key == "train/loss":
                    self.log("train/ppl", torch.exp(value), batch_size=B)
            log_routing(self, layer_stats, "train", B)
        # layer_stats: summed over the ranks already (AuxFreeBiasUpdate reads them)
        return {"loss": loss, "layer_stats": layer_stats}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_start is None or not step_metrics_due(self, batch_idx):
            return
        if self.device.type == "cuda":  # kernels run asynchronously: wait for the step
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._step_start
        tokens = batch[0].numel() * trainer_world_size(self)  # the global batch's tokens
        self.log(
            "train/tokens_per_s",
            tokens / max(seconds, 1e-9),
            prog_bar=True,
            batch_size=batch[0].shape[0],
        )

    # ------------------------------------------------------------- evaluation
    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        inputs_BT, targets_BT, *domain_B = batch
        out = self(inputs_BT, targets_BT, *domain_B)
        assert out.loss is not None
        ce = out.loss
        self.val_loss.update(ce, weight=targets_BT.numel())
        self.val_routing.update(out.layer_stats)
        return ce

    def on_validation_epoch_start(self) -> None:
        self.val_load.reset()
        self.val_routing.reset()

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # torchmetrics: summed over the ranks
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))
        if trainer_world_size(self) > 1:
            experts = {i: int(layer.num_experts) for i, layer in self.net.moe_layers().items()}
            self.val_routing.reduce(rank_sum(self), experts, self.device)
        stats = self.val_routing.stats()  # the whole pass, every rank's tokens
        self.val_load.update(stats)
        log_routing(self, stats, "val", batch_size=1)
        log_load_histograms(self.loggers, self.val_load.as_dict("val/moe/"), self.global_step)

    # ------------------------------------------------------ expert parallelism
    # (mtl.training.lm_expert_parallel: set-up, checkpoint gathering/slicing, guard)
    def on_validation_start(self) -> None:
        if self.expert_plan is not None:
            check_equal_batch_counts(sum(self.trainer.num_val_batches), self.device)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.expert_plan is not None:
            self.expert_plan.reduce_expert_grads_(self.net)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.expert_plan is None or not gradient_clip_val or gradient_clip_algorithm == "value":
            super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        # the norm of the whole model: every rank's shards count
        self.expert_plan.clip_grad_norm_(self.net, float(gradient_clip_val))

    def _optimizer_params(self) -> list[torch.nn.Parameter]:
        # the optimiser's parameter order (torch numbers them across groups); on load
        # the optimiser does not exist yet, but configure_optimizers builds this order
        return [p for group in self._param_groups() for p in group["params"]]

    # --------------------------------------------------------------- optimiser
    def _param_groups(self) -> list[dict[str, Any]]:
        params = [p for p in self.net.parameters() if p.requires_grad]
        # Decay the matrices only: biases and norm gains are not weights to shrink.
        return [
            {"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self._param_groups()
        if self.optimizer is None:
            return {"optimizer": torch.optim.AdamW(groups, lr=3e-3)}
        return optimizers_with_schedule(self.optimizer(groups), self.scheduler)

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.expert_plan is not None:  # every rank gathers; the file holds whole banks
            gather_expert_checkpoint(
                checkpoint, self.net, self.expert_plan, self._optimizer_params()
            )
        if self.tokenizer is not None:
            checkpoint["lm_tokenizer"] = {
                "state": self.tokenizer.state_dict(),
                "fingerprint": self.tokenizer.fingerprint(),
                "vocab_size": self.tokenizer.vocab_size,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.expert_plan is not None:  # whole banks in the file: keep this rank's experts
            slice_expert_checkpoint(
                checkpoint, self.net, self.expert_plan, self._optimizer_params()
            )
        saved = checkpoint.get("lm_tokenizer")
        if saved is None:
            return
        if self.tokenizer is None:
            self.tokenizer = Tokenizer.from_state(saved["state"])
            return
        check_vocabulary(saved, self.tokenizer)

    # ---------------------------------------------------------------- sampling
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 1.0,
        top_k: int | None = None,
        *,
        seed: int | None = None,
    ) -> str:
        """Continue ``prompt`` by sampling; returns prompt + continuation as text.

        Args:
            prompt: text to continue (an empty prompt starts from a newline, or id 0).
            max_new_tokens: tokens to sample.
            temperature: 0 = greedy, 1 = the model's distribution.
            top_k: sample among the ``top_k`` most likely tokens only.
            seed: seed of a private random generator (reproducible samples).
        """
        if self.tokenizer is None:
            raise ValueError("generate needs a tokenizer (pass tokenizer= or load a checkpoint)")
        ids = self.tokenizer.encode(prompt) if prompt else self._start_ids()
        device = next(self.net.parameters()).device
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(seed)
        # a compiled model (config `compile`) would recompile for every prompt length
        with torch.compiler.set_stance("force_eager"):
            out = generate_ids(
                self.net,
                ids.view(1, -1).to(device),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                generator=gen,
            )
        return self.tokenizer.decode(out[0].cpu())

    def _start_ids(self) -> Tensor:
        assert self.tokenizer is not None
        try:
            return self.tokenizer.encode("\n")
        except ValueError:
            return torch.zeros(1, dtype=torch.long)


def check_vocabulary(saved: Mapping[str, Any], tokenizer: Tokenizer) -> None:
    """Raise :class:`VocabularyMismatchError` unless ``saved`` (a checkpoint's
    ``lm_tokenizer`` entry) describes ``tokenizer``'s vocabulary."""
    if saved.get("fingerprint") == tokenizer.fingerprint():
        return
    other = Tokenizer.from_state(saved["state"])
    raise VocabularyMismatchError(
        "cannot resume: vocabulary mismatch between the checkpoint and the data. The checkpoint "
        f"was trained with a {other.kind} tokenizer of vocab_size={other.vocab_size} "
        f"(fingerprint {saved.get('fingerprint')}); the data's tokenizer is {tokenizer.kind} "
        f"with vocab_size={tokenizer.vocab_size} (fingerprint {tokenizer.fingerprint()}). "
        "Token ids would mean different symbols. Use the same text and tokenizer settings "
        "as the checkpoint, or start a new run."
    )
