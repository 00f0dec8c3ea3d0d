"""Rank functions for the checkpoint tests: Megatron-Core itself produces (and consumes) the Megatron artifacts.

``produce_and_consume`` runs on TP*PP gloo ranks. Each rank builds the tiny GPTModel of ``tests.mcore_tiny``,
saves it (1) in Megatron-LM's per-rank torch layout (``state_dict`` + ``torch.save``) and (2) with
``dist_checkpointing.save`` (torch_dist). Rank 0 then rewrites both through OUR readers and writers
(``rewrite``); finally every rank loads our outputs into a zeroed model with Megatron-Core's own loaders
(``dist_checkpointing.load`` / ``load_state_dict(strict=True)``) and returns what it got.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

ITERATION = 7


def megatron_args(tp: int, pp: int):
    from megatron.core.enums import ModelType

    from tests import mcore_tiny

    return argparse.Namespace(
        num_layers=mcore_tiny.LAYERS, hidden_size=mcore_tiny.HIDDEN, num_attention_heads=mcore_tiny.HEADS,
        ffn_hidden_size=4 * mcore_tiny.HIDDEN, padded_vocab_size=mcore_tiny.VOCAB, max_position_embeddings=mcore_tiny.SEQ,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, position_embedding_type="learned_absolute",
        normalization="LayerNorm", untie_embeddings_and_output_weights=True, transformer_impl="local",
        params_dtype=torch.float32, model_type=ModelType.encoder_or_decoder, tokenizer_type="NullTokenizer",
        vocab_size=mcore_tiny.VOCAB - 1, add_bias_linear=True,
    )


def _shards(model):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out = []
    for sh in nested_values(model.sharded_state_dict()):
        replica = sh.replica_id if isinstance(getattr(sh, "replica_id", None), tuple) else (getattr(sh, "replica_id", 0),)
        if isinstance(sh, ShardedTensor) and not any(replica) and not sh.key.endswith("_extra_state"):
            out.append((sh.key, tuple(sh.global_offset), tuple(sh.local_shape), sh.prepend_axis_num, sh.data.detach().clone()))
    return out


def _tensors(sd) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def produce_and_consume(root: str, tp: int, pp: int):
    from megatron.core import dist_checkpointing, parallel_state

    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from tests import mcore_tiny

    root = Path(root)
    with distributed(RuntimeConfig(layout=Layout(tp=tp, pp=pp), seed=1234)):
        rank = torch.distributed.get_rank()
        t, p = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
        model, _ = mcore_tiny.build_gpt()
        args = megatron_args(tp, pp)
        # (1) Megatron-LM per-rank torch layout
        rank_dir = root / "torch" / f"iter_{ITERATION:07d}" / (f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
        rank_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION, "model": model.state_dict(),
             "rng_state": [{"torch_rng_state": torch.get_rng_state()}], "num_floating_point_operations_so_far": 0},
            rank_dir / "model_optim_rng.pt",
        )
        # (2) torch_dist with Megatron-Core's dist_checkpointing
        dist_dir = root / "dist" / f"iter_{ITERATION:07d}"
        if rank == 0:
            dist_dir.mkdir(parents=True, exist_ok=True)
            (root / "torch" / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
            (root / "dist" / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
        torch.distributed.barrier()
        dist_checkpointing.save(
            {"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0, "iteration": ITERATION},
            str(dist_dir),
        )
        torch.distributed.barrier()
        if rank == 0:
            rewrite(root)
        torch.distributed.barrier()
        # (3) Megatron-Core loads what our writers produced
        from_dist, _ = mcore_tiny.build_gpt()
        with torch.no_grad():
            for prm in from_dist.parameters():
                prm.zero_()
        loaded = dist_checkpointing.load({"model": from_dist.sharded_state_dict()}, str(root / "ours_dist" / f"iter_{ITERATION:07d}"))
        from_dist.load_state_dict(loaded["model"], strict=True)
        from_torch, _ = mcore_tiny.build_gpt()
        with torch.no_grad():
            for prm in from_torch.parameters():
                prm.zero_()
        ours = root / "ours_torch" / f"iter_{ITERATION:07d}" / rank_dir.name / "model_optim_rng.pt"
        from_torch.load_state_dict(torch.load(ours, weights_only=False)["model"], strict=True)
        return {
            "tp": t, "pp": p, "state": _tensors(model.state_dict()), "shards": _shards(model),
            "from_dist": _tensors(from_dist.state_dict()), "dist_common": (loaded["iteration"], loaded["args"].num_layers), "from_torch": _tensors(from_torch.state_dict()),
        }


def rewrite(root: Path) -> None:
    """Copy both Megatron-Core-made checkpoints through our readers into our writers, one tensor at a time."""
    from formats.checkpoint import MegatronTorchWriter, TorchDistWriter, extra_state_keys, open_checkpoint

    src = open_checkpoint(root / "torch")
    with MegatronTorchWriter(root / "ours_torch", src.layout, iteration=src.iteration, args=src.args) as w:
        for tp, pp, ep in src.rank_keys():
            for name, value in src.rank_state(tp, pp).items():
                value = src.load_rank_tensor(name, tp, pp) if isinstance(value, torch.Tensor) else value
                w.add(name, value, tp, pp)
        w.finalize()

    dist = open_checkpoint(root / "dist")
    layers = dist.arg("num_layers")
    extra = extra_state_keys(layers)
    assert set(extra) == {k for k in dist.objects() if "_extra_state" in k}, dist.objects()
    expected = {i.name: i.shape for i in dist.tensors()} | {k: None for k in extra}
    args = argparse.Namespace(**vars(dist.args), no_save_optim=True, no_save_rng=True)
    with TorchDistWriter(root / "ours_dist", iteration=dist.iteration, args=args, expected=expected) as w:
        for info in dist.tensors():
            if info.name.startswith("decoder.layers."):  # stacked: write layer by layer, never the whole stack
                for i in range(info.shape[0]):
                    w.add(info.name, dist.load(info.name, (slice(i, i + 1),)), info.shape, (i,) + (0,) * (len(info.shape) - 1))
            else:
                w.add(info.name, dist.load(info.name))
        for key in extra:
            w.add_object(key, [None])
        w.finalize()


def _build_chunk(vp_stage: int, vpp: int):
    """A tied-embedding tiny GPT chunk for PP x VPP (as ``tests.mcore_tiny`` but interleaved and tied)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from tests import mcore_tiny

    config = TransformerConfig(
        num_layers=mcore_tiny.LAYERS, hidden_size=mcore_tiny.HIDDEN, num_attention_heads=mcore_tiny.HEADS,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=vpp, use_cpu_initialization=True, params_dtype=torch.float32,
        pipeline_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
    )
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=mcore_tiny.VOCAB,
        max_sequence_length=mcore_tiny.SEQ, pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=True, position_embedding_type="learned_absolute", vp_stage=vp_stage,
    )


