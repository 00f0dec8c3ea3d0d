"""``prefetch``: run an iterator one step ahead in a background thread (torch-free, shared by convert and preprocess).

Why a thread: the producers here (checkpoint reads + transposes, input-file parsing) spend their time in file
I/O and torch/tokenizers kernels that release the GIL, so producing item ``n+1`` overlaps consuming item ``n``.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def prefetch(iterable: Iterable[T], depth: int = 1, name: str = "interop-prefetch") -> Iterator[T]:
    """Yield ``iterable``'s items, produced up to ``depth`` ahead by a daemon thread.

    The producer's exceptions are re-raised in the consumer; when the consumer stops early (``close()``, an
    error downstream) the thread is told to stop, so it never stays blocked on a full queue. Memory grows by
    ``depth`` items. ``depth <= 0`` iterates inline.
    """
    if depth <= 0:
        yield from iterable
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in iterable:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer
            put(exc)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            del item  # the consumer's reference is the only one left: memory stays at ``depth`` items
    finally:
        stop.set()
        thread.join(timeout=5)
