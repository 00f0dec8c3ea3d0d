"""A toy checkpoint format for tests/test_formats_registry.py: one directory with ``flat.safetensors`` (every tensor)
and ``flat.json`` (the layout). It is the whole of what a format implements — reader, writer, format object — in
one module, registered at run time without touching any other file."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from formats.checkpoint.common import TensorInfo
from formats.checkpoint.hf import SAFETENSORS_DTYPES, read_safetensors_header
from formats.checkpoint.protocol import FormatSpec
from formats.checkpoint.streaming import StagedWriter
from formats.errors import FormatError
from formats.layout import Layout

WEIGHTS, INFO = "flat.safetensors", "flat.json"


class FlatCheckpoint:
    kind = "hf"
    format = "flat"

    def __init__(self, path: Path):
        self.path = path
        self.layout = Layout(**json.loads((path / INFO).read_text())["layout"])
        self._header = read_safetensors_header(path / WEIGHTS)

    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(n, tuple(e["shape"]), SAFETENSORS_DTYPES[e["dtype"]], WEIGHTS)
                for n, e in sorted(self._header.items())]

    def load(self, name: str) -> torch.Tensor:
        if name not in self._header:
            raise FormatError(f"no tensor {name!r}", path=self.path / WEIGHTS)
        with safe_open(str(self.path / WEIGHTS), "pt") as f:
            return f.get_tensor(name)


class FlatWriter(StagedWriter):
    def __init__(self, dst, layout: Layout = Layout(), force: bool = False):
        super().__init__(dst, force)
        self.layout = layout
        self._tensors: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self._tensors[name] = tensor.detach().contiguous()

    def finalize(self) -> Path:
        save_file(self._tensors, str(self.tmp / WEIGHTS))
        (self.tmp / INFO).write_text(json.dumps({"layout": {"tp": self.layout.tp, "pp": self.layout.pp}}))
        return self._stage.commit()


def is_flat_dir(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / INFO).is_file()


FORMAT = FormatSpec(name="flat", kind="hf", stored_as=("flat",), per_rank_files=False,
                    expects="a flat dir (flat.safetensors + flat.json)", detect=is_flat_dir, open=FlatCheckpoint,
                    writer=FlatWriter)
