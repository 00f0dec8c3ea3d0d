"""The trainer's fused kernels (trainer/kernels) on CPU ranks: switched on by force (on CPU they are off by
themselves), each trains the curve of Megatron-Core's unfused path — the oracle: its own linear layers, its DDP
gradient hook and its vocab-parallel cross entropy — within 1e-5 in fp32, for GPT-2 (tied embeddings, biases,
a padded vocabulary) and Llama (GQA, SwiGLU, untied), at one rank and with TP2 / TP2 + sequence parallelism
reproducing the single-rank curve. Plus the weight-gradient accumulation itself against a float64 product."""
from functools import partial

import pytest
import torch

from interop.launch import run_on_ranks
from tests.test_trainer_helpers import write_corpus
from tests.test_trainer_parallel import _capture, _CAPTURED, _load, make_cfg


def test_wgrad_accumulates_into_main_grad():
    from trainer.kernels.grad_accum import WgradGemmAccum

    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 5, 4, generator=gen)
    start = torch.randn(4, 7, generator=gen)
    expected = start.double() + g.reshape(15, 4).double().t() @ x.reshape(15, 7).double()
    main_grad = start.clone()
    WgradGemmAccum.wgrad_gemm_accum_fp32(x.reshape(15, 7), g.reshape(15, 4), main_grad)
    torch.testing.assert_close(main_grad.double(), expected, rtol=1e-6, atol=1e-5)
    # 3-D inputs are flattened; 16-bit operands into an fp32 buffer accumulate in fp32 (no bf16 rounding of the sum)
    main_grad = start.clone()
    WgradGemmAccum.wgrad_gemm_accum_fp32(x.bfloat16(), g.bfloat16(), main_grad)
    bf = start.double() + g.bfloat16().double().reshape(15, 4).t() @ x.bfloat16().double().reshape(15, 7)
    torch.testing.assert_close(main_grad.double(), bf, rtol=1e-6, atol=1e-5)


def test_kernels_stay_off_on_cpu():
    from trainer import kernels

    cfg = make_cfg("llama", "")
    assert kernels.config_overrides(cfg, cfg.arch.to_model_config()) == {}
    assert kernels.install([], cfg, 256, 1) == []


def _kernel_run(data, family, world, layout, forced, state=None, vocab=None):
    from trainer import kernels
    from trainer.kernels.linear_cross_entropy import uses_fused_loss
    from trainer.run import rank_main

    kernels.forced.update(forced)
    layout = dict(layout)
    settings = {k: layout.pop(k) for k in ("train_iters", "split", "eval_interval") if k in layout}
    cfg = make_cfg(family, data, world_size=world, **layout)
    for key, value in settings.items():
        setattr(cfg, key, value)
    if vocab:
        cfg.arch.vocab_size = vocab

    def after(tr, result):
        losses = result.losses + [ev["loss"] for ev in result.evals]  # evaluation runs the unfused loss
        return losses, bool(tr.tc.gradient_accumulation_fusion), uses_fused_loss(tr.model[0]), _CAPTURED.get("state")

    init = partial(_load_state, state, family, vocab) if state is not None else _capture
    return rank_main(cfg, model_init=init, after=after)


def _load_state(state, family, vocab, chunks):
    from interop.megatron_model import load_canonical

    arch = make_cfg(family, "").arch
    if vocab:  # the captured embedding/output rows include Megatron's padding; the canonical stream has none
        arch.vocab_size = vocab
        padded = arch.to_model_config().padded_vocab_size(1)
        state = {k: v[:vocab] if v.dim() and v.shape[0] == padded else v for k, v in state.items()}
    load_canonical(chunks, state.items(), arch.to_model_config())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus") / "counting"))


ALL = ("grad_accum_fusion", "linear_cross_entropy")


@pytest.mark.parametrize("family,vocab,forced", [("gpt2", 300, ALL), ("llama", None, ALL),
                                                 ("gpt2", None, ("grad_accum_fusion",))],
                         ids=["gpt2-padded-vocab", "llama", "gpt2-tied-output-wgrad-fusion"])
def test_fused_kernels_train_the_unfused_curve(corpus, family, vocab, forced):
    evals = dict(split="90,10,0", eval_interval=2)  # two evaluations in between: forward-only stays unfused
    losses, gaf, fused_loss, state = run_on_ranks(_kernel_run, 1, corpus, family, 1, evals, forced, None, vocab,
                                                  timeout_s=300)[0]
    ref, ref_gaf, ref_fused, _ = run_on_ranks(_kernel_run, 1, corpus, family, 1, evals, (), state, vocab,
                                              timeout_s=300)[0]
    assert len(ref) > 5
    assert (gaf, fused_loss) == (True, "linear_cross_entropy" in forced) and (ref_gaf, ref_fused) == (False, False)
    assert ref[4] < ref[0] - 0.05, ref  # it learns: the comparison is not vacuous
    assert losses == pytest.approx(ref, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("family,layout", [("gpt2", dict(tp_degree=2)),
                                           ("llama", dict(tp_degree=2, sequence_parallelism=True))],
                         ids=["gpt2-tp2", "llama-sp-tp2"])
def test_tp_layouts_with_kernels_reproduce_one_rank(corpus, family, layout):
    ref, _, _, state = run_on_ranks(_kernel_run, 1, corpus, family, 1, {}, (), None, timeout_s=300)[0]
    curves = run_on_ranks(_kernel_run, 2, corpus, family, 2, layout, ALL, state, timeout_s=300)
    for losses, gaf, fused_loss, _ in curves:
        assert gaf is True
        assert fused_loss is False  # the vocabulary is split over TP: the unfused vocab-parallel loss runs
        assert losses == pytest.approx(ref, rel=2e-5, abs=2e-5)
