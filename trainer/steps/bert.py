"""BERT's forward step for Megatron-Core's pipeline schedules: tokens, token types and the padding mask into
``BertModel``; masked-LM loss (+ next-sentence/sentence-order loss when the model has the binary head).

The losses are Megatron-LM's ``pretrain_bert``: the MLM loss is the loss-mask-weighted mean of the per-token cross
entropy over the true vocabulary (padded vocabulary rows masked out, as :class:`trainer.step.GPTTrainStep` does),
the binary loss the mean cross entropy of the two-way head against ``is_random``; the step's loss is their sum,
which is also Transformers' ``MegatronBertForPreTraining`` loss with ``labels`` (-100 off the masked positions) and
``next_sentence_label``. DDP and the loop average it over micro-batches and the data-parallel group. In eval the
step also counts masked-token and binary-head hits (:mod:`trainer.steps.accuracy`), whatever ``loss_func`` does.

Subclass and override :meth:`BertTrainStep.loss_func` for a custom loss.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from trainer.step import GPTTrainStep
from trainer.steps.accuracy import add_accuracy


class BertTrainStep(GPTTrainStep):
    """``forward_step(data_iterator, model)`` of a BERT run. Batches hold ``tokens``, ``tokentype_ids``,
    ``attention_mask`` (1 = real token), ``labels``, ``loss_mask`` and ``is_random`` (see
    :mod:`trainer.data_encoders`). With ``collect_logits=True`` the last stage also returns the masked-LM logits
    (``"logits"``) and the binary-head logits (``"binary_logits"``)."""

    loss_key = "loss"

    def forward_step(self, data_iterator, model):
        from interop.megatron_model import unwrap

        batch = self.get_batch(data_iterator, model)
        embedding = getattr(unwrap(model), "embedding", None)
        has_types = getattr(embedding, "tokentype_embeddings", None) is not None
        output = model(batch["tokens"], batch["attention_mask"],
                       tokentype_ids=batch["tokentype_ids"] if has_types else None)
        return output, partial(self._bert_loss, batch)

    def _bert_loss(self, batch: dict, output):
        logits, binary_logits = output
        token_losses, logits = self.vocab_losses(logits, batch["labels"])
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
