"""The checkpoint-format registry: a format is one module plus one registry line (docs/architecture.md, "A checkpoint
format"). A toy format (tests/flat_format.py) registered here is opened by ``open_checkpoint`` and written through
``writer_for`` with no other file touched; the built-in formats keep today's detection order and messages."""
from __future__ import annotations

import pytest
import torch

import formats.checkpoint as fc
from formats.errors import FormatError, OutputExistsError
from formats.layout import Layout
from tests import flat_format


@pytest.fixture
def flat():
    fc.register(flat_format.FORMAT)
    yield flat_format.FORMAT
    fc.unregister("flat")


def _write_flat(dst, tensors, **options):
    with fc.writer_for("flat", dst, **options) as w:
        for name, t in tensors.items():
            w.add(name, t)
        return w.finalize()


def test_toy_format_round_trip(tmp_path, flat):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=g), "b.bias": torch.randn(7, generator=g).bfloat16()}
    dst = _write_flat(tmp_path / "out", tensors, layout=Layout(tp=2))
    assert sorted(p.name for p in dst.iterdir()) == ["flat.json", "flat.safetensors"]  # nothing half-written beside
    assert not list(tmp_path.glob("out.tmp*"))
    ckpt = fc.open_checkpoint(dst)
    assert isinstance(ckpt, flat_format.FlatCheckpoint) and fc.format_of(ckpt) is flat
    assert ckpt.layout == Layout(tp=2)
    assert {i.name: (i.shape, i.dtype) for i in ckpt.tensors()} == {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    for name, t in tensors.items():
        assert torch.equal(ckpt.load(name), t)
    assert "flat" in fc.format_names(kind="hf") and fc.format_names()[-1] == "flat"


def test_toy_format_refuses_existing_output_and_unregisters(tmp_path, flat):
    dst = _write_flat(tmp_path / "out", {"x": torch.ones(2)})
    with pytest.raises(OutputExistsError):
        _write_flat(dst, {"x": torch.zeros(2)})
    assert torch.equal(fc.open_checkpoint(dst).load("x"), torch.ones(2))
    fc.unregister("flat")
    with pytest.raises(FormatError, match="not a checkpoint: expected a Hugging Face dir"):
        fc.open_checkpoint(dst)


def test_registering_first_wins_detection(tmp_path, flat):
    """A format registered first is asked before the built-in ones (an HF dir that is also a flat dir)."""
    dst = _write_flat(tmp_path / "out", {"x": torch.ones(2)})
    (dst / "config.json").write_text("{}")
    fc.register(flat_format.FORMAT)  # last: the HF format claims a dir with config.json
    with pytest.raises(FormatError, match="model.safetensors"):
        fc.open_checkpoint(dst)
    fc.register(flat_format.FORMAT, first=True)
    assert isinstance(fc.open_checkpoint(dst), flat_format.FlatCheckpoint)


def test_built_in_formats_and_errors(tmp_path):
    assert fc.format_names() == ["hf", "torch_dist", "torch"]  # today's detection order
    assert fc.format_names(kind="megatron") == ["torch_dist", "torch"]
    assert fc.format_named("torch").per_rank_files and not fc.format_named("torch_dist").per_rank_files
    with pytest.raises(FormatError, match="unknown checkpoint format 'nope' \\(known: hf, torch_dist, torch\\)"):
        fc.writer_for("nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(FormatError, match="no such file"):
        fc.open_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="not a checkpoint"):
        fc.open_checkpoint(tmp_path / "empty")


def test_writer_for_builds_each_built_in_writer(tmp_path):
    """``writer_for`` gives every built-in format's writer; what it writes is opened back by ``open_checkpoint``
    as that format."""
    t = torch.arange(6.0).reshape(2, 3)
    with fc.writer_for("hf", tmp_path / "hf", config={"model_type": "toy"}) as w:
        w.add("w", t)
        w.finalize()
    with fc.writer_for("torch", tmp_path / "torch", layout=Layout(), release=True) as w:
        w.add("w", t)
        w.finalize()
    with fc.writer_for("torch_dist", tmp_path / "dist", release=True) as w:
        w.add("w", t)
        w.finalize()
    for name, sub in (("hf", "hf"), ("torch", "torch"), ("torch_dist", "dist")):
        ckpt = fc.open_checkpoint(tmp_path / sub)
        assert fc.format_of(ckpt).name == name
        assert torch.equal(ckpt.load("w"), t)