def produce_vpp_tied(root: str, pp: int, vpp: int):
    """PP x VPP, tied embeddings: per-rank torch files with ``model0…`` and a torch_dist save of all chunks."""
    from megatron.core import dist_checkpointing, parallel_state

    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed

    root = Path(root)
    with distributed(RuntimeConfig(layout=Layout(tp=1, pp=pp, vpp=vpp), seed=4321)):
        rank = torch.distributed.get_rank()
        p = parallel_state.get_pipeline_model_parallel_rank()
        chunks = [_build_chunk(v, vpp) for v in range(vpp)]
        args = megatron_args(1, pp)
        args.untie_embeddings_and_output_weights = False
        args.virtual_pipeline_model_parallel_size = vpp
        rank_dir = root / "torch" / f"iter_{ITERATION:07d}" / f"mp_rank_00_{p:03d}"
        rank_dir.mkdir(parents=True, exist_ok=True)
        top = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION}
        top.update({f"model{v}": c.state_dict() for v, c in enumerate(chunks)})
        torch.save(top, rank_dir / "model_optim_rng.pt")
        dist_dir = root / "dist" / f"iter_{ITERATION:07d}"
        if rank == 0:
            dist_dir.mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        sharded = {f"model{v}": c.sharded_state_dict() for v, c in enumerate(chunks)}
        dist_checkpointing.save({**sharded, "args": args, "checkpoint_version": 3.0, "iteration": ITERATION}, str(dist_dir))
        torch.distributed.barrier()
        return {"pp": p, "chunks": [_tensors(c.state_dict()) for c in chunks],
                "shards": [s for c in chunks for s in _shards(c)]}
