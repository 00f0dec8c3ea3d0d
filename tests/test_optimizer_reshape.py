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
from tests.optim_ranks import load_local_states, make_cfg, train_and_dump
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


def cfg_for(corpus, family, load, layout: dict, fmt: str):
    return make_cfg(corpus, family, load=load, ckpt_format=fmt, **layout)


def assert_local_states_match(src_dump: str, cfg, vocab: int) -> None:
    """Every parameter's state as Megatron-Core's optimizer holds it after loading at PP x VPP (DP=1, TP=1) equals
    the source's gathered tensor at its global layer (layers are spread round-robin over chunks, docs/checkpoint-formats.md §3.6)."""
    from interop.convert_megatron import te_name

    src = TorchDistCheckpoint.open(src_dump)
    pp, vpp, layers = cfg.pp_degree, cfg.vpp_degree, cfg.arch.num_layers
    per_chunk = layers // (pp * vpp)
    found = {}
    for rank_states in run_on_ranks(load_local_states, pp, cfg, timeout_s=600):
        found.update(rank_states)
    assert len(found) > 20
    for (p, v, name), state in found.items():
        parts = name.split(".")
        if name.startswith("decoder.layers."):
            layer = v * pp * per_chunk + p * per_chunk + int(parts[2])
            key, index = te_name(name).replace(f"decoder.layers.{parts[2]}.", "decoder.layers."), layer
        else:
            key, index = ("embedding.word_embeddings.weight" if name == "output_layer.weight" else name), None
        for kind, tensor in state.items():
            ref = src.load(f"optimizer.state.{kind}.{key}")
            ref = ref[index] if index is not None else ref
            if key.endswith(VOCAB_KEYS):
                ref, tensor = ref[:vocab], tensor[:vocab]
            assert torch.equal(ref, tensor), (name, kind)


CASES = [  # (id, target layout, how: offline torch_dist | offline torch | on load)
    ("tp1pp1dp2-offline-dist", dict(tp_degree=1, pp_degree=1, dp=2), "torch_dist"),
    ("tp2pp1dp2-offline-torch", dict(tp_degree=2, pp_degree=1, dp=2), "torch"),
    ("pp2vpp2-on-load", dict(tp_degree=1, pp_degree=2, vpp_degree=2), None),
]


