"""``RangeWriter``: write tensors' bytes at known offsets of files, off the calling thread, mostly with O_DIRECT.

Why O_DIRECT: on the development VM (ext4 on virtio-blk, free-page reporting on) a buffered ``write()`` has to
fill fresh page-cache pages, and what that costs swings with the host: 6 GB from two threads took 1.7–6.1 s
and 4–11 CPU-seconds of kernel time (``copy_folio_from_iter_atomic``) in back-to-back runs. ``O_DIRECT`` writes
of the same bytes from reused, page-aligned buffers run at 1.5–2.25 GB/s for ~0.3 CPU-seconds and are durable
when they return — on two cores that CPU is what the transposes and CRCs of a conversion need (A/B on a
GPT-2-XL HF -> Megatron conversion: buffered 10.6–11.9 s, O_DIRECT 8.6–9.1 s). Both writers of a conversion
(HF safetensors and Megatron torch zip records) know every tensor's file offset in advance, so the bytes can be
written in any order by worker threads while the caller prepares the next tensor (``pwrite``, the CRC-32 of
:mod:`formats.checkpoint.crc` and torch copies all release the GIL).

Each range is split at page boundaries: the page-aligned middle goes through a staging buffer with ``O_DIRECT``,
the unaligned head and tail (and small ranges, and everything where ``O_DIRECT`` is refused) go through a plain
buffered ``pwrite`` — so the bytes on disk are exactly the tensor's bytes either way. (The middle cannot go
straight from the tensor: O_DIRECT wants memory and file offset aligned alike to 512 bytes here, and a tensor's
address and its record's offset are unrelated.) Memory: the tensors queued are held until written; ``write``
waits while more than ``max_inflight`` bytes are queued.
"""
from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from formats.checkpoint.crc import crc32

PAGE = 4096
CHUNK = 8 << 20  # staging chunk for contiguous tensors
SMALL = 1 << 20  # ranges below this are written buffered (O_DIRECT buys nothing there)


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor's bytes as a flat uint8 view (no copy)."""
    t = tensor.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("flat_bytes needs a contiguous CPU tensor")
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


class _File:
    def __init__(self, path: os.PathLike | str, direct: bool):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        self.dfd = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                self.dfd = None

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd is not None:
                os.close(fd)
        self.fd = self.dfd = None


class _Buffers:
    """At most ``count`` page-aligned buffers (anonymous mappings, reused: their pages are faulted in once);
    ``take(n)`` waits until one is free and returns one of at least ``n`` bytes (replacing a smaller one)."""

    def __init__(self, count: int):
        self._free: list[mmap.mmap] = []
        self._left = count
        self._cond = threading.Condition()

    def take(self, n: int) -> mmap.mmap:
        with self._cond:
            while not self._free and not self._left:
                self._cond.wait()
            if self._free:
                buf = max(self._free, key=len)
                self._free.remove(buf)
                if len(buf) >= n:
                    return buf
                # too small: dropped (unmapped once the last view of it is gone) and replaced
            else:
                self._left -= 1
        return mmap.mmap(-1, n)

    def give(self, buf: mmap.mmap) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._free = []  # unmapped once the last view of each is gone


class _Job:
    """One ``write`` call: its future completes when the CRC is known and every piece is on its way out."""

    def __init__(self, future: Future):
        self.future = future
        self.pending = 1  # the preparation itself; each queued O_DIRECT piece adds one
        self.value = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.pending += 1

    def done(self, exc: BaseException | None = None) -> None:
        with self._lock:
            self.pending -= 1
            last = self.pending == 0
        if self.future.done():
            return
        if exc is not None:
            self.future.set_exception(exc)
        elif last:
            self.future.set_result(self.value)


