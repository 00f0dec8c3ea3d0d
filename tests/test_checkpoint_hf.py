"""HF checkpoints written by Transformers (single, sharded, .bin) read back tensor-for-tensor; our writer's
output loaded by ``from_pretrained`` computes the same logits."""
from __future__ import annotations

import json

import pytest
import torch

from formats.checkpoint import HFCheckpoint, HFCheckpointWriter, open_checkpoint
from formats.errors import FormatError, InteropError, OutputExistsError
from tests import ckpt_hf


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    return getattr(ckpt_hf, f"tiny_{request.param}")()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="30KB")
    (root / "single" / "tokenizer.json").write_text("{}")  # a side file to carry along
    return root


def test_reads_single_and_sharded_tensor_for_tensor(model, saved):
    ref = ckpt_hf.stored_state(model)
    for variant in ("single", "sharded"):
        ckpt = open_checkpoint(saved / variant)
        assert isinstance(ckpt, HFCheckpoint) and (ckpt.kind, ckpt.format) == ("hf", "safetensors")
        assert ckpt.config["model_type"] == model.config.model_type
        infos = {i.name: i for i in ckpt.tensors()}
        assert set(infos) == set(ref)
        for name, t in ref.items():
            assert infos[name].shape == tuple(t.shape) and infos[name].dtype == t.dtype
            assert torch.equal(ckpt.load(name), t), name
    sharded = open_checkpoint(saved / "sharded")
    assert len(sharded.files) > 1 and all(f.startswith("model-0000") for f in sharded.files)
    single = open_checkpoint(saved / "single")
    assert {p.name for p in single.side_files} >= {"generation_config.json", "tokenizer.json"}
    name = next(i.name for i in single.tensors() if len(i.shape) == 2)
    assert torch.equal(single.load(name, (slice(1, 3), slice(0, 4))), ref[name][1:3, :4])


def test_reads_pytorch_model_bin(model, tmp_path):
    ref = ckpt_hf.stored_state(model)
    model.config.save_pretrained(tmp_path)
    torch.save(ref, tmp_path / "pytorch_model.bin")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == "bin" and {i.name for i in ckpt.tensors()} == set(ref)
    for name, t in ref.items():
        assert torch.equal(ckpt.load(name), t)


@pytest.mark.parametrize("planned", [False, True], ids=["buffered", "streamed"])
@pytest.mark.parametrize("max_shard_size", ["1GB", "20KB"])
def test_writer_output_loads_with_from_pretrained(model, saved, tmp_path, max_shard_size, planned):
    src = open_checkpoint(saved / "single")
    dst = tmp_path / "out"
    plan = [(i.name, i.shape, i.dtype) for i in src.tensors()] if planned else None
    with HFCheckpointWriter(dst, src.config, max_shard_size=max_shard_size, side_files=src.side_files,
                            expected={i.name: i.shape for i in src.tensors()}, plan=plan) as w:
        for info in src.tensors():
            w.add(info.name, src.load(info.name))
        w.finalize()
    files = sorted(p.name for p in dst.iterdir())
    assert "tokenizer.json" in files and "generation_config.json" in files
    if max_shard_size == "20KB":
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(i.nbytes for i in src.tensors())
        assert set(index["weight_map"]) == {i.name for i in src.tensors()}
    else:
        assert "model.safetensors" in files
    from safetensors import safe_open

    with safe_open(str(dst / sorted(f for f in files if f.endswith(".safetensors"))[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    loaded = type(model).from_pretrained(dst).eval()
    ids = torch.arange(12).reshape(2, 6) % model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, t in ckpt_hf.stored_state(model).items():
        assert torch.equal(loaded.state_dict()[name], t)


def test_writer_refuses_existing_output_and_cleans_up(saved, tmp_path):
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="exists"):
        HFCheckpointWriter(tmp_path / "exists", {})
    with pytest.raises(RuntimeError):
        with HFCheckpointWriter(tmp_path / "new", {}) as w:
            w.add("a", torch.ones(2))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]  # no temp dir, no half output
    w = HFCheckpointWriter(tmp_path / "exists", {"model_type": "x"}, force=True)
    w.add("a", torch.ones(2))
    w.finalize()
    assert (tmp_path / "exists" / "model.safetensors").is_file()
    with pytest.raises(FormatError, match="missing 1 key"):
        w = HFCheckpointWriter(tmp_path / "x", {}, expected=["a", "b"])
        w.add("a", torch.ones(2))
        w.finalize()


def test_streamed_writer_rejects_tensors_off_plan(tmp_path):
    plan = [("a", (2, 3), torch.float32), ("b", (4,), torch.float32)]
    with pytest.raises(InteropError, match="arrived where a"):
        with HFCheckpointWriter(tmp_path / "x", {}, plan=plan) as w:
            w.add("a", torch.ones(3, 2))
    with pytest.raises(InteropError, match="arrived where b"):
        with HFCheckpointWriter(tmp_path / "x", {}, plan=plan) as w:
            w.add("a", torch.ones(2, 3))
            w.add("b", torch.ones(4, dtype=torch.float16))
    with pytest.raises(InteropError, match="stream ended before b"):
        with HFCheckpointWriter(tmp_path / "x", {}, plan=plan) as w:
            w.add("a", torch.ones(2, 3))
            w.finalize()
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with HFCheckpointWriter(tmp_path / "x", {}, max_shard_size=30, plan=plan) as w:
        w.add("a", torch.arange(6.0).reshape(2, 3))
        w.add("b", torch.zeros(4))
        w.finalize()
    ckpt = open_checkpoint(tmp_path / "x")
    assert ckpt.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert torch.equal(ckpt.load("a"), torch.arange(6.0).reshape(2, 3)) and torch.equal(ckpt.load("b"), torch.zeros(4))


def test_bad_hf_inputs_give_one_line_errors(saved, tmp_path):
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(saved / "single", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated safetensors") as e:
        open_checkpoint(bad)
    assert str(bad / "model.safetensors") in str(e.value) and "\n" not in str(e.value)

    missing = tmp_path / "missing"
    shutil.copytree(saved / "sharded", missing)
    shard = sorted(missing.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FormatError, match=f"missing shard {shard.name}"):
        open_checkpoint(missing)

    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text("{}")
    with pytest.raises(FormatError, match="no weights"):
        open_checkpoint(noweights)
    (noweights / "config.json").write_text("{not json")
    (noweights / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(FormatError, match="invalid JSON"):
        open_checkpoint(noweights)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match="not a checkpoint"):
        open_checkpoint(empty)


def test_reads_sharded_pytorch_model_bin(model, tmp_path):
    ref = ckpt_hf.stored_state(model)
    model.config.save_pretrained(tmp_path)
    names = sorted(ref)
    half = len(names) // 2
    parts = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for file, part in parts.items():
        torch.save({n: ref[n] for n in part}, tmp_path / file)
    weight_map = {n: f for f, part in parts.items() for n in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.format == "bin" and ckpt.files == sorted(parts)
    assert {i.name: i.location for i in ckpt.tensors()} == weight_map
    for name, t in ref.items():
        assert torch.equal(ckpt.load(name), t)
