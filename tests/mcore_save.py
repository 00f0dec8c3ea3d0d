"""What the "saved by Megatron-Core itself" tests share (BERT, T5): perturbed norms/biases and Megatron-LM's
two on-disk layouts written by Megatron-Core's own code (module-level: gloo ranks import it)."""
from __future__ import annotations

from pathlib import Path

import torch


def local_spec_config(num_layers: int, hidden_size: int, heads: int, ffn: int):
    """A fp32, dropout-free ``TransformerConfig`` at this rank's TP that Megatron-Core's local spec runs on CPU
    (no fusions that need apex/TE), with Megatron-LM BERT/T5's erf GELU and a wide init."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=heads, ffn_hidden_size=ffn,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(), use_cpu_initialization=True,
        params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-5,
        activation_func=torch.nn.functional.gelu, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        init_method_std=0.1,
    )


def perturb_vectors(model, seed: int) -> None:
    """Add noise to every 1-D parameter (Megatron inits norms to 1 and biases to 0, which would hide a dropped
    bias or a wrong norm); TP-split ones get a different draw per TP rank."""
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            if p.dim() == 1:
                split = getattr(p, "tensor_model_parallel", False)
                tp_rank = ps.get_tensor_model_parallel_rank() if split else 0
                gen = torch.Generator().manual_seed(1000 * seed + 10 * i + tp_rank)
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def save_both_formats(model, args, root: Path, iteration: int = 3) -> None:
    """``root/torch`` (per-rank ``model_optim_rng.pt``, Megatron-LM's torch layout) and ``root/dist``
    (``dist_checkpointing.save``) of this rank's ``model`` (PP=1), with Megatron-LM-style ``args``."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    t = ps.get_tensor_model_parallel_rank()
    it = f"iter_{iteration:07d}"
    rank_dir = root / "torch" / it / f"mp_rank_{t:02d}"
    rank_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model.state_dict()},
               rank_dir / "model_optim_rng.pt")
    if t == 0:
        (root / "dist" / it).mkdir(parents=True, exist_ok=True)
        for fmt in ("torch", "dist"):
            (root / fmt / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    torch.distributed.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "args": args, "checkpoint_version": 3.0,
                             "iteration": iteration}, str(root / "dist" / it))
