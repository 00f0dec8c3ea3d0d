"""The runtime and the CPU emulation compute what Megatron-Core computes, at any layout."""
import pytest
import torch

from tests import mcore_tiny
from interop.launch import RankFailure, run_on_ranks

STEPS = 3


def _reference_and_state():
    """TP1xPP1 on one rank: initial full weights and the loss curve."""
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed

    with distributed(RuntimeConfig(layout=Layout(), seed=1234)):
        losses, full = mcore_tiny.train_losses(STEPS, num_micro=4, global_micro=4, use_distributed_optimizer=False)
    return losses, full


@pytest.fixture(scope="module")
def reference():
    return run_on_ranks(_reference_and_state, 1)[0]


@pytest.mark.parametrize(
    "tp,pp,world,dist_opt",
    [(2, 2, 4, True), (2, 1, 4, True)],
    ids=["tp2pp2-distopt", "tp2dp2-distopt"],
)
def test_parallel_losses_equal_single_rank(reference, tp, pp, world, dist_opt):
    ref_losses, full = reference
    assert len(ref_losses) == STEPS and ref_losses[0] == pytest.approx(4.85, abs=0.2)  # ~ln(128)
    results = run_on_ranks(mcore_tiny.rank_main, world, tp, pp, STEPS, dist_opt, full, timeout_s=300)
    curves = [r for r in results if r is not None]
    assert curves, "no last-stage rank reported losses"
    for curve in curves:
        assert curve == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)


def _boom():
    raise ValueError("planted failure")


def test_child_traceback_surfaces():
    with pytest.raises(RankFailure) as info:
        run_on_ranks(_boom, 2, timeout_s=60)
    assert "planted failure" in str(info.value)
    assert "_boom" in info.value.details


def _sleep_forever():
    import time

    time.sleep(3600)


def test_hung_rank_times_out():
    with pytest.raises(RankFailure, match="did not finish"):
        run_on_ranks(_sleep_forever, 2, timeout_s=3)


def _emulation_state():
    from formats.layout import Layout
    from interop import cpu_emulation
    from interop.runtime import RuntimeConfig, distributed

    with distributed(RuntimeConfig(layout=Layout())) as rt:
        inside = (cpu_emulation.is_enabled(), rt.cpu_emulation, torch.empty(2, device="cuda").device.type)
    return inside, cpu_emulation.is_enabled()


@pytest.mark.skipif(torch.cuda.is_available(), reason="emulation is CPU-only")
def test_emulation_is_contained():
    inside, after = run_on_ranks(_emulation_state, 1)[0]
    assert inside == (True, True, "cpu")
    assert after is False


def test_bad_layout_is_a_one_line_error():
    from formats.layout import Layout
    from interop.errors import LayoutError
    from interop.runtime import RuntimeConfig, initialize

    with pytest.raises(LayoutError, match="not divisible"):
        # world size 1 cannot host TP2
        initialize(RuntimeConfig(layout=Layout(tp=2)))
