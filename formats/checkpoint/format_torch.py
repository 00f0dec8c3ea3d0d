"""The Megatron-LM per-rank ``torch`` checkpoint format (docs/checkpoint-formats.md §1–§2): its streaming writer
and its registry entry.

The reader is :class:`formats.checkpoint.megatron.MegatronTorchCheckpoint`. Each tensor goes straight into its
rank's zip archive as a storage record (torch's zip format stores records independently); only the small pickle is
written at the end. The record bytes are written by :class:`~formats.checkpoint.rangewrite.RangeWriter` threads
(O_DIRECT), files byte-identical to torch's own ``write_record``. Memory: one tensor plus at most 128 MiB queued
for the threads.
"""
from __future__ import annotations

import argparse
import collections
from pathlib import Path
from typing import Any

import torch

from formats.checkpoint.common import check_expected
from formats.checkpoint.protocol import FormatSpec
from formats.checkpoint.megatron import RANK_FILE, MegatronTorchCheckpoint, resolve_iteration_dir
from formats.checkpoint.rangewrite import RangeWriter
from formats.checkpoint.streaming import StagedWriter, StreamingTorchFile, TensorRef, plain_args
from formats.checkpoint.tracker import Tracker, rank_dirname
from formats.errors import InteropError
from formats.layout import Layout


def _with_layout(args: argparse.Namespace | None, layout: Layout, where) -> argparse.Namespace | None:
    """Record the layout in ``args`` (Megatron checks TP/PP of torch-format files against it, docs/checkpoint-formats.md §1.5)."""
    if args is None:
        return None
    fields = {"tensor_model_parallel_size": layout.tp, "pipeline_model_parallel_size": layout.pp}
    if layout.interleaved:
        fields["virtual_pipeline_model_parallel_size"] = layout.vpp
    if layout.ep > 1:
        fields["expert_model_parallel_size"] = layout.ep
    for name, value in fields.items():
        have = getattr(args, name, None)
        if have is not None and int(have) != value:
            raise InteropError(f"args.{name}={have} contradicts the layout {layout} being written", path=where)
        setattr(args, name, value)
    return args


def nest_legacy(flat: dict[str, Any]) -> dict[str, Any]:
    """Legacy (pre-mcore) nesting of dotted names (docs/checkpoint-formats.md §2.1): ``language_model.embedding.word_embeddings.weight``
    -> ``{'language_model': {'embedding': {'word_embeddings': {'weight': …}}}}``; ``encoder``/``decoder``/``pooler``
    and top-level heads keep flat keys inside (``{'encoder': {'layers.0.input_norm.weight': …}}``)."""
    out: dict[str, Any] = collections.OrderedDict()
    for name, value in flat.items():
        head, _, rest = name.partition(".")
        if head == "language_model":
            section, _, rest = rest.partition(".")
            node = out.setdefault("language_model", collections.OrderedDict()).setdefault(section, collections.OrderedDict())
            if section == "embedding":
                sub, _, leaf = rest.partition(".")
                node.setdefault(sub, collections.OrderedDict())[leaf] = value
            else:
                node[rest] = value
        elif rest:
            out.setdefault(head, collections.OrderedDict())[rest] = value
        else:
            out[head] = value
    return out


