"""The zip records of a one-tensor ``torch.save`` archive, laid out around tensor bytes that are written elsewhere.

Why: a ``torch_dist`` data file is a run of such archives (one per tensor chunk), and ``torch.save`` writes each
on the calling thread — a copy of the tensor, its CRC-32 and a write, ~1 GB/s on the 2-core VM, while a
``torch``-format conversion of the same tensors runs at the disk's speed through :class:`RangeWriter` threads.
Knowing the pickle and the tensor's size is enough to lay out the whole archive: :func:`tensor_blob` returns
the bytes before and after the tensor's data (local headers, the small records, the central directory), the
tensor's bytes go to ``head_len`` past the blob's start through the threads, and the data record's CRC-32 is
filled in when the threads have computed it. Records are stored (not compressed), the data record's bytes start
``align``-aligned inside the archive (torch's ``.storage_alignment``), and every record torch writes is there
except ``.data/serialization_id`` (which readers do not require). ``torch.load`` and DCP read the result (tests).
No zip64: an archive of 4 GiB or more is the caller's to write another way (``torch.save``).
"""
from __future__ import annotations

import struct
import sys
import zlib
from dataclasses import dataclass

ZIP32_LIMIT = 0xFFFFFFFF
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # signature .. extra field length (30 bytes)
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_EOCD = struct.Struct("<IHHHHIIH")  # 22 bytes
_VERSION_NEEDED = 20
_DOS_DATE = 0x21  # 1980-01-01


@dataclass
class TensorBlob:
    """A one-tensor archive minus the tensor's bytes: ``head`` + (``nbytes`` of data) + ``tail``."""

    head: bytearray
    tail: bytearray
    nbytes: int
    crc_positions: tuple[int, int]  # the data record's CRC-32 field in ``head`` and in ``tail``

    @property
    def length(self) -> int:
        return len(self.head) + self.nbytes + len(self.tail)

    def set_crc(self, crc: int) -> None:
        """Put the tensor bytes' CRC-32 into the data record's local header and central-directory entry."""
        struct.pack_into("<I", self.head, self.crc_positions[0], crc)
        struct.pack_into("<I", self.tail, self.crc_positions[1], crc)


def _local_header(name: bytes, crc: int, size: int, extra: bytes = b"") -> bytes:
    return _LOCAL.pack(0x04034B50, _VERSION_NEEDED, 0, 0, 0, _DOS_DATE, crc, size, size, len(name),
                       len(extra)) + name + extra


def _central_entry(name: bytes, crc: int, size: int, local_offset: int) -> bytes:
    return _CENTRAL.pack(0x02014B50, _VERSION_NEEDED, _VERSION_NEEDED, 0, 0, 0, _DOS_DATE, crc, size, size,
                         len(name), 0, 0, 0, 0, 0, local_offset) + name


def tensor_blob(pickled: bytes, nbytes: int, prefix: str = "archive", align: int = 64) -> TensorBlob:
    """The archive ``torch.save`` would write for one tensor whose ``data.pkl`` is ``pickled`` (a
    ``_rebuild_tensor_v2`` on storage key ``"0"``) and whose data is ``nbytes`` long, with its data CRC-32 left 0
    (see :meth:`TensorBlob.set_crc`). Raises ``ValueError`` where the archive would need zip64."""
    small = [("data.pkl", bytes(pickled)), (".format_version", b"1"),
             (".storage_alignment", str(align).encode()), ("byteorder", sys.byteorder.encode())]
    head, central = bytearray(), []
    for name, data in small:
        full = f"{prefix}/{name}".encode()
        crc = zlib.crc32(data)
        central.append((full, crc, len(data), len(head)))
        head += _local_header(full, crc, len(data)) + data
    # the data record: an extra field (torch's "FB" padding field) makes its bytes start ``align``-aligned
    full = f"{prefix}/data/0".encode()
    data_local = len(head)
    start = data_local + _LOCAL.size + len(full) + 4  # + the extra field's own 4-byte header
    pad = -start % align
    head += _local_header(full, 0, nbytes, struct.pack("<HH", 0x4246, pad) + bytes(pad))
    crc_in_head = data_local + 14
    tail = bytearray()
    version = b"3\n"
    version_name = f"{prefix}/version".encode()
    version_local = len(head) + nbytes
    tail += _local_header(version_name, zlib.crc32(version), len(version)) + version
    central.insert(len(small), (full, 0, nbytes, data_local))
    central.append((version_name, zlib.crc32(version), len(version), version_local))
    cd_offset = len(head) + nbytes + len(tail)
    crc_in_tail = None
    cd = bytearray()
    for name, crc, size, local in central:
        if name == full:
            crc_in_tail = len(tail) + len(cd) + 16
        cd += _central_entry(name, crc, size, local)
    tail += cd
    tail += _EOCD.pack(0x06054B50, 0, 0, len(central), len(central), len(cd), cd_offset, 0)
    if cd_offset + len(cd) + _EOCD.size >= ZIP32_LIMIT:
        raise ValueError(f"a {nbytes}-byte tensor needs a zip64 archive")
    return TensorBlob(head, tail, nbytes, (crc_in_head, crc_in_tail))
