"""Rank function of ``tests/test_train_bert_sdpa.py``: the trainer's BERT (SDPA core, key-padding mask, LM head at
the loss positions) built from an HF checkpoint, its outputs on probe batches, the masks SDPA was given, and one
forward/backward through the default step and through a step that runs the LM head everywhere."""
from __future__ import annotations

import torch


class EveryPositionStep:
    """Made a :class:`trainer.steps.bert.BertTrainStep` subclass on first use (after the rank imported Megatron):
    the same loss, but as a subclass's ``loss_func``, so the LM head runs at every position."""

    @staticmethod
    def make(vocab_size: int):
        from trainer.steps.bert import BertTrainStep

        class Step(BertTrainStep):
            def loss_func(self, batch, token_losses, binary_logits=None):
                return super().loss_func(batch, token_losses, binary_logits)

        return Step(vocab_size=vocab_size)


def _grads_of_one_step(trainer, micro: list[dict], step) -> tuple[float, dict, list[int]]:
    """(loss, main grads by name, rows the output layer saw) of one forward/backward, no optimizer step."""
    from interop.megatron_model import unwrap

    model = unwrap(trainer.model[0])
    rows: list[int] = []
    hook = model.output_layer.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0] * args[0].shape[1]))
    for m in trainer.model:
        m.zero_grad_buffer()
    try:
        outputs = trainer._run_schedule([dict(mb) for mb in micro], forward_only=False, step=step)
    finally:
        hook.remove()
    grads = {name: p.main_grad.detach().float().cpu() for name, p in model.named_parameters() if p.requires_grad}
    return float(outputs[0]["loss"]), grads, rows


def sdpa_bert_checks(cfg, padded: dict, unpadded: dict, micro: list[dict]) -> dict:
    """One rank: outputs on ``padded`` (its mask) and ``unpadded`` (``attention_mask=None``), the masks SDPA got for
    each, and one training forward/backward of ``micro`` through the default step and :class:`EveryPositionStep`."""
    import interop.attention
    from formats.layout import Layout
    from interop.megatron_model import unwrap
    from interop.runtime import RuntimeConfig, distributed
    from trainer.loop import Trainer
    from trainer.model import current_device
    from trainer.steps.bert import BertTrainStep

    seen: list = []
    sdpa = interop.attention.biased_attention

    def spy(q, k, v, bias, mask, *args, **kwargs):
        seen.append(None if mask is None else tuple(mask.shape))
        return sdpa(q, k, v, bias, mask, *args, **kwargs)

    out: dict = {}
    with distributed(RuntimeConfig(layout=Layout(tp=1, pp=1), seed=cfg.seed)):
        trainer = Trainer(cfg, world_size=1).setup()
        model = unwrap(trainer.model[0])
        vocab = trainer.built.vocab_size
        out["core"] = type(model.encoder.layers[0].self_attention.core_attention).__name__
        interop.attention.biased_attention = spy
        try:
            model.eval()
            with torch.no_grad():
                for name, b, mask in (("padded", padded, padded["attention_mask"]), ("unpadded", unpadded, None)):
                    seen.clear()
                    b = {k: v.to(current_device() or "cpu") for k, v in b.items()}
                    mask = None if mask is None else b["attention_mask"]
                    logits, binary = model(b["tokens"], mask, tokentype_ids=b["tokentype_ids"])
                    out[name] = {"logits": logits[..., :vocab].float().cpu(), "binary_logits": binary.float().cpu()}
                    out[name + " masks"] = sorted(set(seen), key=str)
            model.train()
            seen.clear()
            out["default"] = _grads_of_one_step(trainer, micro, BertTrainStep(vocab_size=vocab))
            out["train masks"] = sorted(set(seen), key=str)
            out["every position"] = _grads_of_one_step(trainer, micro, EveryPositionStep.make(vocab))
        finally:
            interop.attention.biased_attention = sdpa
    return out