class MegatronTorchWriter(StagedWriter):
    """Megatron-LM per-rank ``torch`` checkpoint: ``<dst>/iter_XXXXXXX|release/mp_rank_TT[_PPP]/model_optim_rng.pt``.

    ``add(name, tensor, tp, pp, chunk=0)`` streams the tensor into that rank's file; ``add(name, None, …)`` or any
    picklable non-tensor value is kept in the pickle (``_extra_state`` entries). Names starting with
    ``language_model.`` are nested the legacy way. ``set_top(key, value, tp, pp)`` adds other top-level entries
    (``optimizer``, ``rng_state``, …). A weights-only checkpoint should be ``release=True`` (docs/checkpoint-formats.md §1.5, T14).
    ``expected`` maps ``(tp, pp, chunk)`` to the names (or name -> shape) that chunk must hold (docs/checkpoint-formats.md trap T12).
    """

    def __init__(self, dst, layout: Layout, iteration: int | None = None, release: bool = False,
                 args: argparse.Namespace | dict | None = None, checkpoint_version: float = 3.0,
                 force: bool = False, expected: dict | None = None):
        if iteration is None and not release:
            raise InteropError("MegatronTorchWriter needs an iteration or release=True")
        super().__init__(dst, force)
        self.layout = layout
        self.tracker = Tracker(0 if release else int(iteration), release)
        self.args = _with_layout(plain_args(args), layout, self.dst)
        self.checkpoint_version = checkpoint_version
        self.expected = expected
        self._files: dict[tuple[int, int, int], StreamingTorchFile] = {}
        self._io = RangeWriter()  # rank files' tensor bytes, written by threads while the caller goes on
        self._models: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
        self._top: dict[tuple[int, int, int], dict[str, Any]] = {}
        (self.tmp / self.tracker.dirname).mkdir()

    def _rank(self, tp: int, pp: int, ep: int = 0) -> tuple[int, int, int]:
        key = (tp, pp, ep)
        if not (0 <= tp < self.layout.tp and 0 <= pp < self.layout.pp and 0 <= ep < self.layout.ep):
            raise InteropError(f"rank tp={tp} pp={pp} ep={ep} is outside layout {self.layout}", path=self.dst)
        if key not in self._files:
            d = self.tmp / self.tracker.dirname / rank_dirname(
                tp, pp if self.layout.pp > 1 else None, ep if self.layout.ep > 1 else None
            )
            d.mkdir()
            self._files[key] = StreamingTorchFile(d / RANK_FILE, self._io)
            self._models[key] = [collections.OrderedDict() for _ in range(self.layout.virtual_chunks)]
            self._top[key] = {}
        return key

    def add(self, name: str, tensor: Any, tp: int = 0, pp: int = 0, chunk: int = 0, ep: int = 0) -> None:
        key = self._rank(tp, pp, ep)
        if not 0 <= chunk < self.layout.virtual_chunks:
            raise InteropError(f"chunk {chunk} outside layout {self.layout}", path=self.dst)
        model = self._models[key][chunk]
        if name in model:
            raise InteropError(f"tensor {name!r} written twice to tp={tp} pp={pp} chunk={chunk}", path=self.dst)
        model[name] = self._files[key].add_tensor(tensor) if isinstance(tensor, torch.Tensor) else tensor

    def set_top(self, key: str, value: Any, tp: int = 0, pp: int = 0, ep: int = 0) -> None:
        if key in ("model", "args", "iteration", "checkpoint_version") or key.startswith("model"):
            raise InteropError(f"top-level entry {key!r} is managed by the writer", path=self.dst)
        rank = self._rank(tp, pp, ep)
        self._top[rank][key] = self._stream_nested(value, self._files[rank])

    @classmethod
    def _stream_nested(cls, value: Any, file: "StreamingTorchFile") -> Any:
        """Tensors inside a top-level value (RNG states, optimizer state) streamed as records of the rank file."""
        if isinstance(value, torch.Tensor):
            return file.add_tensor(value)
        if isinstance(value, dict):
            return type(value)((k, cls._stream_nested(v, file)) for k, v in value.items())
        if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
            return type(value)(cls._stream_nested(v, file) for v in value)
        return value

    def finalize(self) -> Path:
        ranks = {(t, p, e) for t in range(self.layout.tp) for p in range(self.layout.pp) for e in range(self.layout.ep)}
        missing = sorted(ranks - set(self._files))
        if missing:
            raise InteropError(f"no tensors were written for rank(s) (tp, pp, ep) {missing[:4]}", path=self.dst)
        for (tp, pp, ep), chunks in self._models.items():
            for c, model in enumerate(chunks):
                exp = (self.expected or {}).get((tp, pp, c))
                written = {n: tuple(v.shape) if isinstance(v, TensorRef) else () for n, v in model.items()}
                check_expected(written, exp, f"{self.dst} (tp={tp} pp={pp} chunk={c})")
        for key, file in self._files.items():
            chunks = self._models[key]
            chunks = [nest_legacy(m) if any(n.startswith("language_model.") for n in m) else m for m in chunks]
            top: dict[str, Any] = {}
            if self.args is not None:
                top["args"] = self.args
            top["checkpoint_version"] = self.checkpoint_version
            top["iteration"] = self.tracker.iteration
            if len(chunks) == 1:
                top["model"] = chunks[0]
            else:
                top.update({f"model{i}": m for i, m in enumerate(chunks)})
            top.update(self._top[key])
            file.finish(top)
        if self._io is not None:
            self._io.close()
        self.tracker.write(self.tmp)  # last, so a reader never sees a tracker without files
        return self._stage.commit()

    def _close(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:
                pass
        if self._io is not None:
            self._io.close()


def save_rank_state(iteration_dir: str | Path, rank_dir: str, state: dict[str, Any]) -> Path:
    """Write one model-parallel rank's whole state (model chunks, optimizer, scheduler, iteration, args, RNG) as
    ``<iteration_dir>/<rank_dir>/model_optim_rng.pt`` with torch's own serializer, as Megatron-LM's own save does.

    Why torch.save here and not :class:`MegatronTorchWriter`: a training rank holds its state in memory anyway and
    its non-tensor entries (optimizer and scheduler dicts, RNG states) are arbitrary picklable objects; the
    streaming writer exists for conversions that must not hold a checkpoint in memory. The caller stages
    ``iteration_dir`` and publishes it (the trainer renames it into place and then writes the tracker)."""
    sub = Path(iteration_dir) / rank_dir
    sub.mkdir(parents=True, exist_ok=True)
    path = sub / RANK_FILE
    torch.save(state, path)
    return path


def is_torch_path(path: Path) -> bool:
    """A save, iteration or rank directory with ``mp_rank_*`` files, or a file (a rank file, checked on opening)."""
    it_dir, _ = resolve_iteration_dir(path)
    return path.is_file() or any(it_dir.glob("mp_rank_*"))


FORMAT = FormatSpec(  # only loadable at the layout it was written at
    name="torch", kind="megatron", stored_as=("torch",), per_rank_files=True,
    expects="a Megatron save dir or iter_*/release dir with mp_rank_*/, or a model_optim_rng.pt file",
    detect=is_torch_path, open=MegatronTorchCheckpoint.open, writer=MegatronTorchWriter,
)
