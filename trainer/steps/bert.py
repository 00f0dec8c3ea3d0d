"""BERT's forward step for Megatron-Core's pipeline schedules: tokens, token types and the padding mask into
``BertModel``; masked-LM loss (+ next-sentence/sentence-order loss when the model has the binary head).

The losses are Megatron-LM's ``pretrain_bert``: the MLM loss is the loss-mask-weighted mean of the per-token cross
entropy over the true vocabulary (padded vocabulary rows masked out, as :class:`trainer.step.GPTTrainStep` does),
the binary loss the mean cross entropy of the two-way head against ``is_random``; the step's loss is their sum,
which is also Transformers' ``MegatronBertForPreTraining`` loss with ``labels`` (-100 off the masked positions) and
``next_sentence_label``. DDP and the loop average it over micro-batches and the data-parallel group. In eval the
step also counts masked-token and binary-head hits (:mod:`trainer.steps.accuracy`), whatever ``loss_func`` does.

Speed (issue 19), with the trainer's BERT (:mod:`trainer.spec_encoder`): what the step reads off the host copy of a
micro-batch decides the model's inputs without a device sync — no padding means ``attention_mask=None`` (SDPA
without a mask: its flash kernels), and in training with the default :meth:`BertTrainStep.loss_func` the LM head
runs only at the loss positions (``lm_positions``); their token losses are scattered back to ``[b, s]`` (zero
elsewhere), so ``loss_func`` sees the same shapes either way. A subclass's ``loss_func`` gets every position.

Subclass and override :meth:`BertTrainStep.loss_func` for a custom loss.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from trainer.data import pinned
from trainer.step import GPTTrainStep
from trainer.steps.accuracy import add_accuracy


class BertTrainStep(GPTTrainStep):
    """``forward_step(data_iterator, model)`` of a BERT run. Batches hold ``tokens``, ``tokentype_ids``,
    ``attention_mask`` (1 = real token), ``labels``, ``loss_mask`` and ``is_random`` (see
    :mod:`trainer.data_encoders`). With ``collect_logits=True`` the last stage also returns the masked-LM logits
    (``"logits"``) and the binary-head logits (``"binary_logits"``)."""

    loss_key = "loss"

    def get_batch(self, data_iterator, model) -> dict:
        """The next micro-batch on this rank's device, plus what is read off the host copy (no device sync):
        ``padded`` (a Python bool: any padding in the micro-batch) and ``lm_positions`` (the flat ``[s, b]``
        indices of the positions in the loss mask, on the device).

        On a GPU the host tensors are pinned first: a copy from pageable memory waits for the GPU's queue to drain,
        so each micro-batch would stall the host until the previous one's backward pass finished."""
        host = next(data_iterator)
        padded = bool((host["attention_mask"] == 0).any())
        host = dict(host, lm_positions=host["loss_mask"].t().reshape(-1).nonzero().squeeze(1))
        if torch.cuda.is_available():
            host = pinned(host)
        batch = super().get_batch(iter([host]), model)
        batch["padded"] = padded
        return batch

    def forward_step(self, data_iterator, model):
        from interop.megatron_model import unwrap

        batch = self.get_batch(data_iterator, model)
        inner = unwrap(model)
        embedding = getattr(inner, "embedding", None)
        kwargs = {}
        if getattr(embedding, "tokentype_embeddings", None) is not None:
            kwargs["tokentype_ids"] = batch["tokentype_ids"]
        mask = batch["attention_mask"]
        if self._key_padding_model(inner) and not batch.get("padded", True):
            mask = None  # no padding: no mask at all, so SDPA may take its flash kernel
        positions = batch.get("lm_positions") if self._head_at_loss_positions(model, inner) else None
        if positions is not None and positions.numel():
            kwargs["lm_positions"] = positions
        else:
            positions = None
        output = model(batch["tokens"], mask, **kwargs)
        return output, partial(self._bert_loss, batch, positions)

    @staticmethod
    def _key_padding_model(inner) -> bool:
        """Whether ``inner`` is the trainer's BERT with the SDPA core (:func:`trainer.spec_encoder.bert_model_class`)."""
        from trainer.spec_encoder import bert_model_class

        return isinstance(inner, bert_model_class()) and inner.attn_mask_dimensions == "b11s"

    def _head_at_loss_positions(self, model, inner) -> bool:
        """The LM head runs only at the loss positions when nothing reads the other ones: training (not eval's
        accuracy, not ``collect_logits``), the default :meth:`loss_func` (a custom one gets every position) and
        no sequence parallelism (the head's input is split over the TP ranks there)."""
        from trainer.spec_encoder import bert_model_class

        return (model.training and torch.is_grad_enabled() and not self.collect_logits
                and type(self).loss_func is BertTrainStep.loss_func and isinstance(inner, bert_model_class())
                and not inner.config.sequence_parallel)

    def _bert_loss(self, batch: dict, positions: torch.Tensor | None, output):
        logits, binary_logits = output
        if positions is None:
            token_losses, logits = self.vocab_losses(logits, batch["labels"])
        else:  # logits [1, n, V / tp] at the flat [s, b] positions: scatter their losses back to [b, s]
            labels = batch["labels"].t().reshape(-1).index_select(0, positions).unsqueeze(0)
            selected, logits = self.vocab_losses(logits, labels)
            b, s = batch["labels"].shape
            token_losses = selected.new_zeros(s * b).index_copy(0, positions, selected.view(-1)).view(s, b).t()
        loss, metrics = self.loss_func(batch, token_losses, binary_logits)
        add_accuracy(metrics, logits, batch["labels"], batch["loss_mask"], binary_logits, batch["is_random"])
        self.add_logits(metrics, logits)
        if self.collect_logits and binary_logits is not None:
            metrics["binary_logits"] = binary_logits.detach().float().clone()
        return loss, metrics

    def loss_func(self, batch: dict, token_losses: torch.Tensor, binary_logits: torch.Tensor | None = None):
        """``token_losses`` ``[micro_batch, seq]``, ``binary_logits`` ``[micro_batch, 2]`` or None; return
        (loss, dict of detached metrics: ``loss``, ``lm loss`` and, with the binary head, ``sop loss``)."""
        mask = batch["loss_mask"].float()
        lm = (token_losses.float() * mask).sum() / mask.sum().clamp(min=1.0)
        metrics = {"lm loss": lm.detach().clone()}
        loss = lm
        if binary_logits is not None:
            sop = F.cross_entropy(binary_logits.float().view(-1, 2), batch["is_random"].view(-1))
            metrics["sop loss"] = sop.detach().clone()
            loss = lm + sop
        metrics["loss"] = loss.detach().clone()
        return loss, metrics

    def build_sources(self, cfg, built, world_size: int):
        from trainer.data import DataSources, sample_counts
        from trainer.data_encoders import bert_sources, synthetic_sources

        if cfg.synthetic_data:
            return DataSources(*synthetic_sources(cfg, built.vocab_size, decoder=False))
        train, valid = bert_sources(cfg, built.model_config.add_binary_head, sample_counts(cfg, world_size))
        return DataSources(train, valid)
