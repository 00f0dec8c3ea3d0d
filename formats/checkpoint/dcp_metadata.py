"""PyTorch DCP's ``.metadata`` file (the index of a ``torch_dist`` checkpoint) read and written without importing
``torch.distributed.checkpoint``.

Why: the file is a pickle of DCP's dataclasses (``Metadata``, ``TensorStorageMetadata``, ``MetadataIndex``,
``_StorageInfo``, …), and importing them imports DCP, which pulls in DTensor and sympy: 0.45–0.9 s of every
``torch_dist`` conversion or ``inspect`` on the 2-core VM, for a file that holds a few dataclasses. Reading maps
them to :class:`Record` stand-ins (the pickled fields become attributes; :func:`kind` names the class, and also
accepts DCP's own classes); any global that is not one of these exact ``(module, name)`` pairs is refused, so
reading a hostile file runs nothing. Writing pickles stand-ins under
DCP's class names, with the states DCP's own pickling produces, so DCP (and Megatron-Core through it) unpickles
its real classes (tested against DCP's pickles).
"""
from __future__ import annotations

import builtins
import collections
import copyreg
import io
import pickle
from typing import Any, BinaryIO, Iterable

import torch

METADATA = "torch.distributed.checkpoint.metadata"
FILESYSTEM = "torch.distributed.checkpoint.filesystem"
PLANNER = "torch.distributed.checkpoint.planner"
DCP_VERSION = "1.0.0"  # torch.distributed.checkpoint.filesystem.CURRENT_DCP_VERSION (a test compares)
_CONTIGUOUS = 0  # _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT


class Record:
    """A DCP metadata dataclass without DCP: its fields as attributes (class attributes hold the defaults DCP
    leaves out of a pickled state)."""

    def __init__(self, **fields: Any):
        self.__dict__.update(fields)

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots dict)
            for part in state:
                self.__dict__.update(part or {})
        else:
            self.__dict__.update(state)

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (type(self),), self._state()

    def _state(self):
        return dict(self.__dict__)


class _TensorProperties(Record):
    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:  # DCP's own __getstate__: (dtype, layout, requires_grad, memory-format code, pin_memory)
            self.dtype, self.layout, self.requires_grad, self.memory_format, self.pin_memory = state

    def _state(self):
        return (self.dtype, torch.strided, False, _MemoryFormat(_CONTIGUOUS), False)


class _MemoryFormatEnum:
    """Stands for DCP's ``_MEM_FORMAT_ENCODING`` enum class: called with a member's value, returns it."""

    def __new__(cls, value):
        return value


class _EnumValue:
    """Stands for a DCP planner enum (``WriteItemType``, ``LoadItemType``): called with a member's value, returns it."""

    def __new__(cls, value):
        return value


class _MemoryFormat:
    """A ``_MEM_FORMAT_ENCODING`` member to pickle (DCP's enum pickles as ``(enum class, (value,))``)."""

    def __init__(self, value: int):
        self.value = value

    def __reduce_ex__(self, protocol):
        return _MemoryFormatEnum, (self.value,)


def _record(name: str, **defaults: Any) -> type:
    return type(name, (Record,), defaults)


_CLASSES: dict[tuple[str, str], Any] = {
    (METADATA, "Metadata"): _record("Metadata", planner_data=None, storage_data=None, storage_meta=None, version=None),
    (METADATA, "MetadataIndex"): _record("MetadataIndex", offset=None, index=None),
    (METADATA, "StorageMeta"): _record("StorageMeta", checkpoint_id=None, save_id=None, load_id=None, modules=()),
    (METADATA, "TensorStorageMetadata"): _record("TensorStorageMetadata"),
    (METADATA, "BytesStorageMetadata"): _record("BytesStorageMetadata"),
    (METADATA, "ChunkStorageMetadata"): _record("ChunkStorageMetadata"),
    (METADATA, "TensorProperties"): type("TensorProperties", (_TensorProperties,), {}),
    (METADATA, "_MEM_FORMAT_ENCODING"): _MemoryFormatEnum,
    (FILESYSTEM, "_StorageInfo"): _record("_StorageInfo", transform_descriptors=None),
    # Megatron-Core's save planner keeps its plans in ``Metadata.all_local_plans`` (checked: 0.16.1)
    (PLANNER, "SavePlan"): _record("SavePlan", planner_data=None, storage_data=None, usable=True),
    (PLANNER, "LoadPlan"): _record("LoadPlan", planner_data=None, storage_data=None),
    (PLANNER, "WriteItem"): _record("WriteItem", bytes_io_data=None, tensor_data=None),
    (PLANNER, "ReadItem"): _record("ReadItem"),
    (PLANNER, "TensorWriteData"): _record("TensorWriteData"),
    (PLANNER, "BytesIOWriteData"): _record("BytesIOWriteData"),
    (PLANNER, "WriteItemType"): _EnumValue,
    (PLANNER, "LoadItemType"): _EnumValue,
}
_NAMES = {cls: key for key, cls in _CLASSES.items()}


