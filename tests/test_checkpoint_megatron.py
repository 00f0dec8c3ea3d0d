"""Megatron artifacts made by Megatron-Core itself (TP=2 x PP=2 on 4 gloo ranks) read back tensor-for-tensor,
and our writers' output loaded back by Megatron-Core (``dist_checkpointing.load``, ``load_state_dict(strict=True)``)."""
from __future__ import annotations

import torch
import pytest

from formats.checkpoint import MegatronTorchCheckpoint, TorchDistCheckpoint, open_checkpoint
from interop.launch import run_on_ranks
from tests import ckpt_mcore, mcore_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcore")
    results = run_on_ranks(ckpt_mcore.produce_and_consume, 4, str(root), 2, 2, timeout_s=300)
    return root, {(r["tp"], r["pp"]): r for r in results}


def test_torch_format_reads_back_tensor_for_tensor(produced):
    root, ranks = produced
    ckpt = open_checkpoint(root / "torch")
    assert isinstance(ckpt, MegatronTorchCheckpoint)
    assert (ckpt.kind, ckpt.format, ckpt.key_style) == ("megatron", "torch", "mcore")
    assert (ckpt.layout.tp, ckpt.layout.pp, ckpt.iteration, ckpt.release, ckpt.checkpoint_version) == (2, 2, 7, False, 3.0)
    assert ckpt.args.hidden_size == mcore_tiny.HIDDEN
    assert getattr(ckpt.args.model_type, "value", None) == 1  # a placeholder (or the enum if Megatron registered it)
    assert ckpt.rank_keys() == [(t, p, 0) for t in range(2) for p in range(2)]
    for (tp, pp), r in ranks.items():
        infos = {i.name: i for i in ckpt.rank_tensors(tp, pp)}
        assert set(infos) == set(r["state"])
        for name, ref in r["state"].items():
            assert infos[name].shape == tuple(ref.shape) and infos[name].dtype == ref.dtype
            assert torch.equal(ckpt.load_rank_tensor(name, tp, pp), ref), name
    # any path inside the tree opens the same checkpoint
    one = open_checkpoint(root / "torch" / "iter_0000007" / "mp_rank_01_001" / "model_optim_rng.pt")
    assert one.path == ckpt.path and one.layout == ckpt.layout


def test_torch_dist_reads_every_shard_megatron_wrote(produced):
    root, ranks = produced
    ckpt = open_checkpoint(root / "dist")
    assert isinstance(ckpt, TorchDistCheckpoint)
    assert (ckpt.format, ckpt.iteration, ckpt.layout.tp, ckpt.layout.pp) == ("torch_dist", 7, 2, 2)
    infos = {i.name: i for i in ckpt.tensors()}
    assert infos["decoder.layers.self_attention.linear_qkv.weight"].shape[0] == mcore_tiny.LAYERS  # stacked
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in infos  # TE name for local norms
    checked = 0
    for r in ranks.values():
        for key, offset, local_shape, prepend, data in r["shards"]:
            slices = tuple(slice(o, o + 1) for o in offset[:prepend]) + tuple(
                slice(o, o + s) for o, s in zip(offset[prepend:], local_shape)
            )
            got = ckpt.load(key, slices)
            assert torch.equal(got.reshape(data.shape), data), key
            checked += 1
    assert checked >= len(infos)
    # Megatron-Core's own DCP blobs take the mapped path (no torch.load), and it gives torch.load's tensors
    mapped = 0
    for key, entries in ckpt._index.items():
        for _, info in entries:
            if key in infos:
                view = ckpt._mapped_chunk(info)
                assert view is not None, key
                assert torch.equal(view[0], ckpt._read_chunk(key, info)), key
                mapped += 1
    assert mapped >= len(infos)


def test_megatron_core_loads_our_torch_dist_and_torch_writes(produced):
    _, ranks = produced
    for r in ranks.values():
        assert r["dist_common"] == (ckpt_mcore.ITERATION, mcore_tiny.LAYERS)
        assert set(r["from_dist"]) == set(r["state"]) == set(r["from_torch"])
        for name, ref in r["state"].items():
            assert torch.equal(r["from_dist"][name], ref), name
            assert torch.equal(r["from_torch"][name], ref), name


