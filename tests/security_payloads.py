"""Hostile pickles and the helpers that plant them in genuine checkpoints (for ``tests/test_security_*.py``).

A payload is a real exploit: unpickled by plain ``pickle``/``torch.load(weights_only=False)`` it creates the
marker file (``os.system`` / ``eval`` / ``subprocess.Popen``), directly or through a protocol-4 ``STACK_GLOBAL``
with a dotted name under an allowed module. Each payload is pickled with the pure-Python pickler so that any
``(module, name)`` can be written, whatever the real object is.
"""
from __future__ import annotations

import io
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Call:
    """Pickles as ``module.name(*args)`` (GLOBAL / STACK_GLOBAL + REDUCE)."""

    module: str
    name: str
    args: tuple


class _Pickler(pickle._Pickler):
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Call):
            if self.proto >= 4:
                self.save(obj.module)
                self.save(obj.name)
                self.write(pickle.STACK_GLOBAL)
            else:
                self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            self.save(obj.args)
            self.write(pickle.REDUCE)
            return
        super().save(obj, save_persistent_id)


class PickleModule:
    """A ``pickle_module`` for ``torch.save`` that writes :class:`Call` objects as raw calls."""

    Pickler = _Pickler
    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL


def calls(marker: Path) -> dict[str, Call]:
    """The exploits by name; each one creates ``marker`` when it runs."""
    m = str(marker)
    return {
        "os.system": Call("os", "system", (f"touch {m}",)),
        "posix.system": Call("posix", "system", (f"touch {m}",)),
        "eval": Call("builtins", "eval", (f"open({m!r}, 'w').close()",)),
        "popen": Call("subprocess", "Popen", (("touch", m),)),
        # protocol 4 resolves a dotted name as an attribute path: these reach os.system through allowed modules
        "dotted-dcp": Call("torch.distributed.checkpoint.filesystem", "os.system", (f"touch {m}",)),
        "dotted-megatron": Call("megatron.core.parallel_state", "os.system", (f"touch {m}",)),
        "dotted-torch": Call("torch", "serialization.os.system", (f"touch {m}",)),
    }


def pickled(obj, protocol: int) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def torch_saved(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_module=PickleModule, pickle_protocol=protocol)
    return buf.getvalue()


_EXECUTE = """
import io, os, pickle, sys, torch
marker, found = sys.argv[1], []
for path in sys.argv[2:]:
    data = open(path, "rb").read()
    try:
        if data[:2] == b"PK":
            obj = torch.load(io.BytesIO(data), weights_only=False)
        else:
            obj = pickle.loads(data)
        for value in obj.values():
            if hasattr(value, "wait"):  # a Popen: let the child finish
                value.wait()
    except Exception:
        pass
    found.append(os.path.exists(marker))
    if found[-1]:
        os.unlink(marker)
print("".join("1" if f else "0" for f in found))
"""


def executes(datas: list[bytes], marker: Path, tmp: Path) -> list[bool]:
    """For each pickle (or ``torch.save`` zip): whether plain unpickling in a child process creates the marker —
    proves the payloads are real exploits. One child for all (starting Python + torch is the cost)."""
    paths = []
    for i, data in enumerate(datas):
        paths.append(tmp / f"payload-{i}")
        paths[-1].write_bytes(data)
    out = subprocess.run([sys.executable, "-c", _EXECUTE, str(marker), *map(str, paths)], capture_output=True,
                         text=True, timeout=300)
    return [c == "1" for c in out.stdout.strip().splitlines()[-1]]


# ---- planting payloads in a copy of a genuine checkpoint


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def replace_torch_pickle(path: Path, payload: Call, protocol: int = 2) -> None:
    """Put ``payload`` into the dict pickled in the ``torch.save`` file ``path`` (its tensors kept)."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # a genuine file of our own fixtures
    if isinstance(state, dict):
        state["extra"] = payload
    else:
        state = {"state": state, "extra": payload}
    path.write_bytes(torch_saved(state, protocol))


def dcp_storage(it_dir: Path) -> tuple[object, dict]:
    """(metadata, fqn -> storage info) of a torch_dist iteration dir, read by our stand-in unpickler."""
    from formats.checkpoint.dcp_metadata import MetadataUnpickler

    with open(it_dir / ".metadata", "rb") as f:
        md = MetadataUnpickler(f).load()
    return md, {idx.fqn: info for idx, info in md.storage_data.items()}


def write_dcp_metadata(it_dir: Path, md) -> None:
    from formats.checkpoint.dcp_metadata import _Pickler as MetadataPickler

    buf = io.BytesIO()
    MetadataPickler(buf, protocol=pickle.DEFAULT_PROTOCOL).dump(md)
    (it_dir / ".metadata").write_bytes(buf.getvalue())


def replace_dcp_object(it_dir: Path, blob: bytes, key_part: str = "_extra_state") -> str:
    """Append ``blob`` to a ``.distcp`` file and point the first bytes entry whose key contains ``key_part`` at it
    (DCP's ``load_bytes`` hands such entries to ``torch.load(weights_only=False)``)."""
    md, _ = dcp_storage(it_dir)
    for idx, info in md.storage_data.items():
        if key_part in idx.fqn and type(md.state_dict_metadata[idx.fqn]).__name__ == "BytesStorageMetadata":
            data = it_dir / info.relative_path
            info.offset, info.length = data.stat().st_size, len(blob)
            with open(data, "ab") as f:
                f.write(blob)
            write_dcp_metadata(it_dir, md)
            return info.relative_path
    raise AssertionError(f"no bytes entry with {key_part!r} in {it_dir}")


def zip_data_record(path: Path, blob: bytes | None = None) -> tuple[str, int, int]:
    """(name, data offset, size) of the largest ``data/`` record of a torch zip (in ``blob`` at its start)."""
    source = io.BytesIO(blob) if blob is not None else open(path, "rb")
    with source as f, zipfile.ZipFile(f) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        f.seek(info.header_offset)
        n, m = struct.unpack("<HH", f.read(30)[26:30])
        return info.filename, info.header_offset + 30 + n + m, info.file_size


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))
