"""HF -> Megatron -> HF and Megatron reshapes, checked against the producers:
* every HF output is loaded by Transformers (``from_pretrained``) and must reproduce the original model's logits;
* Megatron outputs are loaded by Megatron-Core itself (``load_state_dict(strict=True)`` per rank for ``torch``,
  ``dist_checkpointing.load`` for ``torch_dist``) into GPTModels at the checkpoint's own layout on gloo ranks.
Rank runs are the expensive part, so each layout/format gets one of them and the rest is in-process."""
from __future__ import annotations

import pytest
import torch

import interop
from formats.checkpoint import open_checkpoint
from formats.layout import Layout
from interop.verification import hf_logits as hf_dir_logits
from interop.verification import megatron_logits
from tests.test_convert_megatron_model import TOKENS, hf_logits, tiny_hf

ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (HF dir, logits of the original Transformers model)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, kind, tie in [("gpt2", "gpt2", True), ("llama", "llama", False), ("qwen2-tied", "qwen2", True),
                            ("mistral-mqa", "mistral-mqa", False)]:
        model = tiny_hf(kind, tie=tie)
        path = root / name
        model.save_pretrained(path)
        out[name] = (path, hf_logits(model))
    return out


def _convert(src, dst, **kw):
    return interop.convert(src, dst, progress=False, **kw)


LAYOUTS = [(1, 1, None), (1, 2, None), (2, 1, None), (2, 2, None), (1, 2, 2)]


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_round_trip_every_layout_back_to_transformers(models, tmp_path, family, fmt):
    src, expected = models[family]
    for tp, pp, vpp in LAYOUTS:
        meg = tmp_path / f"meg-{tp}{pp}{vpp}"
        _convert(src, meg, tp=tp, pp=pp, vpp=vpp, format=fmt)
        ck = open_checkpoint(meg)
        assert ck.format == fmt and ck.release
        if fmt == "torch":
            assert (ck.layout.tp, ck.layout.pp, ck.num_chunks) == (tp, pp, vpp or 1)
        back = tmp_path / f"back-{tp}{pp}{vpp}"
        _convert(meg, back)
        got = hf_dir_logits(back, TOKENS)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"{family} {fmt} TP{tp}PP{pp}VPP{vpp}")


@pytest.mark.parametrize("family,fmt,tp,pp,vpp", [
    ("llama", "torch", 2, 2, None),        # GQA, untied, strict per-rank load
    ("llama", "torch_dist", 2, 1, None),   # dist_checkpointing.load at TP2
    ("gpt2", "torch", 1, 2, 2),            # MHA, tied copy on the last stage, VPP=2 (model0/model1)
    ("qwen2-tied", "torch_dist", 2, 2, None),  # QKV bias, tied, torch_dist has no output copy
    ("mistral-mqa", "torch", 1, 2, None),  # MQA
    ("llama", "torch_dist", 1, 2, 2),      # VPP chunks loaded by dist_checkpointing (model0/model1)
])
def test_megatron_core_loads_and_matches_transformers(models, tmp_path, family, fmt, tp, pp, vpp):
    src, expected = models[family]
    meg = tmp_path / "meg"
    _convert(src, meg, tp=tp, pp=pp, vpp=vpp, format=fmt)
    got = megatron_logits(meg, TOKENS)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_reshape_tp2pp2_to_tp1pp2_and_tp2pp1(models, tmp_path):
    src, expected = models["llama"]
    meg = tmp_path / "tp2pp2"
    _convert(src, meg, tp=2, pp=2, format="torch")
    a = interop.reshape(meg, tmp_path / "tp1pp2", tp=1, pp=2, progress=False)
    assert a.format == "torch" and any("dropped" in n for n in a.notes)
    torch.testing.assert_close(megatron_logits(tmp_path / "tp1pp2", TOKENS), expected, atol=ATOL, rtol=0)
    interop.reshape(meg, tmp_path / "tp2pp1", tp=2, pp=1, format="torch_dist", progress=False)
    _convert(tmp_path / "tp2pp1", tmp_path / "hf")
    torch.testing.assert_close(hf_dir_logits(tmp_path / "hf", TOKENS), expected, atol=ATOL, rtol=0)


