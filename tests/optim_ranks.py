"""Rank bodies of the optimizer-state tests (module-level: ``run_on_ranks`` pickles them by name).

The oracle of "the optimizer state at this layout" is Megatron-Core's own ``fully_reshardable`` torch_dist save:
``DistributedOptimizer.sharded_state_dict`` gathers every parameter's fp32 main param, ``exp_avg`` and
``exp_avg_sq`` into model-shaped global tensors (its code, not ours), which the tests read back with the plain
DCP chunk reader and compare between the source and the target layout.
"""
from __future__ import annotations

from trainer.config import ArchConfig, TrainConfig

FULLY = {"distrib_optim_sharding_type": "fully_reshardable"}


def make_cfg(data: str, family: str, **kw) -> TrainConfig:
    llama = family == "llama"
    arch = ArchConfig(family=family, num_layers=4, hidden_size=64, num_attention_heads=4,
                      num_query_groups=2 if llama else None, vocab_size=kw.pop("vocab", 300 if llama else 256),
                      max_position_embeddings=64, tie_word_embeddings=not llama)
    base = dict(arch=arch, seq_length=32, micro_batch_size=2, global_batch_size=8, data_path=[data],
                split="98,2,0", train_iters=6, lr_decay_iters=6, lr_warmup_iters=2, lr=1e-2, progress=False,
                seed=5, plot=False, use_distributed_optimizer=True, force=True)
    base.update(kw)
    return TrainConfig(**base)


def dump_optimizer(trainer, out_dir: str) -> None:
    """Megatron-Core's own fully_reshardable save of the trainer's optimizer (collective over all ranks)."""
    from megatron.core import dist_checkpointing

    from interop.megatron_model import unwrap

    chunks = trainer.model
    model_sd = {f"model{i}": unwrap(c).sharded_state_dict(metadata=dict(FULLY)) for i, c in enumerate(chunks)}
    opt = trainer.optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=dict(FULLY))
    dist_checkpointing.save({"optimizer": opt}, out_dir, content_metadata=dict(FULLY))


def train_and_dump(cfg: TrainConfig, before: str | None = None, after: str | None = None):
    """Set up (loading ``cfg.load`` if set), dump the optimizer to ``before``, train, dump to ``after``; returns
    (losses, lrs) on the rank that reports them."""
    import os

    from interop.runtime import RuntimeConfig, distributed
    from trainer.config import env_world_size, layout_of
    from trainer.loop import Trainer

    world = env_world_size() or 1
    with distributed(RuntimeConfig(layout=layout_of(cfg, world), seed=cfg.seed)):
        trainer = Trainer(cfg, world_size=world).setup()
        if before:
            os.makedirs(before, exist_ok=True)
            dump_optimizer(trainer, before)
        result = trainer.fit()
        if after:
            os.makedirs(after, exist_ok=True)
            dump_optimizer(trainer, after)
        return result.losses, result.lrs, trainer.state.iteration, result.consumed_samples


def local_states(trainer) -> dict[tuple[int, int, str], dict]:
    """Per model parameter of this rank: Megatron-Core's own ``_get_main_param_and_optimizer_states`` (the fp32
    main param and both moments of this DP rank's shard; whole tensors at DP=1), keyed (pp rank, chunk, name)."""
    from megatron.core import parallel_state

    opt = trainer.optimizer.chained_optimizers[0] if hasattr(trainer.optimizer, "chained_optimizers") else trainer.optimizer
    p = parallel_state.get_pipeline_model_parallel_rank()
    out = {}
    for v, chunk in enumerate(trainer.model):
        for name, param in chunk.named_parameters():
            st = opt._get_main_param_and_optimizer_states(param)
            out[(p, v, name.removeprefix("module."))] = {k: st[k].detach().clone().view(param.shape)
                                                       for k in ("param", "exp_avg", "exp_avg_sq")}
    return out


def load_local_states(cfg: TrainConfig):
    """Set up (loading ``cfg.load``) and return :func:`local_states` of every rank."""
    from interop.runtime import RuntimeConfig, distributed
    from trainer.config import env_world_size, layout_of
    from trainer.loop import Trainer

    world = env_world_size() or 1
    with distributed(RuntimeConfig(layout=layout_of(cfg, world), seed=cfg.seed)):
        return local_states(Trainer(cfg, world_size=world).setup())