class RangeWriter:
    """Queue ``write(key, offset, tensor)`` jobs for files opened with ``open(key, path)``; ``crc=True`` returns
    each range's CRC-32 (the zip checksum) from the job's future. Call ``wait()`` before reading
    the files back or closing; ``close()`` always.

    Two kinds of threads: ``threads`` *preparers* copy strided tensors and staging chunks into reused
    page-aligned buffers and compute CRCs (CPU), ``io_threads`` *writers* only issue the ``O_DIRECT`` writes of
    prepared buffers (waiting on the disk). So the disk always has writes queued while the CPU prepares the
    next ones — with one kind of thread doing both, the disk sat idle ~40 % of a GPT-2-XL conversion."""

    def __init__(self, threads: int = 2, max_inflight: int = 128 << 20, direct: bool = True, io_threads: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="interop-write")
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="interop-io")
        self._chunks = _Buffers(threads + io_threads)  # staging for contiguous tensors (CHUNK each)
        self._placed = _Buffers(threads + io_threads)  # whole copies of strided tensors
        self._files: dict = {}
        self._direct = direct
        self._cond = threading.Condition()
        self._inflight = 0
        self._max = max_inflight
        self._futures: list[Future] = []
        self.direct_bytes = 0  # bytes that went out with O_DIRECT (for tests and benchmarks)

    def open(self, key, path: os.PathLike | str) -> None:
        self._files[key] = _File(path, self._direct)

    def write(self, key, offset: int, tensor: torch.Tensor, crc: bool = False) -> Future:
        """Write ``tensor``'s bytes (CPU; row-major order) at ``offset`` of file ``key``; the tensor must not
        change until the future is done. A non-contiguous tensor (a transposed row block, say) is copied by
        a preparer thread straight into a reused buffer placed so that O_DIRECT needs no second copy."""
        t = tensor.detach()
        if t.device.type != "cpu":
            raise ValueError("RangeWriter writes CPU tensors")
        n = t.numel() * t.element_size()
        with self._cond:
            while self._inflight and self._inflight + n > self._max:
                self._cond.wait()
            self._inflight += n
        job = _Job(Future())
        job.future.add_done_callback(lambda _: self._release(n))
        self._futures.append(job.future)
        self._pool.submit(self._prepare, job, self._files[key], offset, t, crc)
        return job.future

    def _release(self, n: int) -> None:
        with self._cond:
            self._inflight -= n
            self._cond.notify_all()

    def _prepare(self, job: _Job, f: _File, offset: int, t: torch.Tensor, crc: bool) -> None:
        try:
            self._prepare_pieces(job, f, offset, t, crc)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the job's future
            job.done(exc)
        else:
            job.done()

    def _prepare_pieces(self, job: _Job, f: _File, offset: int, t: torch.Tensor, crc: bool) -> None:
        n = t.numel() * t.element_size()
        placed = None
        if t.is_contiguous():
            data = flat_bytes(t)
        else:  # one copy, at the page phase of ``offset``, so its aligned middle goes out as it is
            placed = self._placed.take(n + PAGE)
            lead = offset % PAGE
            out = torch.frombuffer(placed, dtype=torch.uint8)[lead:lead + n]
            out.view(t.dtype).view(t.shape).copy_(t)
            data = out
        mv = memoryview(data.numpy()) if n else memoryview(b"")
        job.value = crc32(mv) if crc else 0
        lo = min(n, -offset % PAGE)  # bytes before the first page boundary
        hi = lo + (n - lo) // PAGE * PAGE  # end of the page-aligned middle
        if f.dfd is None or n < SMALL or hi <= lo:
            pwrite_all(f.fd, mv, offset)
            if placed is not None:
                self._placed.give(placed)
            return
        pwrite_all(f.fd, mv[:lo], offset)
        pwrite_all(f.fd, mv[hi:], offset + hi)
        if placed is not None:  # already page-aligned in memory: straight out
            self._queue(job, f, mv[lo:hi], offset + lo, self._placed, placed)
            return
        pos = lo
        while pos < hi:
            k = min(CHUNK, hi - pos)
            chunk = self._chunks.take(CHUNK)
            torch.frombuffer(chunk, dtype=torch.uint8)[:k].copy_(data[pos:pos + k])
            self._queue(job, f, memoryview(chunk)[:k], offset + pos, self._chunks, chunk)
            pos += k

    def _queue(self, job: _Job, f: _File, mv: memoryview, offset: int, pool: _Buffers, buf: mmap.mmap) -> None:
        job.add()

        def out():
            try:
                self._write_direct(f, mv, offset)
            except BaseException as exc:  # noqa: BLE001
                job.done(exc)
            else:
                job.done()
            finally:
                pool.give(buf)

        self._io.submit(out)

    def _write_direct(self, f: _File, mv: memoryview, offset: int) -> None:
        try:
            pwrite_all(f.dfd, mv, offset)
            with self._cond:
                self.direct_bytes += len(mv)
        except OSError:  # O_DIRECT refused here after all: the same bytes, buffered
            pwrite_all(f.fd, mv, offset)

    def wait(self) -> list:
        """Block until every queued write is done; re-raise the first failure; return the job results in order."""
        futures, self._futures = self._futures, []
        return [f.result() for f in futures]

    def close(self) -> None:
        try:
            for f in self._futures:
                f.exception()  # let queued jobs finish before their files are closed
        finally:
            self._futures = []
            self._pool.shutdown(wait=True)
            self._io.shutdown(wait=True)
            self._chunks.close()
            self._placed.close()
            for f in self._files.values():
                f.close()
            self._files = {}


def pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte of ``mv`` is at ``offset`` of ``fd`` (pwrite may write less)."""
    while len(mv):
        k = os.pwrite(fd, mv, offset)
        mv, offset = mv[k:], offset + k
