"""T5's forward step for Megatron-Core's schedules: encoder tokens, decoder tokens and their masks into ``T5Model``;
the loss is the loss-mask-weighted mean of the decoder's per-token cross entropy against the span-corruption
labels (sentinel, span tokens, …, EOS), padded vocabulary rows masked out — Transformers'
``T5ForConditionalGeneration`` loss with ``labels`` (-100 off the loss mask) and the same ``decoder_input_ids``.

Subclass and override :meth:`T5TrainStep.loss_func` (inherited signature ``(batch, token_losses)``) for a custom loss.
"""
from __future__ import annotations

from functools import partial

from trainer.step import GPTTrainStep
from trainer.steps.accuracy import add_accuracy


class T5TrainStep(GPTTrainStep):
    """Batches hold ``tokens``/``attention_mask`` (encoder), ``decoder_tokens``/``decoder_attention_mask``,
    ``labels`` and ``loss_mask`` (see :mod:`trainer.data_encoders`). ``T5Model`` takes boolean masks (True = masked
    out): key padding ``[b, 1, 1, s]`` for the encoder and the cross attention, the decoder's causal triangle from
    its layer spec plus its key padding."""

    def forward_step(self, data_iterator, model):
        from interop.t5.forward import megatron_masks

        batch = self.get_batch(data_iterator, model)
        enc, dec, cross = megatron_masks(batch["attention_mask"], batch["decoder_attention_mask"])
        output = model(batch["tokens"], batch["decoder_tokens"], enc, dec, cross)
        return output, partial(self._t5_loss, batch)

    def _t5_loss(self, batch: dict, logits):
        """``loss_func`` over the vocabulary-masked token losses; in eval also the decoder-token accuracy."""
        token_losses, logits = self.vocab_losses(logits, batch["labels"])
        loss, metrics = self.loss_func(batch, token_losses)
        add_accuracy(metrics, logits, batch["labels"], batch["loss_mask"])
        self.add_logits(metrics, logits)
        return loss, metrics

    def build_sources(self, cfg, built, world_size: int):
        from trainer.data import DataSources, sample_counts
        from trainer.data_encoders import synthetic_sources, t5_sources

        if cfg.synthetic_data:
            return DataSources(*synthetic_sources(cfg, built.vocab_size, decoder=True))
        return DataSources(*t5_sources(cfg, sample_counts(cfg, world_size)))