def test_our_rank_files_equal_the_source_under_torch_load(produced):
    root, _ = produced
    src = sorted((root / "torch" / "iter_0000007").glob("mp_rank_*/model_optim_rng.pt"))
    assert len(src) == 4
    for path in src:
        ours = root / "ours_torch" / "iter_0000007" / path.parent.name / path.name
        a = torch.load(path, weights_only=False)
        b = torch.load(ours, weights_only=False)
        assert list(a["model"]) == list(b["model"])
        for k, v in a["model"].items():
            assert torch.equal(v, b["model"][k]) if isinstance(v, torch.Tensor) else v == b["model"][k]
        assert b["iteration"] == 7 and b["checkpoint_version"] == 3.0
        assert b["args"].tensor_model_parallel_size == 2 and b["args"].model_type == 1  # plain value, no Megatron class
    assert (root / "ours_torch" / "latest_checkpointed_iteration.txt").read_text() == "7"


@pytest.fixture(scope="module")
def vpp_tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("vpp")
    results = run_on_ranks(ckpt_mcore.produce_vpp_tied, 2, str(root), 2, 2, timeout_s=300)
    return root, {r["pp"]: r for r in results}


def test_vpp_chunks_and_tied_copy_as_megatron_core_wrote_them(vpp_tied):
    root, ranks = vpp_tied
    ckpt = open_checkpoint(root / "torch" / "iter_0000007")
    assert ckpt.layout.pp == 2 and ckpt.layout.vpp == 2 and ckpt.num_chunks == 2
    for pp, r in ranks.items():
        for chunk, state in enumerate(r["chunks"]):
            infos = {i.name for i in ckpt.rank_tensors(0, pp, chunk)}
            assert infos == set(state)
            for name, ref in state.items():
                assert torch.equal(ckpt.load_rank_tensor(name, 0, pp, chunk), ref)
    # tied + PP > 1: the last chunk of the last stage carries output_layer.weight (docs/checkpoint-formats.md §4.5) ...
    assert "output_layer.weight" in {i.name for i in ckpt.rank_tensors(0, 1, 1)}
    assert "embedding.word_embeddings.weight" in {i.name for i in ckpt.rank_tensors(0, 0, 0)}
    # ... torch_dist has no copy, and its stacked layers carry global layer numbers
    dist = open_checkpoint(root / "dist" / "iter_0000007")
    assert dist.layout.vpp == 2
    names = {i.name for i in dist.tensors()}
    assert "output_layer.weight" not in names and "embedding.word_embeddings.weight" in names
    for r in ranks.values():
        for key, offset, local_shape, prepend, data in r["shards"]:
            if key == "output_layer.weight":
                continue
            slices = tuple(slice(o, o + 1) for o in offset[:prepend]) + tuple(
                slice(o, o + s) for o, s in zip(offset[prepend:], local_shape))
            assert torch.equal(dist.load(key, slices).reshape(data.shape), data), (key, offset)


def test_inspect_agrees_between_torch_and_torch_dist(produced):
    """Two independent listings of the same Megatron-Core model (per-rank shards vs. global shapes) must agree."""
    import json

    from click.testing import CliRunner

    from interop.cli import cli

    root, ranks = produced
    infos = {}
    for fmt in ("torch", "dist", "ours_dist"):
        result = CliRunner().invoke(cli, ["inspect", str(root / fmt), "--json"])
        assert result.exit_code == 0, result.output
        infos[fmt] = json.loads(result.output)
    full = sum(t.numel() for r in ranks.values() if r["tp"] == 0 for t in r["state"].values())
    assert infos["torch"]["parameters"] == infos["dist"]["parameters"] == infos["ours_dist"]["parameters"]
    assert infos["torch"]["parameters"] < full * 2  # replicated tensors are not counted per TP rank
    assert infos["dist"]["layout"] == infos["torch"]["layout"]
    assert infos["torch"]["vocab_size"] == {"true": mcore_tiny.VOCAB, "padded": mcore_tiny.VOCAB,
                                            "source": f"NullTokenizer: args.vocab_size {mcore_tiny.VOCAB - 1} + EOD"}
    assert infos["torch"]["family"] == "gpt2" and infos["dist"]["key_style"] == "mcore"