def kind(md) -> str:
    """The DCP class name of a metadata object (stand-in or DCP's own)."""
    return type(md).__name__


# ---- reading


def _torch_names(kinds: tuple) -> frozenset:
    return frozenset(n for n in dir(torch) if isinstance(getattr(torch, n, None), kinds))


# exact (module, name) pairs besides the stand-ins: nothing is looked up by a name taken from the file
_TORCH_VALUES = _torch_names((torch.dtype, torch.layout, torch.memory_format))
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # "torch.strided" -> the layout
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", n): getattr(torch, n) for n in _TORCH_VALUES},
    **{("builtins", n): getattr(builtins, n) for n in ("set", "frozenset", "tuple", "list", "dict", "slice")},
}


def allowed_global(module: str, name: str) -> Any | None:
    """The object an allowed ``(module, name)`` global of DCP metadata stands for, None when it is refused.
    Only exact pairs: a dotted name (pickle protocol 4 resolves ``STACK_GLOBAL("pkg.mod", "os.system")`` as an
    attribute path) or any other attribute of an allowed module never resolves."""
    key = (module, name)
    return _CLASSES.get(key) or _ALLOWED.get(key)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP ``.metadata`` allowing only DCP's metadata dataclasses (always as stand-ins: DCP is never
    imported) and torch's size/dtype/layout types, each by its exact ``(module, name)``."""

    def find_class(self, module: str, name: str):
        obj = allowed_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (not allowed in DCP metadata)")
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id (not allowed in DCP metadata)")


# ---- writing


def index(fqn: str, offset: Iterable[int] | None = None) -> Record:
    """A ``MetadataIndex`` (a key of ``storage_data``; hashed by identity, as keys are made once each)."""
    fields: dict[str, Any] = {"fqn": fqn, "index": None}
    if offset is not None:
        fields["offset"] = torch.Size(offset)
    return _CLASSES[METADATA, "MetadataIndex"](**fields)


def storage_info(relative_path: str, offset: int, length: int) -> Record:
    """A ``_StorageInfo``: where a chunk's ``torch.save`` blob lies."""
    return _CLASSES[FILESYSTEM, "_StorageInfo"](relative_path=relative_path, offset=offset, length=length)


def tensor_metadata(dtype: torch.dtype, size: Iterable[int], chunks: Iterable[tuple[tuple, tuple]]) -> Record:
    cls = _CLASSES[METADATA, "ChunkStorageMetadata"]
    return _CLASSES[METADATA, "TensorStorageMetadata"](
        properties=_CLASSES[METADATA, "TensorProperties"](dtype=dtype), size=torch.Size(size),
        chunks=[cls(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in chunks])


def bytes_metadata() -> Record:
    return _CLASSES[METADATA, "BytesStorageMetadata"]()


class _Pickler(pickle._Pickler):
    """The pure-Python pickler, writing the stand-in classes under DCP's names (without importing DCP to check)."""

    def save_global(self, obj, name=None):
        target = _NAMES.get(obj) if isinstance(obj, type) else None
        if target is None:
            return super().save_global(obj, name)
        module, qualname = target
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
        self.memoize(obj)


def dump_metadata(state_dict_metadata: dict, storage_data: dict, f: BinaryIO) -> None:
    """Write DCP's ``Metadata(state_dict_metadata, storage_data=…, storage_meta=StorageMeta(), version=…)``."""
    md = _CLASSES[METADATA, "Metadata"](
        state_dict_metadata=state_dict_metadata, planner_data=None, storage_data=storage_data,
        storage_meta=_CLASSES[METADATA, "StorageMeta"](checkpoint_id=None, save_id=None, load_id=None, modules=[]),
        version=DCP_VERSION)
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.DEFAULT_PROTOCOL).dump(md)
    f.write(buf.getvalue())
