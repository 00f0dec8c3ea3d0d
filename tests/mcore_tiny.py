"""A tiny Megatron-Core GPT and a plain training loop, for runtime/emulation tests.

Deliberately written against Megatron-Core's public pieces only (GPTModel, local layer spec, the pipeline
schedules, DDP, DistributedOptimizer), so that a test of the runtime does not depend on our trainer.
Weights travel between layouts through Megatron-Core's own ``sharded_state_dict`` metadata.
"""
from __future__ import annotations

import torch

VOCAB = 128
SEQ = 16
HIDDEN = 64
HEADS = 4
LAYERS = 4


def build_gpt(seed: int = 7, vpp_rank: int | None = None):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=4 * HIDDEN,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_dtype=torch.float32,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="learned_absolute",
    )
    if torch.cuda.is_available():  # as Megatron-LM does after building on the CPU
        model.cuda(torch.cuda.current_device())
    return model, config


def full_state(model) -> dict[tuple, torch.Tensor]:
    """Full (unsharded) tensors of a TP1/PP1 model keyed by (sharded key, prepended offsets)."""
    out = {}
    for sh in _sharded_tensors(model):
        p = sh.prepend_axis_num
        out[(sh.key, sh.global_offset[:p])] = sh.data.detach().cpu().clone()
    return out


def load_full_state(model, full: dict[tuple, torch.Tensor]) -> int:
    """Copy each local shard of ``model`` out of the full tensors, using Megatron-Core's own shard metadata."""
    n = 0
    with torch.no_grad():
        for sh in _sharded_tensors(model):
            p = sh.prepend_axis_num
            src = full[(sh.key, sh.global_offset[:p])]
            index = tuple(
                slice(off, off + size)
                for off, size in zip(sh.global_offset[p:], sh.local_shape[p:] if len(sh.local_shape) > src.dim() else sh.local_shape)
            )
            sh.data.copy_(src[index].reshape(sh.data.shape).to(sh.data.device))
            n += 1
    return n


def _sharded_tensors(model):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    for value in nested_values(model.sharded_state_dict()):
        if isinstance(value, ShardedTensor) and not value.key.endswith("_extra_state"):
            yield value


def batches(steps: int, micro: int, num_micro: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append([torch.randint(0, VOCAB, (micro, SEQ + 1), generator=gen) for _ in range(num_micro)])
    return out


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def forward_step(data_iterator, model):
    tokens = next(data_iterator).to(_device())
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(SEQ, device=inputs.device).unsqueeze(0).expand_as(inputs)
    output = model(inputs, positions, None, labels=labels)

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def train_losses(steps: int, num_micro: int, global_micro: int, use_distributed_optimizer: bool, full=None):
    """Train ``steps`` steps and return the per-step mean loss as seen by the last stage (None elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model, config = build_gpt()
    if full is not None:
        load_full_state(model, full)
    initial = full_state(model) if full is None else None
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=1.0,
        use_distributed_optimizer=use_distributed_optimizer, bf16=False, fp16=False,
    )
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    # as Megatron-LM's training loop does: the schedule calls this to all-reduce DP/embedding grads
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    fb = get_forward_backward_func()
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    micro = global_micro // dp  # every layout sees the same global batch, split over DP ranks
    losses = []
    for step_batches in batches(steps, global_micro, num_micro):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        mine = [b[dp_rank * micro:(dp_rank + 1) * micro] for b in step_batches]
        out = fb(
            forward_step_func=forward_step,
            data_iterator=iter(mine),
            model=[ddp],
            num_microbatches=num_micro,
            seq_length=SEQ,
            micro_batch_size=micro,
            forward_only=False,
        )
        ok, grad_norm, _ = optimizer.step()
        assert ok
        if parallel_state.is_pipeline_last_stage():
            loss = torch.stack([o["lm loss"] for o in out]).mean()
            torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
            losses.append((loss / dp).item())
    return (losses if parallel_state.is_pipeline_last_stage() else None), initial


def rank_main(tp: int, pp: int, steps: int, use_distributed_optimizer: bool, full):
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed

    with distributed(RuntimeConfig(layout=Layout(tp=tp, pp=pp), seed=1234)):
        losses, _ = train_losses(steps, num_micro=4, global_micro=4, use_distributed_optimizer=use_distributed_optimizer, full=full)
    return losses
