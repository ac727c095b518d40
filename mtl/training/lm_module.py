"""LightningModule for (MoE) language models, and the aux-loss-free bias callback.

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

Checkpoints carry the tokenizer (state + fingerprint); resuming with data whose
vocabulary differs raises :class:`VocabularyMismatchError` before any weight is
loaded.
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
from mtl.moe import RoutingStats, SigmoidBiasGate
from mtl.training.expert_load import ExpertLoad
from mtl.training.schedules import OptimizerFactory, SchedulerFactory, optimizers_with_schedule
from mtl.training.step_logging import step_metrics_due


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
        self._step_start: float | None = None

    default_monitor = "val/loss"
    """The key checkpoints watch unless the config names another."""
    monitor_prefixes: tuple[str, ...] = ("val/moe/",)
    """Routing keys a run may also monitor (per layer)."""

    def monitor_keys(self) -> list[str]:
        """Validation keys this module logs (per-layer routing keys aside)."""
        return ["val/loss", "val/ppl"]

    # ------------------------------------------------------------------ model
    def forward(self, idx_BT: Tensor, targets_BT: Tensor | None = None) -> LMOutput:
        return self.net(idx_BT, targets_BT)

    def _log_routing(self, stats: Mapping[int, RoutingStats], split: str, batch_size: int) -> None:
        if not stats:
            return
        on_step = split == "train"
        per_name: dict[str, list[Tensor]] = {}
        for i, st in stats.items():
            for name, value in st.as_dict().items():
                self.log(
                    f"moe/layer{i}/{name}" if on_step else f"{split}/moe/layer{i}/{name}",
                    value,
                    on_step=on_step,
                    on_epoch=not on_step,
                    batch_size=batch_size,
                )
                per_name.setdefault(name, []).append(value)
        for name, values in per_name.items():
            key = f"moe/{name}" if on_step else f"{split}/moe/{name}"
            self.log(
                key,
                torch.stack(values).mean(),
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
            )

    # --------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        inputs_BT, targets_BT = batch
        out = self(inputs_BT, targets_BT)
        assert out.loss is not None
        ce = out.loss
        loss = ce + out.aux_loss
        B = inputs_BT.shape[0]
        # Step values only where the logger or the progress bar reads them: a step logs
        # about 20 keys (routing statistics per layer), ~0.25 ms each on CPU.
        if step_metrics_due(self, batch_idx):
            self.log("train/loss", ce, prog_bar=True, batch_size=B)
            self.log("train/ppl", torch.exp(ce.detach()), batch_size=B)
            if out.aux_losses:
                self.log("train/aux_loss", out.aux_loss, batch_size=B)
                for name, value in out.aux_losses.items():
                    self.log(f"train/aux/{name}", value, batch_size=B)
            self._log_routing(out.layer_stats, "train", B)
        return {"loss": loss, "layer_stats": out.layer_stats}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_start is None or not step_metrics_due(self, batch_idx):
            return
        if self.device.type == "cuda":  # kernels run asynchronously: wait for the step
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._step_start
        tokens = batch[0].numel()
        self.log(
            "train/tokens_per_s",
            tokens / max(seconds, 1e-9),
            prog_bar=True,
            batch_size=batch[0].shape[0],
        )

    # ------------------------------------------------------------- evaluation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs_BT, targets_BT = batch
        out = self(inputs_BT, targets_BT)
        assert out.loss is not None
        ce = out.loss
        self.val_loss.update(ce, weight=targets_BT.numel())
        self._log_routing(out.layer_stats, "val", inputs_BT.shape[0])
        self.val_load.update(out.layer_stats)
        return ce

    def on_validation_epoch_start(self) -> None:
        self.val_load.reset()

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))

    # --------------------------------------------------------------- optimiser
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.net.parameters() if p.requires_grad]
        # Decay the matrices only: biases and norm gains are not weights to shrink.
        groups = [
            {"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        if self.optimizer is None:
            return {"optimizer": torch.optim.AdamW(groups, lr=3e-3)}
        return optimizers_with_schedule(self.optimizer(groups), self.scheduler)

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint["lm_tokenizer"] = {
                "state": self.tokenizer.state_dict(),
                "fingerprint": self.tokenizer.fingerprint(),
                "vocab_size": self.tokenizer.vocab_size,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
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


class AuxFreeBiasUpdate(pl.Callback):
    """DeepSeek-V3's auxiliary-loss-free balancing, applied after every optimiser step.

    For every MoE layer whose gate is a :class:`~mtl.moe.SigmoidBiasGate`, calls
    ``gate.update_bias(tokens_per_expert_E)`` with the step's token counts (taken
    from the ``layer_stats`` that :meth:`LMModule.training_step` returns; summed
    over gradient-accumulation micro-batches and over ranks), so the selection
    bias moves load toward balance. Logs ``moe/layer{i}/bias_absmax``.

    Example:
        >>> trainer = pl.Trainer(callbacks=[AuxFreeBiasUpdate()])  # doctest: +SKIP
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[int, Tensor] = {}

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not isinstance(outputs, Mapping) or not outputs.get("layer_stats"):
            return
        gates = {
            i: layer.gate
            for i, layer in pl_module.net.moe_layers().items()
            if isinstance(layer.gate, SigmoidBiasGate)
        }
        for i in gates:
            stats = outputs["layer_stats"].get(i)
            if stats is not None:
                counts = stats.tokens_per_expert_E.detach().float()
                self._pending[i] = self._pending[i] + counts if i in self._pending else counts
        if (batch_idx + 1) % max(1, int(trainer.accumulate_grad_batches)) != 0:
            return
        log_now = step_metrics_due(pl_module, batch_idx)
        for i, counts_E in self._pending.items():
            if trainer.world_size > 1:
                counts_E = trainer.strategy.reduce(counts_E, reduce_op="sum")
            gates[i].update_bias(counts_E)
            if not log_now:
                continue
            pl_module.log(
                f"moe/layer{i}/bias_absmax",
                gates[i].expert_bias_E.abs().max(),
                batch_size=batch[0].shape[0],
            )
        self._pending = {}
