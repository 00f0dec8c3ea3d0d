"""The trainer on a GPU: its SDPA core attention (bf16: PyTorch's flash kernels) against Megatron-Core's unfused
``DotProductAttention``, attention dropout under Megatron's CUDA RNG tracker, training runs (bf16, and fp16 with
Megatron-Core's loss scaling) on torch's fused AdamW and the fused bias-dropout-add, and kill-and-resume with the
fused AdamW's state (run on the device)."""
import pytest
import torch

from interop.launch import run_on_ranks
from tests.test_trainer_attention import _compare, _pair

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


@pytest.mark.parametrize("heads,groups,with_mask", [(8, 8, False), (8, 2, False), (8, 2, True)],
                         ids=["mha", "gqa", "gqa-mask"])
def test_bf16_flash_attention_matches_megatron(heads, groups, with_mask):
    out = run_on_ranks(_compare, 1, heads, groups, 256, 256, False, with_mask, torch.bfloat16, timeout_s=300)[0]
    ours, oracle = out["ours"], out["oracle"]
    assert oracle[0].abs().max() > 0.1
    for a, b in zip(ours, oracle):
        # both round to bf16 at different points: compare at bf16 resolution, relative to the tensor's scale
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * float(b.abs().max()))


def _dropout_runs():
    from interop.runtime import RuntimeConfig, distributed
    from megatron.core import tensor_parallel

    with distributed(RuntimeConfig(seed=3)) as rt:
        ours, _ = _pair(4, 4, dropout=0.3)
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(64, 2, 4, 16, generator=gen).to(rt.device, torch.bfloat16) for _ in range(3))
        ours.train()
        outs = []
        for _ in range(2):
            tensor_parallel.model_parallel_cuda_manual_seed(42)
            outs.append(ours(q, k, v, None).float().cpu())
        ours.eval()
        plain = ours(q, k, v, None).float().cpu()
    return outs, plain


def test_dropout_is_seeded_by_megatron_rng_tracker():
    (first, second), plain = run_on_ranks(_dropout_runs, 1, timeout_s=300)[0]
    assert torch.equal(first, second)  # same tracker seed -> same dropout mask
    assert not torch.allclose(first, plain, atol=1e-3)  # dropout did something in training mode


def _train_on_gpu(data: str, precision: str):
    from tests.test_trainer_parallel import make_cfg
    from trainer.optim import torch_adams
    from trainer.run import rank_main

    def after(tr, result):
        adams = list(torch_adams(tr.optimizer))
        flags = {g["fused"] for a in adams for g in a.param_groups}
        steps = {s["step"].device.type for a in adams for s in a.state.values()}
        return result.losses, flags, steps, bool(tr.tc.bias_dropout_fusion)

    # fp16: a fixed loss scale, so that no step of this short run is skipped for an overflow
    cfg = make_cfg("gpt2", data, mixed_precision=precision, loss_scale=128.0 if precision == "fp16" else None)
    return rank_main(cfg, after=after)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_on_gpu_uses_fused_adamw_and_fused_bias_dropout_add(tmp_path, precision):
    from tests.test_trainer_helpers import write_corpus

    data = write_corpus(str(tmp_path / "counting"))
    losses, flags, steps, bda = run_on_ranks(_train_on_gpu, 1, data, precision, timeout_s=600)[0]
    assert flags == {True} and steps == {"cuda"} and bda
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.05, losses


def _train_and_counters(cfg):
    from trainer.optim import torch_adams
    from trainer.run import rank_main

    def after(tr, result):
        counters = {float(s["step"]) for a in torch_adams(tr.optimizer) for s in a.state.values()}
        devices = {s["step"].device.type for a in torch_adams(tr.optimizer) for s in a.state.values()}
        return result.losses, result.lrs, counters, devices

    return rank_main(cfg, after=after)


@pytest.mark.parametrize("fmt,world,layout", [
    ("torch_dist", 1, {}),
    ("torch_dist", 2, dict(use_distributed_optimizer=True, world_size=2)),
], ids=["torch_dist-1gpu", "torch_dist-dp2-distopt"])
def test_resume_on_gpu_continues_the_fused_adamw_state(tmp_path, fmt, world, layout):
    from tests.test_trainer_checkpoint import make_cfg
    from tests.test_trainer_helpers import write_corpus

    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    data = write_corpus(str(tmp_path / "counting"))
    kw = dict(ckpt_format=fmt, mixed_precision="bf16", **layout)
    straight = run_on_ranks(_train_and_counters, world, make_cfg(data, **kw), timeout_s=600)[0]
    save = str(tmp_path / "ckpt")
    run_on_ranks(_train_and_counters, world, make_cfg(data, train_iters=3, save=save, **kw), timeout_s=600)
    losses, lrs, counters, devices = run_on_ranks(_train_and_counters, world, make_cfg(data, load=save, **kw),
                                                  timeout_s=600)[0]
    assert straight[2] == {6.0} and counters == {6.0} and devices == {"cuda"}  # 3 saved + 3 resumed steps
    assert lrs == pytest.approx(straight[1][3:])
    # GPU kernels (flash attention backward) are not bitwise deterministic: same curve to bf16 tolerance
    assert losses == pytest.approx(straight[0][3:], rel=2e-2, abs=2e-2)
