"""Non-distributed optimizer state (``model_optim_rng.pt``'s ``optimizer`` entry, :mod:`formats.checkpoint.optimizer_local`)
as per-parameter canonical tensors, and back at any TP/PP.

Why a module of its own: the state is indexed by torch's parameter numbers, which name no parameter. Megatron-Core
0.16.1 numbers them by its param groups (``_get_param_groups``): the groups sorted with the default one
(``wd_mult`` 1) first and the no-weight-decay one (``wd_mult`` 0: biases and 1-D parameters) second, each listing
the rank's model chunks' ``named_parameters()`` in registration order — the order :func:`chunk_params` replays
for the grad buffers. Groups with other overrides (decoupled LR, ``apply_wd_to_qk_layernorm``) are refused.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from formats.checkpoint.megatron import release_pages
from formats.checkpoint.optimizer_local import LocalOptimizerState, build_local_optimizer, parse_local_optimizer
from interop import scratch
from interop.convert_megatron import canonical_shape
from interop.errors import ConversionError
from interop.families.base import ModelConfig
from interop.optimizer_layout import TIED_OUTPUT, chunk_params, local_shape

LOCAL = "local"  # OptimizerMeta.sharding of a non-distributed optimizer (torch: model_optim_rng.pt)
LOCAL_DIST = "local_model_space"  # … saved as torch_dist: model-shaped optimizer.state.{kind}.<model key>
Member = tuple[int, str, str]  # (model chunk, canonical slot name — TIED_OUTPUT for the tied copy, stored name)


def _source_name(name: str, cfg: ModelConfig) -> str:
    """The canonical tensor whose state a slot holds (a tied model's output copy holds the embedding's)."""
    return "embedding.word_embeddings.weight" if name == TIED_OUTPUT and cfg.tie_word_embeddings else name


def _no_weight_decay(name: str, cfg: ModelConfig) -> bool:
    """Megatron-Core's standard override: ``*.bias`` and 1-D parameters get ``wd_mult`` 0."""
    return name.endswith(".bias") or len(canonical_shape(_source_name(name, cfg), cfg)) == 1


def group_members(cfg: ModelConfig, layout, pp_rank: int, groups: list[dict]) -> list[list[Member]]:
    """Per param group, the (TP-independent) parameters of pipeline rank ``pp_rank`` in torch's index order."""
    params = [(v, name, local) for v in range(layout.virtual_chunks)
              for name, local, _ in chunk_params(cfg, layout, pp_rank, v)]
    mults = [float(g.get("wd_mult", 1.0)) for g in groups]
    if sorted(mults) != sorted(set(mults)) or not set(mults) <= {0.0, 1.0}:
        raise ConversionError(f"optimizer param groups with wd_mult {mults}: only Megatron-Core's standard groups "
                              "(weight decay / none) can be mapped to parameters")
    if any(k in g for g in groups for k in ("is_decoupled_lr",) if g.get(k)):
        raise ConversionError("optimizer param groups with a decoupled learning rate are not supported")
    return [[p for p in params if _no_weight_decay(p[1], cfg) == (m == 0.0)] for m in mults]


def check_local_spec(ckpt, cfg: ModelConfig, layout, what: str, check_names: bool = True) -> None:
    """Refuse optimizer state whose parameter order is not the local spec's: a Transformer-Engine spec registers
    other modules (another buffer layout, other indices), and a rank file must hold exactly the local-spec
    parameters :func:`chunk_params` orders (``check_names``; per-rank ``torch`` files)."""
    impl = ckpt.arg("transformer_impl", default="local")
    if ckpt.key_style == "mcore_te" or impl == "transformer_engine":
        raise ConversionError(f"{what} of a Transformer-Engine-spec model: its parameter order (and so its layout) "
                              "is not the local spec's; not supported yet", path=ckpt.path)
    if not check_names:
        return
    for t in range(layout.tp):
        for p in range(layout.pp):
            for v in range(layout.virtual_chunks):
                stored = {n for n, x in ckpt.rank_state(t, p, v).items()
                          if isinstance(x, torch.Tensor) and not n.endswith("_extra_state")}
                mine = {local for _, local, _ in chunk_params(cfg, layout, p, v)}
                if stored != mine:
                    odd = sorted(stored ^ mine)[:3]
                    raise ConversionError(f"tp={t} pp={p} chunk={v}: model parameters {odd} are not the local "
                                          f"spec's; cannot decode its {what}", path=ckpt.path)


