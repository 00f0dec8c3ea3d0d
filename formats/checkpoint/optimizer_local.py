"""The non-distributed optimizer's state in a per-rank ``model_optim_rng.pt`` (its ``optimizer`` entry), as
Megatron-Core 0.16 writes it (``optimizer.py``, ``state_dict``):

* ``FP32Optimizer`` (fp32 training): torch's own ``Adam.state_dict()`` — ``{'state': {index: {'step',
  'exp_avg', 'exp_avg_sq'}}, 'param_groups': [{…, 'params': [index, …]}]}``; the main params are the model's
  weights themselves.
* ``Float16OptimizerWithFloat16Params`` (fp16/bf16): ``{'optimizer': <that Adam state dict>, 'grad_scaler':
  {…} (when there is one), 'fp32_from_fp16_params': [[fp32 main param, …] per param group]}``.

Indices count the parameters of all groups in group order (torch's convention). Which model parameter an index
is, is not stored: the interop layer replays Megatron-Core's param-group rules (:mod:`interop.optimizer_local`).
A ``ChainedOptimizer`` of several optimizers (a list) is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from formats.errors import FormatError

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class LocalOptimizerState:
    """One rank's non-distributed optimizer state, structure checked."""

    mixed_precision: bool  # True: Float16OptimizerWithFloat16Params (fp32 main params stored separately)
    param_groups: list[dict]  # torch's, each with its 'params' index list
    state: dict[int, dict]  # index -> {'step', 'exp_avg', 'exp_avg_sq'}
    main_params: list[list[torch.Tensor]] | None  # fp32_from_fp16_params (mixed precision only)
    grad_scaler: dict | None

    def step(self, path: Path) -> Any:
        """The Adam step all parameters share (Megatron-Core supports no other)."""
        steps = [s["step"] for s in self.state.values() if "step" in s]
        if not steps:
            return None
        if any(float(s) != float(steps[0]) for s in steps):
            raise FormatError("the optimizer's parameters disagree on the Adam step", path=path)
        return steps[0]


def parse_local_optimizer(entry: Any, path: Path) -> LocalOptimizerState | None:
    """The structure of a ``model_optim_rng.pt`` ``optimizer`` entry of a non-distributed optimizer; None when it
    holds no per-parameter state (weights-only save, or an optimizer that never stepped)."""
    if entry is None:
        return None
    if isinstance(entry, list):
        raise FormatError("several chained optimizers (expert parallelism) are not supported", path=path)
    if not isinstance(entry, dict):
        raise FormatError(f"optimizer entry is a {type(entry).__name__}, expected a dict", path=path)
    mixed = "fp32_from_fp16_params" in entry
    inner = entry.get("optimizer") if mixed else entry
    if not isinstance(inner, dict) or not isinstance(inner.get("state"), dict) \
            or not isinstance(inner.get("param_groups"), list):
        return None
    state, groups = inner["state"], inner["param_groups"]
    if not state:
        return None
    ids = [i for g in groups for i in (g.get("params") or [])]
    if sorted(ids) != list(range(len(ids))):
        raise FormatError("optimizer param groups do not index 0..N-1", path=path)
    for i, s in state.items():
        if i not in ids or not isinstance(s, dict) or any(not isinstance(s.get(k), torch.Tensor) for k in MOMENTS):
            raise FormatError(f"optimizer state of parameter {i!r} lacks exp_avg/exp_avg_sq", path=path)
    main = None
    if mixed:
        main = entry["fp32_from_fp16_params"]
        if not isinstance(main, list) or [len(g) for g in main] != [len(g.get("params") or []) for g in groups] \
                or not all(isinstance(t, torch.Tensor) for g in main for t in g):
            raise FormatError("fp32_from_fp16_params does not match the param groups", path=path)
    scaler = entry.get("grad_scaler") if mixed else None
    return LocalOptimizerState(mixed, groups, state, main, scaler)


def build_local_optimizer(mixed_precision: bool, param_groups: list[dict], state: dict[int, dict],
                          main_params: list[list[torch.Tensor]] | None, grad_scaler: dict | None) -> dict:
    """The ``optimizer`` entry Megatron-Core's ``load_state_dict`` of that optimizer class takes."""
    adam = {"state": state, "param_groups": param_groups}
    if not mixed_precision:
        return adam
    out: dict = {"optimizer": adam, "fp32_from_fp16_params": main_params}
    if grad_scaler is not None:
        out["grad_scaler"] = grad_scaler
    return out