@pytest.mark.parametrize("layout,how", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_optimizer_state_and_losses_carry_over(trained, corpus, tmp_path, layout, how):
    from interop.optimizer_state import reshape_for_resume

    family, save, src_dump, straight = trained
    layout = dict(layout)
    fmt = how or FORMAT[family]
    load = save
    if how is not None:  # offline: interop's reshape, then a run at the new layout loads it as its own
        load = str(tmp_path / "reshaped")
        target = Layout(tp=layout.get("tp_degree", 1), pp=layout.get("pp_degree", 1), dp=layout.get("dp", 1))
        reshape_for_resume(os.path.join(save, "iter_0000003"), load, target, how)
    (losses, lrs, iteration, consumed), dump = _resume(corpus, family, load, layout, fmt, tmp_path)
    vocab = 300 if family == "llama" else 256
    if family == "gpt2" and layout.get("vpp_degree"):
        # Megatron-Core 0.16.1's fully_reshardable gather (the oracle) indexes the DP-gathered buffers, whose
        # end-of-bucket padding is dropped, with padded buffer offsets: at PP2xVPP2 the tied embedding (a bucket of
        # its own after a 64-element pad) comes out shifted by a row. Compare Megatron-Core's per-parameter accessor
        # at the target (DP=1: whole tensors) with the source's gather instead.
        assert_local_states_match(src_dump, cfg_for(corpus, family, load, layout, fmt), vocab)
    else:
        assert assert_same_state(src_dump, dump, vocab) >= 20
    assert iteration == 6 and consumed == 6 * 8
    assert lrs == pytest.approx(straight[1][3:])
    assert losses == pytest.approx(straight[0][3:], rel=1e-5, abs=1e-5)


def test_cli_keeps_or_drops_the_optimizer_and_inspect_shows_it(trained, tmp_path):
    """``interop reshape`` keeps the optimizer by default (iteration checkpoint, state equal to the source's by
    our own reader — the rank tests above check it against Megatron-Core), ``--weights-only`` drops it, and
    ``interop inspect`` says which; bad requests are one-line errors with nothing written."""
    import json
    import shutil

    from click.testing import CliRunner

    from interop import cli as cli_module
    from interop.conversion import open_source
    from interop.convert_megatron import megatron_config
    from interop.optimizer_state import optimizer_meta, read_param_states

    family, save, _, _ = trained
    run = lambda *a: CliRunner().invoke(cli_module.cli, [str(x) for x in a])  # noqa: E731
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    r = run("reshape", save, kept, "--tp", "1", "--pp", "2", "--dp", "2", "--no-progress")
    assert r.exit_code == 0, r.output
    assert (kept / "iter_0000003").is_dir() and (kept / "latest_checkpointed_iteration.txt").read_text() == "3"
    info = json.loads(run("inspect", kept, "--json").output)["optimizer_state"]
    assert info["step"] == 3.0 and info["iteration"] == 3 and info["scheduler"]
    src, out = open_source(save), open_source(kept)
    assert out.arg("data_parallel_size") == 2 and out.layout.tp == 1 and out.layout.pp == 2
    cfg = megatron_config(src)
    got = dict(read_param_states(out, megatron_config(out), optimizer_meta(out)))
    for name, state in read_param_states(src, cfg, optimizer_meta(src)):
        for kind, tensor in state.items():
            assert torch.equal(tensor, got[name][kind]), (name, kind)
    r = run("reshape", save, dropped, "--tp", "1", "--pp", "1", "--weights-only", "--no-progress")
    assert r.exit_code == 0 and (dropped / "release").is_dir()
    assert "none" in json.loads(run("inspect", dropped, "--json").output)["optimizer_state"]
    r = run("reshape", save, tmp_path / "leg", "--tp", "1", "--pp", "1", "--format", "legacy")
    assert r.exit_code == 2 and "--weights-only" in r.stderr and r.stderr.count("\n") == 1
    r = run("reshape", dropped, tmp_path / "dp", "--tp", "1", "--pp", "1", "--dp", "2")
    assert r.exit_code == 2 and "--dp" in r.stderr
    broken = tmp_path / "broken"
    shutil.copytree(save, broken)
    victim = next(broken.glob("iter_*/mp_rank_*/distrib_optim.pt"), None) or next(broken.glob("iter_*/__0_0.distcp"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    r = run("reshape", broken, tmp_path / "x", "--tp", "1", "--pp", "1")
    assert r.exit_code == 2 and r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    assert not list(tmp_path.glob("x*"))


def test_dp4_source_resumes_at_tp2pp2(corpus, tmp_path):
    """The other direction: Llama trained at TP1xPP1xDP4 (each DP rank saves a quarter of every bucket), reshaped
    offline to TP2xPP2xDP1 (torch_dist): Megatron-Core's gathers agree and the losses continue."""
    from interop.optimizer_state import reshape_for_resume

    save, src_dump = str(tmp_path / "ckpt"), str(tmp_path / "src-dump")
    run_on_ranks(train_and_dump, 4, make_cfg(corpus, "llama", train_iters=3, save=save), None, src_dump,
                 timeout_s=600)
    straight = run_on_ranks(train_and_dump, 4, make_cfg(corpus, "llama"), timeout_s=600)[0]
    load = str(tmp_path / "reshaped")
    reshape_for_resume(save, load, Layout(tp=2, pp=2), "torch_dist")
    (losses, lrs, _, _), dump = _resume(corpus, "llama", load, dict(tp_degree=2, pp_degree=2), "torch_dist", tmp_path)
    assert assert_same_state(src_dump, dump, 300) >= 20
    assert lrs == pytest.approx(straight[1][3:])
    assert losses == pytest.approx(straight[0][3:], rel=1e-5, abs=1e-5)
