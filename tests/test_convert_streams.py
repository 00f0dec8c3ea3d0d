"""``interop.streams.prefetch``: same items in order, producer errors surface in the consumer, an early stop
ends the producer thread, and the module stays torch-free (the preprocess path imports it); ``interop.convert``/``reshape``/``verify``
are plain functions imported lazily."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from interop.streams import prefetch


@pytest.mark.parametrize("depth", [0, 1, 4])
def test_yields_every_item_in_order(depth):
    assert list(prefetch(iter(range(100)), depth)) == list(range(100))


def test_producer_error_is_raised_in_consumer():
    def gen():
        yield 1
        raise ValueError("bad input line 2")

    it = prefetch(gen(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad input line 2"):
        next(it)


def test_early_stop_ends_the_producer_thread():
    produced = []

    def gen():
        for i in range(10_000):
            produced.append(i)
            yield i

    it = prefetch(gen(), 1, name="test-prefetch-stop")
    assert next(it) == 0
    it.close()
    assert not any(t.name == "test-prefetch-stop" for t in threading.enumerate())
    assert len(produced) < 10  # it stopped instead of draining the source


def test_streams_module_does_not_import_torch():
    code = "import sys, interop.streams; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_interop_api_functions_are_lazy_plain_functions():
    code = (
        "import sys, types, interop\n"
        "assert 'torch' not in sys.modules, 'import interop imported torch'\n"
        "from interop import convert, reshape, verify\n"
        "import interop.conversion, interop.reshaping, interop.verification\n"
        "assert convert is interop.conversion.convert and isinstance(convert, types.FunctionType)\n"
        "assert reshape is interop.reshaping.reshape and verify is interop.verification.verify\n"
        "assert interop.convert is convert\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError):
        import interop

        interop.no_such_function
