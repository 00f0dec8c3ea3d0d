"""The runtime on real GPUs: NCCL, emulation off, and TP2 equals TP1 (run on the device machine)."""
import pytest
import torch

from interop.launch import run_on_ranks
from tests import mcore_tiny

pytestmark = pytest.mark.gpu


def _probe_and_train(tp: int, steps: int, full):
    from formats.layout import Layout
    from interop import cpu_emulation
    from interop.runtime import RuntimeConfig, distributed

    with distributed(RuntimeConfig(layout=Layout(tp=tp), seed=1234)) as rt:
        backend = torch.distributed.get_backend()
        losses, initial = mcore_tiny.train_losses(steps, num_micro=4, global_micro=4,
                                                  use_distributed_optimizer=True, full=full)
        probe = dict(backend=backend, emulation=cpu_emulation.is_enabled() or rt.cpu_emulation,
                     device=str(rt.device), name=torch.cuda.get_device_name())
    return probe, losses, initial


def test_one_gpu_nccl_without_emulation():
    probe, losses, _ = run_on_ranks(_probe_and_train, 1, 1, 3, None)[0]
    assert probe["backend"] == "nccl" and probe["emulation"] is False and probe["device"].startswith("cuda")
    assert losses[0] == pytest.approx(4.85, abs=0.2)
    print("1 GPU:", probe, losses)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_tp2_equals_tp1():
    _, ref, full = run_on_ranks(_probe_and_train, 1, 1, 3, None)[0]
    results = run_on_ranks(_probe_and_train, 2, 2, 3, full)
    for probe, losses, _ in results:
        assert probe["backend"] == "nccl" and probe["emulation"] is False
        assert losses == pytest.approx(ref, rel=1e-4, abs=1e-4)
    print("2 GPUs TP2:", [r[1] for r in results], "TP1:", ref)
