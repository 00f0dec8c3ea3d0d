"""Next-token choice from one step's logits: greedy, or temperature -> top-k -> top-p sampling.

Megatron-Core's own sampler applies top-k *or* top-p; users of old Megatron-LM and of Transformers expect
the filters to combine, in this order, with Transformers' tie and "keep at least one token" rules, so that
a step filtered here equals ``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper``.
Top-p decay is the old Megatron-LM schedule: after each generated token ``p <- max(p * decay, bound)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.errors import TrainConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How one token is chosen. ``do_sample=False`` is greedy (the filters are then irrelevant)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    top_p_decay: float = 1.0  # 1.0: off
    top_p_bound: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise TrainConfigError(f"temperature must be > 0, got {self.temperature} (use greedy instead)")
        if self.top_k < 0:
            raise TrainConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise TrainConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.top_p_decay <= 1.0:
            raise TrainConfigError(f"top_p_decay must be in (0, 1], got {self.top_p_decay}")
        if not 0.0 <= self.top_p_bound <= 1.0:
            raise TrainConfigError(f"top_p_bound must be in [0, 1], got {self.top_p_bound}")


def decayed_top_p(top_p: float, decay: float, bound: float) -> float:
    """The top-p for the next token after one more token was generated (old Megatron-LM semantics)."""
    return max(top_p * decay, bound) if decay != 1.0 else top_p


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int, filter_value: float = -float("inf")) -> torch.Tensor:
    """Keep every token whose logit reaches the k-th largest (ties at the threshold survive)."""
    if top_k <= 0 or top_k >= logits.size(-1):
        return logits
    threshold = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, filter_value)


def apply_top_p(logits: torch.Tensor, top_p: float, filter_value: float = -float("inf")) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose total probability stays within ``1 - top_p``.

    Computed on the ascending sort (as Transformers does) so that the boundary falls on the same token
    bit for bit; the most likely token always survives.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_index = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1.0 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
    return logits.masked_fill(remove, filter_value)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p; returns filtered float logits (removed tokens at -inf)."""
    logits = apply_temperature(logits.float(), temperature)
    logits = apply_top_k(logits, top_k)
    return apply_top_p(logits, top_p)


def choose_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V]; ``top_p`` overrides ``params.top_p`` (the decayed value)."""
    if not params.do_sample:
        return torch.argmax(logits, dim=-1)
    filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p if top_p is None else top_p)
    probs = filtered.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
