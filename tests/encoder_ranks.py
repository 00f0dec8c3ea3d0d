"""Rank functions of the encoder training tests (module-level so that gloo ranks import them).

Several runs share one process group: each run re-initialises Megatron-Core's model-parallel state for its layout
inside one ``interop.runtime.distributed`` context (as ``tests/bert_ranks.py`` does), so many layouts cost one
spawn of the ranks (CI has two cores).
"""
from __future__ import annotations

from functools import partial

import torch

_CAPTURED: dict = {}


def perturb(chunks, seed: int = 3) -> None:
    """Megatron initialises norms to 1 and biases to 0: shift every 1-D parameter so a dropped bias or norm
    shows (single-rank runs only: TP shards would get different numbers)."""
    from interop.megatron_model import canonical_targets

    with torch.no_grad():
        for i, (name, params) in enumerate(sorted(canonical_targets(chunks).items())):
            for p in params:
                if p.dim() == 1:
                    gen = torch.Generator().manual_seed(seed * 1000 + i)
                    p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def capture(chunks, name: str = "state") -> None:
    from interop.megatron_model import canonical_targets

    perturb(chunks)
    vocab = _CAPTURED["model_config"].vocab_size
    _CAPTURED.setdefault("states", {})[name] = _CAPTURED[name] = {n: ps[0].detach()[:vocab].clone() if n in _VOCAB_ROWS else ps[0].detach().clone()
                          for n, ps in canonical_targets(chunks).items()}  # canonical = the true vocabulary


_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight", "output_layer.bias")


def load_state(state: dict | str, chunks) -> None:
    from interop.megatron_model import load_canonical

    if isinstance(state, str):  # a state captured earlier in this process, by name
        state = _CAPTURED[state]
    load_canonical(chunks, state.items(), _CAPTURED["model_config"])


def _set_layout(cfg, world: int) -> None:
    from megatron.core import parallel_state as ps

    from interop.runtime import seed_everything
    from trainer.config import layout_of

    layout = layout_of(cfg, world)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                                 virtual_pipeline_model_parallel_size=layout.interleaved)
    seed_everything(cfg.seed)


def run_many(runs: list[tuple], gather: bool = False) -> list:
    """``runs``: ``(cfg, how, step)`` with ``how`` one of ``"capture"`` (perturb + keep the initial weights;
    ``("capture", name)`` keeps them under ``name``), ``("load", state)`` (start from ``state``: a state dict, the
    name of one captured earlier in this call, or None: the captured one), ``("kill", n)`` (perturbed init, ``n``
    steps, save, stop), ``"perturb"`` or ``"hf"`` (the weights of ``cfg.model``; a kill starts from them too when
    ``cfg.model`` is set). Returns each run's losses (rank 0's list; every rank's when ``gather``), and the
    captured state last (``{name: state}`` when some capture was named)."""
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from trainer.loop import Trainer
    from trainer.sources import model_config_for

    world = None
    out = []
    with distributed(RuntimeConfig(layout=Layout(tp=1, pp=1))):
        world = torch.distributed.get_world_size()
        for cfg, how, step in runs:
            _set_layout(cfg, world)
            _CAPTURED["model_config"] = model_config_for(cfg)
            init = perturb
            if how == "hf":  # the weights cfg.model brought
                init = None
            elif how == "capture":
                init = capture
            elif isinstance(how, tuple) and how[0] == "capture":
                init = partial(capture, name=how[1])
            elif isinstance(how, tuple) and how[0] == "load":
                init = partial(load_state, how[1] if how[1] is not None else _CAPTURED["state"])
            if cfg.model:
                init = None if init is perturb or how == "hf" or isinstance(how, tuple) and how[0] == "kill" else init
            trainer = Trainer(cfg, step=step, model_init=init, world_size=world).setup()
            if isinstance(how, tuple) and how[0] == "kill":
                losses = [trainer.train_step()[0] for _ in range(how[1])]
                trainer.save()
            else:
                losses = trainer.fit().losses
            if gather:
                everyone = [None] * world
                torch.distributed.all_gather_object(everyone, losses)
                losses = everyone
            out.append(losses)
        states = _CAPTURED.get("states", {})
        out.append(states if set(states) - {"state"} else _CAPTURED.get("state"))
    return out


def train_with_outputs(cfg, batch: dict, step=None):
    """Train ``cfg`` (one rank, weights from ``cfg.model``); return (first micro-batch, losses, checkpoint,
    the trained model's outputs on ``batch``)."""
    from interop.megatron_model import forward_outputs, unwrap
    from trainer.run import rank_main

    def after(trainer, result):
        first = trainer.plan.micro_batches(trainer.sources.train, 0, wrap=len(trainer.sources.train))[0]
        outputs = forward_outputs([unwrap(m) for m in trainer.model], batch, trainer.built.model_config)
        return first, result.losses, result.checkpoint, outputs

    return rank_main(cfg, step=step, after=after)


def eval_with_batch(cfg):
    """Train ``cfg``, then evaluate once; return (the eval dict, the first validation global batch, the trained
    model's outputs on it, the checkpoint saved) from rank 0."""
    from interop.megatron_model import forward_outputs, unwrap
    from trainer.run import rank_main

    def after(trainer, result):
        ev = trainer.evaluate()
        micro = trainer.plan.micro_batches(trainer.sources.valid, 0, wrap=len(trainer.sources.valid))
        batch = {k: torch.cat([m[k] for m in micro]) for k in micro[0]}
        models = [unwrap(m) for m in trainer.model]
        if "decoder_tokens" in batch:  # T5 (no family layer): Megatron-Core's own T5Model forward
            from interop.t5.forward import t5_logits

            logits = t5_logits(models[0], trainer.built.model_config, batch["tokens"], batch["attention_mask"],
                               batch["decoder_tokens"], batch["decoder_attention_mask"])
            return ev, batch, {"logits": logits}, result.checkpoint
        inputs = {k: batch[k] for k in ("tokens", "attention_mask", "tokentype_ids")}
        return ev, batch, forward_outputs(models, inputs, trainer.built.model_config), result.checkpoint

    return rank_main(cfg, after=after)


def tp_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``trainer.steps.accuracy.vocab_parallel_argmax`` at TP2 on this rank's half of ``logits``' vocabulary."""
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from megatron.core import parallel_state as ps
    from trainer.steps.accuracy import vocab_parallel_argmax

    with distributed(RuntimeConfig(layout=Layout(tp=2, pp=1))):
        half = logits.shape[-1] // 2
        start = ps.get_tensor_model_parallel_rank() * half
        return vocab_parallel_argmax(logits[..., start:start + half].contiguous())


def replicated_grads(cfg) -> dict:
    """The gradients (after Megatron-Core's ``finalize_model_grads``) of the parameters every TP rank holds whole
    (T5's relative-bias tables, the norms) after one forward/backward of the first global batch, no step."""
    from formats.layout import Layout
    from interop.megatron_model import unwrap
    from interop.runtime import RuntimeConfig, distributed
    from trainer.loop import Trainer

    with distributed(RuntimeConfig(layout=Layout(tp=1, pp=1))):
        world = torch.distributed.get_world_size()
        _set_layout(cfg, world)
        trainer = Trainer(cfg, world_size=world).setup()
        trainer._run_schedule(trainer.plan.micro_batches(trainer.sources.train, 0), forward_only=False)
        return {name: p.main_grad.detach().clone() for name, p in unwrap(trainer.model[0]).named_parameters()
                if p.requires_grad and not getattr(p, "tensor_model_parallel", False)}
