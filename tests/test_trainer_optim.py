"""The trainer runs torch's fused AdamW inside Megatron-Core's optimizer wrappers (trainer/optim.py), and it trains
the same loss curve as the multi-tensor AdamW Megatron-Core picks by itself (the oracle), with the mixed-precision-
free and the distributed optimizer; the switch also brings back step counters of a checkpoint saved without it."""
import pytest
import torch

from interop.launch import run_on_ranks
from tests.test_trainer_parallel import make_cfg
from tests.test_trainer_helpers import write_corpus


def _curve(data: str, fused: bool, world: int, layout: dict):
    import trainer.loop
    from trainer.optim import torch_adams
    from trainer.run import rank_main

    if not fused:  # Megatron-Core's own choice: torch AdamW, foreach
        trainer.loop.use_fused_adam = lambda optimizer: 0

    def after(tr, result):
        adams = list(torch_adams(tr.optimizer))
        flags = sorted({(g["fused"], g["foreach"]) for a in adams for g in a.param_groups}, key=str)
        steps = {(s["step"].device.type, s["step"].dtype) for a in adams for s in a.state.values()}
        return result.losses, flags, steps, len(adams)

    return rank_main(make_cfg("gpt2", data, world_size=world, **layout), after=after)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus") / "counting"))


@pytest.mark.parametrize("world,layout", [(1, {}), (2, dict(use_distributed_optimizer=True))],
                         ids=["one-rank", "dp2-distopt"])
def test_fused_adamw_trains_the_multi_tensor_curve(corpus, world, layout):
    fused = run_on_ranks(_curve, world, corpus, True, world, layout, timeout_s=300)
    plain = run_on_ranks(_curve, world, corpus, False, world, layout, timeout_s=300)
    losses, flags, steps, count = fused[0]
    ref_losses, ref_flags, _, _ = plain[0]
    assert count >= 1
    assert flags == [(True, False)], flags
    assert all(f is not True for f, _ in ref_flags), ref_flags  # the oracle really is the unfused optimizer
    assert steps == {("cpu", torch.float32)}
    assert ref_losses[-1] < ref_losses[0] - 0.05  # it learns: the comparison is not vacuous
    for curve, _, _, _ in fused:
        assert curve == pytest.approx(ref_losses, rel=1e-5, abs=1e-5)


def test_step_counters_move_to_the_parameter_device_and_dtype():
    from trainer.optim import use_fused_adam

    param = torch.nn.Parameter(torch.ones(4))
    adam = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(4)
    adam.step()  # foreach: step counter is a CPU float tensor ... or a Python number in old checkpoints
    adam.state[param]["step"] = 1
    wrapper = type("Wrapped", (), {"optimizer": adam, "chained_optimizers": None})()
    assert use_fused_adam(wrapper) == 1
    assert adam.param_groups[0]["fused"] is True and adam.param_groups[0]["foreach"] is False
    assert torch.is_tensor(adam.state[param]["step"]) and adam.state[param]["step"].dtype == torch.float32
    before = param.detach().clone()
    adam.step()  # the fused kernel accepts the moved counter
    assert not torch.equal(before, param.detach())
    assert float(adam.state[param]["step"]) == 2.0
