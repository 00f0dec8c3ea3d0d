"""Eval accuracy of the encoder steps: masked-token accuracy from vocabulary-parallel logits, and the binary
head's (NSP/SOP) accuracy.

Why a TP-aware argmax: each tensor-parallel rank holds a slice of the vocabulary, so the predicted token is the
position of the largest logit over all slices. The max is all-reduced over the TP group and ties go to the lowest
vocabulary id (as ``torch.argmax`` on the gathered logits would), without gathering ``[b, s, V]`` logits.

The metrics are counts (``… correct`` and ``… tokens``/``… samples``), so the loop sums them over micro-batches,
eval batches and the data-parallel group before dividing; they are computed only with gradients off (eval).
"""
from __future__ import annotations

import torch


def vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The global vocabulary id of the largest logit of each position; ``logits`` is this TP rank's vocabulary
    slice ``[..., V / tp]`` (padded rows already masked out)."""
    from megatron.core import parallel_state

    local_max, local_idx = logits.max(dim=-1)
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return local_idx
    group = parallel_state.get_tensor_model_parallel_group()
    best = local_max.clone()
    torch.distributed.all_reduce(best, op=torch.distributed.ReduceOp.MAX, group=group)
    start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    winner = torch.where(local_max == best, local_idx + start, torch.full_like(local_idx, torch.iinfo(torch.long).max))
    torch.distributed.all_reduce(winner, op=torch.distributed.ReduceOp.MIN, group=group)
    return winner


def add_accuracy(metrics: dict, logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                 binary_logits: torch.Tensor | None = None, binary_labels: torch.Tensor | None = None) -> None:
    """With gradients off (eval): ``lm correct``/``lm tokens`` over the loss mask and, with a binary head,
    ``sop correct``/``sop samples`` into ``metrics``."""
    if torch.is_grad_enabled():
        return
    with torch.no_grad():
        mask = loss_mask.float()
        hits = (vocab_parallel_argmax(logits.float()) == labels).float()
        metrics["lm correct"] = (hits * mask).sum()
        metrics["lm tokens"] = mask.sum()
        if binary_logits is not None:
            guess = binary_logits.float().view(-1, 2).argmax(dim=-1)
            metrics["sop correct"] = (guess == binary_labels.view(-1)).float().sum()
            metrics["sop samples"] = torch.tensor(float(guess.numel()), device=guess.device)
