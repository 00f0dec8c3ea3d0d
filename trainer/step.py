"""The forward step Megatron-Core's pipeline schedules call: ``get_batch`` -> model -> ``loss_func``.

Subclass :class:`GPTTrainStep` for a custom loss (override :meth:`loss_func`, e.g. weight samples by
key-token counts as Accelerate's docs show); the schedule, DDP and the loop stay the same. The loss of a
micro-batch is the loss-mask-weighted token mean; the loop averages micro-batches and the DP group.
"""
from __future__ import annotations

from functools import partial

import torch


class GPTTrainStep:
    """``forward_step(data_iterator, model)`` for Megatron-Core's ``get_forward_backward_func()``.

    With ``collect_logits=True`` (eval/verification) the last stage also returns the full-vocabulary
    logits (gathered over TP) in the loss dict under ``"logits"``.
    """

    def __init__(self, collect_logits: bool = False):
        self.collect_logits = collect_logits

    def get_batch(self, data_iterator, model) -> dict:
        """The next micro-batch; tensors moved to this rank's device."""
        batch = next(data_iterator)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def forward_step(self, data_iterator, model):
        batch = self.get_batch(data_iterator, model)
        if self.collect_logits:
            logits = model(batch["tokens"], batch["position_ids"], None)
            output = logits
        else:
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(self._loss, batch)

    def _loss(self, batch: dict, output_tensor: torch.Tensor):
        if self.collect_logits:
            from megatron.core import tensor_parallel

            logits = output_tensor
            token_losses = tensor_parallel.vocab_parallel_cross_entropy(
                logits.transpose(0, 1).contiguous().float(), batch["labels"].transpose(0, 1).contiguous()
            ).transpose(0, 1)
            loss, metrics = self.loss_func(batch, token_losses)
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            metrics["logits"] = full.detach().float().clone()
            return loss, metrics
        return self.loss_func(batch, output_tensor)

    def loss_func(self, batch: dict, token_losses: torch.Tensor):
        """``token_losses`` is ``[micro_batch, seq]``; return (loss, dict of detached metrics).

        The returned metric is cloned: the schedule divides the returned loss in place."""
        mask = batch["loss_mask"].float()
        loss = (token_losses.float() * mask).sum() / mask.sum().clamp(min=1.0)
        return loss, {"lm loss": loss.detach().clone()}
