"""The forward step Megatron-Core's pipeline schedules call: ``get_batch`` -> model -> ``loss_func``.

Subclass :class:`GPTTrainStep` for a custom loss (override :meth:`loss_func`, e.g. weight samples by
key-token counts as Accelerate's docs show); the schedule, DDP and the loop stay the same. The loss of a
micro-batch is the loss-mask-weighted token mean; the loop averages micro-batches and the DP group.

Padded vocabulary rows (Megatron pads V to a multiple of 128·TP) are masked out of the softmax, so the
loss is exactly the loss over the true vocabulary (Transformers' loss for a model fine-tuned from HF);
without padding the model's fused ``labels=`` path is used.
"""
from __future__ import annotations

from functools import partial

import torch

from trainer.data import pinned
from trainer.kernels.linear_cross_entropy import IGNORE_INDEX, uses_fused_loss
from trainer.model import current_device


class GPTTrainStep:
    """``forward_step(data_iterator, model)`` for Megatron-Core's ``get_forward_backward_func()``.

    ``vocab_size`` is the true vocabulary (None: no masking). With ``collect_logits=True`` the last stage
    also returns the full-vocabulary logits (gathered over TP) in the loss dict under ``"logits"``.
    """

    #: the metric the loop reports as "the loss" (and evaluates perplexity from)
    loss_key = "lm loss"

    def __init__(self, vocab_size: int | None = None, collect_logits: bool = False):
        self.vocab_size = vocab_size
        self.collect_logits = collect_logits

    def get_batch(self, data_iterator, model) -> dict:
        """The next micro-batch; tensors moved to this rank's device. With the ``pinned_batches`` candidate
        (:func:`trainer.kernels.pinned_batches_on`) through pinned host memory, as BERT's step does: a copy from
        pageable memory waits for the GPU's queue to drain, so the GPU idles from the grad-buffer zeroing at the
        start of the step until the host has copied the batch and launched the first forward kernel."""
        from trainer.kernels import pinned_batches_on

        batch = next(data_iterator)
        device = current_device() or torch.device("cpu")
        if device.type == "cuda" and pinned_batches_on():
            batch = pinned(batch)
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def _fused_loss_fits(self) -> bool:
        """The fused loss hands back one summed loss: only for the default per-token-mean :meth:`loss_func`
        (a subclass that weights token losses gets them unfused)."""
        return type(self).loss_func is GPTTrainStep.loss_func

    def _padded(self, model) -> bool:
        from interop.megatron_model import unwrap

        padded = getattr(unwrap(model), "vocab_size", None)
        return self.vocab_size is not None and padded is not None and padded > self.vocab_size

    def forward_step(self, data_iterator, model):
        batch = self.get_batch(data_iterator, model)
        if (not self.collect_logits and model.training and torch.is_grad_enabled() and self._fused_loss_fits()
                and uses_fused_loss(model)):
            # output layer + loss fused (trainer/kernels/linear_cross_entropy.py): masked tokens are ignored labels,
            # padded vocabulary rows are cut off inside; the model returns the summed loss
            labels = batch["labels"].masked_fill(batch["loss_mask"] == 0, IGNORE_INDEX)
            output = model(batch["tokens"], batch["position_ids"], None, labels=labels)
            return output, partial(self.loss_func, batch)
        if self.collect_logits or self._padded(model):
            output = model(batch["tokens"], batch["position_ids"], None)
            return output, partial(self._logits_loss, batch)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(self.loss_func, batch)

    def _logits_loss(self, batch: dict, logits: torch.Tensor):
        """Cross entropy from this TP rank's vocabulary shard with the padded rows masked out."""
        token_losses, logits = self.vocab_losses(logits, batch["labels"])
        loss, metrics = self.loss_func(batch, token_losses)
        self.add_logits(metrics, logits)
        return loss, metrics

    def vocab_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token cross entropy, fp32 logits) of this TP rank's vocabulary shard; the padded vocabulary rows
        are masked out of the softmax."""
        from megatron.core import parallel_state, tensor_parallel

        logits = logits.float()
        if self.vocab_size is not None:
            local = logits.shape[-1]
            start = parallel_state.get_tensor_model_parallel_rank() * local
            cut = self.vocab_size - start
            if cut < local:
                logits = logits.clone()
                logits[..., max(cut, 0):] = torch.finfo(logits.dtype).min  # exp() -> 0 after the max shift
        return tensor_parallel.vocab_parallel_cross_entropy(logits, labels), logits

    def add_logits(self, metrics: dict, logits: torch.Tensor) -> None:
        """With ``collect_logits``, the full-vocabulary logits (gathered over TP) under ``metrics["logits"]``."""
        from megatron.core import tensor_parallel

        if self.collect_logits:
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            metrics["logits"] = full[..., : self.vocab_size].detach().clone()

    def build_sources(self, cfg, built, world_size: int):
        """Train/valid samples of the run (:func:`trainer.data.build_sources`); encoder steps read other datasets."""
        from trainer.data import build_sources

        return build_sources(cfg, built.vocab_size, built.eod, world_size)

    def loss_func(self, batch: dict, token_losses: torch.Tensor):
        """``token_losses`` is ``[micro_batch, seq]`` — or, from the fused output layer + loss, already the 0-d sum
        over the unmasked tokens; return (loss, dict of detached metrics).

        The metric is cloned: the schedule divides the returned loss in place."""
        mask = batch["loss_mask"].float()
        total = token_losses.float() if token_losses.dim() == 0 else (token_losses.float() * mask).sum()
        loss = total / mask.sum().clamp(min=1.0)
        return loss, {"lm loss": loss.detach().clone()}