def test_gpt2_legacy_format_round_trip(models, tmp_path):
    src, expected = models["gpt2"]
    meg = tmp_path / "legacy"
    _convert(src, meg, tp=2, pp=2, format="legacy")
    ck = open_checkpoint(meg)
    assert ck.key_style == "legacy"
    names = {i.name for i in ck.rank_tensors(0, 1)}
    assert "word_embeddings_for_head.weight" in names  # tied copy on the last stage (docs/checkpoint-formats.md trap T5)
    assert "language_model.encoder.layers.0.self_attention.query_key_value.weight" in names
    _convert(meg, tmp_path / "hf")
    torch.testing.assert_close(hf_dir_logits(tmp_path / "hf", TOKENS), expected, atol=ATOL, rtol=0)
    # and to Megatron-Core keys at another layout, loaded strictly by Megatron-Core
    interop.reshape(meg, tmp_path / "mcore", tp=1, pp=1, format="torch", progress=False)
    torch.testing.assert_close(megatron_logits(tmp_path / "mcore", TOKENS), expected, atol=ATOL, rtol=0)


def test_verify_api_and_bf16_output(models, tmp_path):
    src, _ = models["llama"]
    result = _convert(src, tmp_path / "meg", tp=1, pp=1, format="torch_dist", verify=True)
    assert result.verify.ok and result.verify.max_abs_diff <= 1e-5
    bf = _convert(tmp_path / "meg", tmp_path / "hf-bf16", dtype="bf16")
    ck = open_checkpoint(bf.dst)
    assert {i.dtype for i in ck.tensors()} == {torch.bfloat16}
    assert ck.config["torch_dtype"] == "bfloat16"
    v = interop.verify(src, tmp_path / "hf-bf16")
    assert v.ok and 0 < v.max_abs_diff <= v.tolerance


def rank_save_like_megatron_lm(cfg, canonical, root: str):
    """On each TP2xPP2 rank: load canonical weights into Megatron-Core GPTModels, then save them the way
    Megatron-LM does — per-rank ``torch.save`` of ``state_dict()`` and ``dist_checkpointing.save`` (torch_dist)."""
    import os

    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from interop.convert_megatron import args_namespace
    from interop.megatron_model import build_gpt_chunks, load_canonical
    from interop.runtime import RuntimeConfig, distributed

    layout = Layout(tp=2, pp=2)
    with distributed(RuntimeConfig(layout=layout)):
        chunks = build_gpt_chunks(cfg)
        load_canonical(chunks, iter(canonical.items()), cfg)
        args = args_namespace(cfg, layout, torch.float32)
        t, p = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        rank_dir = os.path.join(root, "torch", "iter_0000005", f"mp_rank_{t:02d}_{p:03d}")
        os.makedirs(rank_dir)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 5, "model": chunks[0].state_dict()},
                   os.path.join(rank_dir, "model_optim_rng.pt"))
        dist_dir = os.path.join(root, "dist", "iter_0000005")
        if torch.distributed.get_rank() == 0:
            os.makedirs(dist_dir)
        torch.distributed.barrier()
        dist_checkpointing.save({"model": chunks[0].sharded_state_dict(), "args": args,
                                 "checkpoint_version": 3.0, "iteration": 5}, dist_dir)
        if torch.distributed.get_rank() == 0:
            for kind in ("torch", "dist"):
                with open(os.path.join(root, kind, "latest_checkpointed_iteration.txt"), "w") as f:
                    f.write("5")


def test_reads_checkpoints_saved_by_megatron_core_itself(tmp_path):
    """Our readers against the real producer: Megatron-Core's own state_dict / dist_checkpointing output."""
    from interop.launch import run_on_ranks
    from tests.test_convert_megatron_model import canonical_of

    model = tiny_hf("llama")
    expected = hf_logits(model)
    cfg, canonical = canonical_of(model)
    run_on_ranks(rank_save_like_megatron_lm, 4, cfg, canonical, str(tmp_path), timeout_s=300)
    for kind in ("torch", "dist"):
        _convert(tmp_path / kind, tmp_path / f"hf-{kind}")
        torch.testing.assert_close(hf_dir_logits(tmp_path / f"hf-{kind}", TOKENS), expected, atol=ATOL, rtol=0)
