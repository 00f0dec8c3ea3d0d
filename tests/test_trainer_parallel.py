"""Every parallel layout trains exactly like one rank: TP2, PP2 (1F1B), TP2xPP2, PP2xVPP2 (interleaved),
DP2 with the distributed optimizer, sequence parallelism with TP2 (LayerNorm and RMSNorm), and
selective/full recompute; and Megatron-Core's own unfused attention (``attention_backend="local"``) trains the
same curve as the default SDPA attention (MHA and GQA). The oracle is the TP1 single-rank loss curve of the same weights and data;
the weights reach every layout through the canonical stream (``interop.megatron_model.load_canonical``)."""
from functools import partial

import pytest

from interop.launch import run_on_ranks
from tests.test_trainer_helpers import VOCAB, write_corpus
from trainer.config import ArchConfig, TrainConfig

STEPS = 5
_CAPTURED: dict = {}


def make_cfg(family: str, data: str, **layout) -> TrainConfig:
    arch = ArchConfig(family=family, num_layers=4, hidden_size=64, num_attention_heads=4,
                      num_query_groups=2 if family == "llama" else None, vocab_size=VOCAB,
                      max_position_embeddings=64, tie_word_embeddings=family == "gpt2")
    return TrainConfig(arch=arch, seq_length=32, micro_batch_size=2, global_batch_size=8, data_path=[data],
                       split="100,0,0", train_iters=STEPS, lr=1e-2, lr_warmup_iters=1, progress=False, seed=11, **layout)


def _capture(chunks):
    from interop.megatron_model import canonical_targets

    _CAPTURED["state"] = {n: ps[0].detach().clone() for n, ps in canonical_targets(chunks).items()}


def _losses_and_state(trainer, result):
    return result.losses, _CAPTURED["state"]


def _reference(family: str, data: str):
    from trainer.run import rank_main

    return rank_main(make_cfg(family, data), model_init=_capture, after=_losses_and_state)


def _load(state, family, chunks):
    from interop.megatron_model import load_canonical

    load_canonical(chunks, state.items(), make_cfg(family, "").arch.to_model_config())


def _layout_losses(cfg, state, family):
    from trainer.run import rank_main

    return rank_main(cfg, model_init=partial(_load, state, family)).losses


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus") / "counting"))


@pytest.fixture(scope="module")
def reference(corpus):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = run_on_ranks(_reference, 1, family, corpus, timeout_s=300)[0]
        return cache[family]

    return get


CASES = [
    ("gpt2", 2, dict(tp_degree=2)),
    ("gpt2", 2, dict(pp_degree=2)),
    ("gpt2", 4, dict(tp_degree=2, pp_degree=2)),
    ("gpt2", 2, dict(pp_degree=2, vpp_degree=2)),
    ("gpt2", 2, dict(use_distributed_optimizer=True)),
    ("gpt2", 2, dict(tp_degree=2, sequence_parallelism=True)),
    ("llama", 2, dict(tp_degree=2, sequence_parallelism=True)),
    ("llama", 4, dict(tp_degree=2, pp_degree=2, use_distributed_optimizer=False)),
    ("gpt2", 1, dict(recompute_activations="selective")),
    ("gpt2", 1, dict(recompute_activations="full")),
    ("gpt2", 1, dict(attention_backend="local")),
    ("llama", 1, dict(attention_backend="local")),
]


@pytest.mark.parametrize(
    "family,world,layout", CASES,
    ids=["tp2", "pp2", "tp2pp2", "pp2vpp2", "dp2-distopt", "sp-tp2", "llama-sp-tp2", "llama-tp2pp2",
         "recompute-selective", "recompute-full",
         "local-attention", "llama-local-attention"],
)
def test_layout_reproduces_single_rank_curve(reference, corpus, family, world, layout):
    ref_losses, state = reference(family)
    assert len(ref_losses) == STEPS
    assert ref_losses[-1] < ref_losses[0] - 0.05, ref_losses  # it learns: the comparison is not vacuous
    cfg = make_cfg(family, corpus, world_size=world, **layout)
    curves = run_on_ranks(_layout_losses, world, cfg, state, family, timeout_s=300)
    for curve in curves:  # every rank reports the same DP-averaged curve
        assert curve == pytest.approx(ref_losses, rel=2e-5, abs=2e-5)
