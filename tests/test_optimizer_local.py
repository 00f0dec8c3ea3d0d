"""Non-distributed optimizer state (``model_optim_rng.pt``'s ``optimizer`` entry) survives a layout change.

A tiny GPT (tied embeddings, biases, LayerNorm: both param groups) and a tiny Llama (GQA, SwiGLU, untied, padded
vocabulary 300 -> 512 at TP2 / 384 at TP1) train 3 steps at TP2xPP2 *without* the distributed optimizer
(Megatron-Core's ``FP32Optimizer``: torch Adam state per parameter index) and save ``torch``; interop reshapes
that to TP1xPP1 — non-distributed, and for a run with the distributed optimizer — and Megatron-Core's optimizer
at the new layout loads it. Oracle: Megatron-Core's own sharded save of the optimizer (``dump``: its
``sharded_state_dict`` turns each rank's per-index state into model-shaped global tensors) right after the
source's step 3 and right after the target's load agree exactly, and 3 more steps at TP1 give the losses of
steps 4-6 of a straight 6-step run at TP2xPP2.
"""
import os

import pytest
import torch

from formats.layout import Layout
from interop.launch import run_on_ranks
from tests.optim_ranks import make_cfg, train_and_dump
from tests.test_optimizer_reshape import assert_same_state, corpus  # noqa: F401 - corpus: the shared fixture

SOURCE = dict(tp_degree=2, pp_degree=2, use_distributed_optimizer=False, ckpt_format="torch")


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def trained(request, corpus, tmp_path_factory):
    """(family, source iteration dir, Megatron-Core's dump of its optimizer after step 3, straight 6 steps)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"local-{family}")
    save, dump = str(root / "ckpt"), str(root / "dump")
    first = run_on_ranks(train_and_dump, 4, make_cfg(corpus, family, train_iters=3, save=save, **SOURCE), None,
                         dump, timeout_s=600)[0]
    straight = run_on_ranks(train_and_dump, 4, make_cfg(corpus, family, **SOURCE), timeout_s=600)[0]
    assert first[0] == pytest.approx(straight[0][:3], rel=1e-6, abs=1e-6)
    return family, save + "/iter_0000003", dump, straight


@pytest.mark.parametrize("distributed,offline", [(False, True), (True, True), (False, False)],
                         ids=["to-local", "to-distributed", "on-load"])
def test_local_optimizer_state_and_losses_carry_over(trained, corpus, tmp_path, distributed, offline):
    """Offline (``reshape_for_resume``) for either optimizer kind, and on ``--load`` of the TP2xPP2 save
    directory by a TP1 run (``interop.resume_layout``)."""
    from interop.optimizer_state import reshape_for_resume

    family, src, src_dump, straight = trained
    load = str(tmp_path / "reshaped")
    if offline:
        reshape_for_resume(src, load, Layout(tp=1, pp=1), "torch", distributed=distributed)
    else:
        load = os.path.dirname(src)
    cfg = make_cfg(corpus, family, load=load, ckpt_format="torch", use_distributed_optimizer=distributed)
    dump = str(tmp_path / "dump")
    losses, lrs, iteration, consumed = run_on_ranks(train_and_dump, 1, cfg, dump, None, timeout_s=600)[0]
    vocab = 300 if family == "llama" else 256
    if not distributed:  # same optimizer class: Megatron-Core's gathers must agree key for key
        assert assert_same_state(src_dump, dump, vocab) >= 16  # exp_avg, exp_avg_sq per model tensor
    assert iteration == 6 and consumed == 6 * 8
    assert lrs == pytest.approx(straight[1][3:])
    assert losses == pytest.approx(straight[0][3:], rel=1e-5, abs=1e-5)


def test_reader_gives_megatron_cores_tensors_and_bad_groups_are_refused(trained, tmp_path):
    """Our per-parameter reader of the TP2xPP2 rank files equals Megatron-Core's own gather tensor by tensor
    (moments; the main params are the weights), and a state whose param groups do not match the model is a
    one-line error."""
    from formats.checkpoint.torch_dist import TorchDistCheckpoint
    from interop.conversion import open_source
    from interop.convert_megatron import dist_key, megatron_config, megatron_to_canonical
    from interop.errors import ConversionError
    from interop.optimizer_state import optimizer_meta, read_param_states

    family, src, src_dump, _ = trained
    ckpt = open_source(src)
    cfg, meta = megatron_config(ckpt), optimizer_meta(ckpt)
    assert meta.sharding == "local" and meta.step == 3.0 and len(meta.param_groups) == 2
    oracle = TorchDistCheckpoint.open(src_dump)
    weights = dict(megatron_to_canonical(ckpt, cfg))
    compared = 0
    for name, state in read_param_states(ckpt, cfg, meta):
        key, layer = dist_key(name)
        for kind in ("exp_avg", "exp_avg_sq"):
            ref = oracle.load(f"optimizer.state.{kind}.{key}")
            ref = ref[layer] if layer is not None else ref[: state[kind].shape[0]]
            assert torch.equal(state[kind], ref), (name, kind)
            compared += 1
        assert torch.equal(state["param"], weights[name].float()), name
    assert compared >= 40

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    rank = broken / "mp_rank_00_000" / "model_optim_rng.pt"
    sd = torch.load(rank, weights_only=False)
    groups = sd["optimizer"]["param_groups"]  # one no-weight-decay parameter moved into the decayed group
    groups[0]["params"], groups[1]["params"] = groups[0]["params"] + groups[1]["params"][:1], groups[1]["params"][1:]
    torch.save(sd, rank)
    bad = open_source(broken)
    with pytest.raises(ConversionError, match="param group 0 holds"):
        for _, state in read_param_states(bad, cfg, optimizer_meta(bad)):
            state["exp_avg"]


def test_torch_dist_source_without_distributed_optimizer(trained, corpus, tmp_path):
    """The same run saved as torch_dist (Megatron-Core's model-shaped ``optimizer.state.{exp_avg,exp_avg_sq}``
    keys; its content metadata still says ``dp_reshardable``) reshapes to TP1 the same way."""
    from interop.conversion import open_source
    from interop.optimizer_state import optimizer_meta, reshape_for_resume

    family, _, _, straight = trained
    if family != "gpt2":
        pytest.skip("one family is enough: the reader is shared")
    save, src_dump = str(tmp_path / "ckpt"), str(tmp_path / "src-dump")
    cfg = make_cfg(corpus, family, train_iters=3, save=save, **{**SOURCE, "ckpt_format": "torch_dist"})
    run_on_ranks(train_and_dump, 4, cfg, None, src_dump, timeout_s=600)
    meta = optimizer_meta(open_source(save))
    assert meta.sharding == "local_model_space" and meta.step == 3.0
    load = str(tmp_path / "reshaped")
    reshape_for_resume(save, load, Layout(tp=1, pp=1), "torch", distributed=False)
    cfg = make_cfg(corpus, family, load=load, ckpt_format="torch", use_distributed_optimizer=False)
    dump = str(tmp_path / "dump")
    losses, lrs, iteration, _ = run_on_ranks(train_and_dump, 1, cfg, dump, None, timeout_s=600)[0]
    assert assert_same_state(src_dump, dump, 256) >= 16
    assert iteration == 6 and lrs == pytest.approx(straight[1][3:])
    assert losses == pytest.approx(straight[0][3:], rel=1e-5, abs=1e-5)
