"""Distributed-optimizer state survives a layout change.

A tiny GPT (tied embeddings, saved by our trainer in the per-rank ``torch`` format: Megatron-Core writes
``distrib_optim.pt``) and a tiny Llama (GQA, SwiGLU, untied, padded vocabulary 300 -> 384/512, saved in
``torch_dist`` ``dp_reshardable``) train 3 steps at TP2xPP2 with Megatron-Core's DistributedOptimizer. Each is
reshaped to three other layouts — offline in both formats and on ``--load`` — and Megatron-Core's optimizer at
the new layout loads it. Oracle: Megatron-Core's own ``fully_reshardable`` gather of the optimizer (``dump``)
right after the source's step 3 and right after the target's load must agree exactly (fp32 main params, both
moments; the target's padding rows of the moments are zeros), and 3 more steps at the new layout give the
losses of steps 4-6 of a straight 6-step run at the source layout.
"""
import os

import pytest
import torch

from formats.checkpoint.torch_dist import TorchDistCheckpoint
from formats.layout import Layout
from interop.launch import run_on_ranks
from tests.optim_ranks import make_cfg, train_and_dump
from tests.test_trainer_helpers import write_corpus

SOURCE = dict(tp_degree=2, pp_degree=2)
FORMAT = {"gpt2": "torch", "llama": "torch_dist"}
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus") / "counting"))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained(request, corpus, tmp_path_factory):
    """(family, source checkpoint root, oracle dump of its optimizer, straight 6-step losses, lrs)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"src-{family}")
    save, dump = str(root / "ckpt"), str(root / "dump")
    cfg = make_cfg(corpus, family, train_iters=3, save=save, ckpt_format=FORMAT[family], **SOURCE)
    first = run_on_ranks(train_and_dump, 4, cfg, None, dump, timeout_s=600)[0]
    straight = run_on_ranks(train_and_dump, 4, make_cfg(corpus, family, **SOURCE), timeout_s=600)[0]
    assert first[0] == pytest.approx(straight[0][:3], rel=1e-6, abs=1e-6)
    return family, save, dump, straight


def assert_same_state(src_dump: str, dst_dump: str, vocab: int) -> int:
    """Every optimizer tensor of Megatron-Core's gather at the source equals the target's (true vocab rows; the
    target's moment padding rows are zeros). Returns how many tensors were compared."""
    a, b = TorchDistCheckpoint.open(src_dump), TorchDistCheckpoint.open(dst_dump)
    keys_a, keys_b = {t.name for t in a.tensors()}, {t.name for t in b.tensors()}
    assert keys_a == keys_b and keys_a
    for key in sorted(keys_a):
        x, y = a.load(key), b.load(key)
        if key.endswith(VOCAB_KEYS):
            assert torch.equal(x[:vocab], y[:vocab]), key
            if ".param." not in key:
                assert not y[vocab:].any(), f"{key}: padding rows of the moments must be zeros"
            continue
        assert x.shape == y.shape and torch.equal(x, y), key
    return len(keys_a)


def _resume(corpus, family, load, layout: dict, fmt: str, tmp_path):
    world = layout.get("tp_degree", 1) * layout.get("pp_degree", 1) * layout.pop("dp", 1)
    cfg = make_cfg(corpus, family, load=load, ckpt_format=fmt, **layout)
    dump = str(tmp_path / "dump")
    return run_on_ranks(train_and_dump, world, cfg, dump, None, timeout_s=600)[0], dump


CASES = [  # (id, target layout, how: offline torch_dist | offline torch | on load)
    ("tp1pp1dp2-offline-dist", dict(tp_degree=1, pp_degree=1, dp=2), "torch_dist"),
    ("tp2pp1dp2-offline-torch", dict(tp_degree=2, pp_degree=1, dp=2), "torch"),
    ("pp2vpp2-on-load", dict(tp_degree=1, pp_degree=2, vpp_degree=2), None),
]


@pytest.mark.parametrize("layout,how", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_optimizer_state_and_losses_carry_over(trained, corpus, tmp_path, layout, how):
    from interop.optimizer_state import reshape_for_resume

    family, save, src_dump, straight = trained
    if family == "gpt2" and layout.get("vpp_degree"):
        # known bug: the tied embedding's state in distrib_optim.pt is loaded 64 elements (one alignment gap) off
        # by Megatron-Core at PP2xVPP2 (its bucket follows a dropped end-of-bucket pad); torch_dist is exact there
        pytest.xfail("distrib_optim.pt at PP2xVPP2 with a tied embedding: state off by one alignment gap")
    layout = dict(layout)
    fmt = how or FORMAT[family]
    load = save
    if how is not None:  # offline: interop's reshape, then a run at the new layout loads it as its own
        load = str(tmp_path / "reshaped")
        target = Layout(tp=layout.get("tp_degree", 1), pp=layout.get("pp_degree", 1), dp=layout.get("dp", 1))
        reshape_for_resume(os.path.join(save, "iter_0000003"), load, target, how)
    (losses, lrs, iteration, consumed), dump = _resume(corpus, family, load, layout, fmt, tmp_path)
    vocab = 300 if family == "llama" else 256
    assert assert_same_state(src_dump, dump, vocab) >= 20
    assert iteration == 6 and consumed == 6 * 8
    assert lrs == pytest.approx(straight[1][3:])
    assert losses == pytest.approx(straight[0][3:], rel=1e-5, abs=1e-5)