class LocalSource:
    """Reads one parameter's TP shard out of the rank files' non-distributed optimizer state (the
    ``_FlatSource`` interface of :mod:`interop.optimizer_state`)."""

    def __init__(self, ckpt, cfg: ModelConfig, layout):
        self.ckpt, self.cfg, self.layout = ckpt, cfg, layout
        check_local_spec(ckpt, cfg, layout, "non-distributed optimizer state")
        self._ranks: dict[tuple[int, int], tuple[LocalOptimizerState, dict]] = {}

    def _rank(self, t: int, p: int) -> tuple[LocalOptimizerState, dict]:
        if (t, p) not in self._ranks:
            path = self.ckpt.path / self.ckpt.rank_dir(t, p)
            parsed = parse_local_optimizer(self.ckpt.rank_file(t, p).top.get("optimizer"), path)
            if parsed is None:
                raise ConversionError("rank file holds no optimizer state", path=path)
            members = group_members(self.cfg, self.layout, p, parsed.param_groups)
            where = {}
            for g, (group, mine) in enumerate(zip(parsed.param_groups, members)):
                ids = group.get("params") or []
                if len(ids) != len(mine):
                    raise ConversionError(f"optimizer param group {g} holds {len(ids)} parameters, the model's "
                                          f"pipeline stage {p} has {len(mine)} there (another model or layer spec?)",
                                          path=path)
                where.update({(v, name): (g, j, i) for j, ((v, name, local), i) in enumerate(zip(mine, ids))})
            self._ranks[(t, p)] = (parsed, where)
        return self._ranks[(t, p)]

    def shard(self, name: str, kind: str, t: int, p: int, v: int, out: torch.Tensor | None = None) -> torch.Tensor:
        parsed, where = self._rank(t, p)
        g, j, i = where[(v, name)]
        if kind == "param":
            src = parsed.main_params[g][j] if parsed.mixed_precision else self._weight(name, t, p, v)
        else:
            src = parsed.state.get(i, {}).get(kind)
            if src is None:
                raise ConversionError(f"no {kind} for {name} (parameter {i}) at tp={t} pp={p}", path=self.ckpt.path)
        shape = local_shape(_source_name(name, self.cfg), self.cfg, self.layout.tp, t)
        if tuple(src.shape) != shape:
            raise ConversionError(f"{kind} of {name} at tp={t} pp={p} has shape {tuple(src.shape)}, the model's "
                                  f"shard is {shape}", path=self.ckpt.path)
        n = src.numel() if out is None else out.numel()
        dst = scratch.empty((n,), torch.float32) if out is None else out.view(-1)
        dst.copy_(src.reshape(-1)[:n])
        release_pages(src)
        return dst.view(shape) if out is None else out

    def _weight(self, name: str, t: int, p: int, v: int) -> torch.Tensor:
        """FP32Optimizer's main param: the model weight itself."""
        local = next(lo for n, lo, _ in chunk_params(self.cfg, self.layout, p, v) if n == name)
        tensor = self.ckpt.rank_state(t, p, v).get(local)
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(f"no weight {local} at tp={t} pp={p} chunk={v}", path=self.ckpt.path)
        return tensor


def local_state(ckpt):
    """The first rank's parsed non-distributed optimizer state (None: there is none)."""
    if ckpt.format != "torch" or not ckpt.rank_keys():
        return None
    key = ckpt.rank_keys()[0]
    return parse_local_optimizer(ckpt.rank_file(*key).top.get("optimizer"), ckpt.path / ckpt.rank_dir(*key[:2]))


def step_tensor(step) -> torch.Tensor:
    """torch Adam's per-parameter ``step`` (a float32 scalar tensor since torch 1.12)."""
    return torch.tensor(float(step), dtype=torch.float32)


def write_rank_optimizers(set_top: Callable, states: Callable[[set[str]], Iterator], shards_of: Callable,
                          placements: Callable, cfg: ModelConfig, meta, layout) -> None:
    """Every target rank's ``optimizer`` entry (``set_top('optimizer', value, t, p)``), one pipeline stage at a
    time: a stage's state is held until its ranks' entries are written (3 x its fp32 parameters at most).
    ``states(names)`` streams ``(name, ParamState)``, ``shards_of(name, kind, tensor)`` cuts TP shards,
    ``placements(name)`` gives ``(pp, chunk, slot name)`` of every copy."""
    mixed = meta.dtypes[0] != torch.float32
    kinds = ("param", "exp_avg", "exp_avg_sq") if mixed else ("exp_avg", "exp_avg_sq")
    step = meta.step
    groups = [{k: v for k, v in g.items() if k != "step"} for g in meta.param_groups]
    for p in range(layout.pp):
        members = group_members(cfg, layout, p, meta.param_groups)
        wanted = {_source_name(n, cfg) for mine in members for _, n, _ in mine}
        held: dict[tuple[int, int, str], dict[str, torch.Tensor]] = {}
        for name, state in states(wanted):
            for kind in kinds:
                tensor = state[kind]
                shards = shards_of(name, kind, tensor)
                for q, v, slot in placements(name):
                    if q != p:
                        continue
                    for t, shard in enumerate(shards):
                        owned = shard.clone() if shard.untyped_storage().nbytes() != shard.nbytes else shard
                        held.setdefault((t, v, slot), {})[kind] = owned
                del tensor, shards
        for t in range(layout.tp):
            index, adam, main, out_groups = 0, {}, [], []
            for group, mine in zip(groups, members):
                ids, fp32 = [], []
                for v, name, _ in mine:
                    st = held.pop((t, v, name))
                    adam[index] = {"step": step_tensor(step), "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
                    fp32.append(st.get("param"))
                    ids.append(index)
                    index += 1
                out_groups.append({**group, "params": ids})
                main.append(fp32)
            set_top("optimizer", build_local_optimizer(mixed, out_groups, adam, main if mixed else None,
                                                       meta.grad_scaler), t, p)
