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


def test_foreach_grad_norm_and_scale_equal_megatron_cores_fallbacks():
    """The multi-tensor replacements give Megatron-Core's local fallbacks' numbers (its per-tensor versions are
    the oracle), and clipping through Megatron-Core's own ``clip_grad_by_total_norm_fp32`` uses them."""
    from megatron.core import utils

    from trainer.optim import foreach_l2_norm, foreach_scale

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen) * s for shape, s in
               [((7, 5), 1.0), ((300,), 10.0), ((2, 3, 4), 0.01), ((1,), 3.0)]]
    ours, _ = foreach_l2_norm(2048, None, [tensors], False)
    with torch.device("cpu"):
        theirs = torch.norm(torch.tensor([float(torch.norm(t)) for t in tensors]))
    assert ours.shape == (1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours[0], theirs, rtol=1e-6, atol=0)
    in_place = [t.clone() for t in tensors]
    foreach_scale(2048, None, [in_place, in_place], 0.25)
    expected = [t.clone() for t in tensors]
    utils.local_multi_tensor_scale(2048, None, [expected, expected], 0.25)
    assert all(torch.equal(a, b) for a, b in zip(in_place, expected))
    halves = [torch.empty_like(t, dtype=torch.float16) for t in tensors]
    foreach_scale(2048, None, [tensors, halves], 1.0)  # the fp16 -> fp32 style copy of optimizer.py
    assert all(torch.equal(h, t.half()) for h, t in zip(halves, tensors))


def _clip_run(cfg, replace: bool):
    import trainer.loop
    from megatron.core.optimizer import clip_grads

    from trainer.optim import foreach_l2_norm, foreach_scale
    from trainer.run import rank_main

    if not replace:  # Megatron-Core's own per-tensor fallbacks: the oracle
        trainer.loop.use_foreach_grad_ops = lambda: False

    def after(tr, result):
        return (result.losses, result.grad_norms, clip_grads.l2_norm_impl is foreach_l2_norm,
                clip_grads.multi_tensor_scale_impl is foreach_scale)

    return rank_main(cfg, after=after)


@pytest.mark.parametrize("layout", [{}, dict(use_distributed_optimizer=True, world_size=2)], ids=["1rank", "dp2-distopt"])
def test_clipping_through_the_multi_tensor_helpers_equals_megatron_cores(tmp_path, layout):
    data = write_corpus(str(tmp_path / "counting"))
    cfg = make_cfg("gpt2", data, gradient_clipping=0.05, **layout)  # small enough that every step clips
    world = layout.get("world_size", 1)
    ours = run_on_ranks(_clip_run, world, cfg, True, timeout_s=300)[0]
    theirs = run_on_ranks(_clip_run, world, cfg, False, timeout_s=300)[0]
    assert ours[2:] == (True, True) and theirs[2:] == (False, False)
    assert min(theirs[1]) > 0.05  # clipping was active in every step
    assert ours[1] == pytest.approx(theirs[1], rel=1e-5)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5)
