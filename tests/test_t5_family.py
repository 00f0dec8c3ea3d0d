"""T5 as a family: Transformers T5 v1.0 / v1.1 / mT5 <-> Megatron-Core ``T5Model`` through the family layer
(convert, reshape, verify, inspect). Oracles: Transformers' own model (logits, ``from_pretrained``) and
Megatron-Core's own loaders (strict ``load_state_dict``, ``dist_checkpointing.load``) inside ``interop.verify``."""
from __future__ import annotations

import json

import pytest
import safetensors.torch as st

from interop.checkpoints import model_summary, open_source
from interop.conversion import convert
from interop.errors import ConversionError, LayoutError
from interop.reshaping import reshape
from interop.verification import verify
from tests.t5_helpers import tiny_t5


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """HF v1.0, v1.1 and mT5 directories, each converted to Megatron TP2 torch and torch_dist and back."""
    root = tmp_path_factory.mktemp("t5fam")
    for version in ("1.0", "1.1", "mt5"):
        tiny_t5(version).save_pretrained(root / f"hf{version}")
        for fmt in ("torch", "torch_dist"):
            convert(root / f"hf{version}", root / f"m{version}_{fmt}", tp=2, format=fmt, progress=False)
            convert(root / f"m{version}_{fmt}", root / f"back{version}_{fmt}", progress=False)
    return root


@pytest.mark.parametrize("version", ["1.0", "1.1", "mt5"])
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_hf_to_megatron_tp2_and_back_is_exact(t5, version, fmt):
    a = st.load_file(t5 / f"hf{version}" / "model.safetensors")
    b = st.load_file(t5 / f"back{version}_{fmt}" / "model.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].equal(b[k]), k
    src, back = (json.loads((t5 / d / "config.json").read_text()) for d in (f"hf{version}", f"back{version}_{fmt}"))
    for key in ("model_type", "architectures", "feed_forward_proj", "d_kv", "num_decoder_layers",
                "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon"):
        assert back[key] == src[key], key


def test_megatron_core_loads_and_matches_transformers(t5, tmp_path):
    """Megatron-Core's T5Model (our spec) at TP2 loads each written checkpoint with its own loaders and its
    logits (encoder and decoder padding) match Transformers'; a reshape to TP1 keeps them."""
    for version, fmt in (("1.0", "torch"), ("1.1", "torch_dist"), ("mt5", "torch")):
        result = verify(t5 / f"hf{version}", t5 / f"m{version}_{fmt}")
        assert result.ok and result.max_abs_diff < 1e-4 * max(1.0, result.max_abs_logit), (version, fmt)
    reshape(t5 / "m1.1_torch", tmp_path / "tp1", tp=1, pp=1, format="torch_dist", progress=False)
    assert verify(t5 / "hf1.1", tmp_path / "tp1").ok


def test_verify_sees_a_wrong_decoder_norm(t5, tmp_path):
    """The comparison can fail: a Megatron checkpoint whose final decoder norm lost v1.0's output scaling."""
    import torch

    hf = tiny_t5("1.0")
    hf.decoder.final_layer_norm.weight.data *= 1.5
    hf.save_pretrained(tmp_path / "other")
    convert(tmp_path / "other", tmp_path / "m", progress=False)
    result = verify(t5 / "hf1.0", tmp_path / "m", raise_on_mismatch=False)
    assert not result.ok and result.max_abs_diff > 1e-2
    assert torch.isfinite(torch.tensor(result.max_abs_diff))


def test_inspect_names_the_family_and_pp_is_refused(t5, tmp_path):
    summary = model_summary(open_source(t5 / "m1.1_torch_dist"))
    assert summary == {"model_family": "t5", "model_kind": "encoder-decoder", "heads": ["lm_head"]}
    with pytest.raises(LayoutError, match="PP=2.*T5Model"):
        convert(t5 / "hf1.0", tmp_path / "pp2", tp=1, pp=2, progress=False)
    assert not (tmp_path / "pp2").exists()
    with pytest.raises(LayoutError, match="PP=2"):
        reshape(t5 / "m1.0_torch", tmp_path / "pp2r", tp=1, pp=2, progress=False)
    assert not (tmp_path / "pp2r").exists()


def test_nonzero_output_bias_is_refused(t5, tmp_path):
    """A Megatron T5 with a trained LM-head bias cannot become a Transformers T5 (which has none)."""
    import torch

    reshape(t5 / "m1.0_torch", tmp_path / "tp1", tp=1, pp=1, format="torch", progress=False)
    rank = next((tmp_path / "tp1").rglob("model_optim_rng.pt"))
    state = torch.load(rank, weights_only=False)
    for key in ("lm_head.output_layer.bias", "output_layer.bias"):
        state["model"][key][3] = 1.0
    torch.save(state, rank)
    with pytest.raises(ConversionError, match="output_layer.bias is not zero"):
        convert(tmp_path / "tp1", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_megatron_lm_t5_without_te_reshapes_with_logits_kept_and_refuses_hf(tmp_path):
    """A T5Model built with Megatron-Core's own local specs and saved by Megatron-Core itself at TP2 (torch and
    torch_dist, tied and untied): read, reshaped to TP1 in the other format with its own logits kept (through
    Megatron-Core's loaders at each checkpoint's layout), ``verify`` between two Megatron checkpoints, and a
    one-line refusal to become a Transformers T5 that writes nothing."""
    from interop.families.base import ModelConfig
    from interop.launch import run_on_ranks
    from interop.verification import megatron_outputs, model_batch
    from tests import t5_family_ranks as ranks

    shape = ModelConfig(family="t5", num_layers=ranks.DEC_LAYERS, encoder_num_layers=ranks.LAYERS,
                        hidden_size=ranks.H, num_attention_heads=ranks.HEADS, ffn_hidden_size=ranks.FFN,
                        vocab_size=ranks.VOCAB, max_position_embeddings=ranks.SEQ)
    batch = model_batch(shape)
    own = run_on_ranks(ranks.save_with_megatron_core, 2, str(tmp_path), batch, timeout_s=900)[0]
    keep = batch["decoder_attention_mask"].bool()
    for name, src, fmt in (("tied", "torch", "torch_dist"), ("untied", "dist", "torch")):
        out = tmp_path / f"{name}-tp1"
        result = reshape(tmp_path / name / src, out, tp=1, pp=1, format=fmt, vocab_size=ranks.VOCAB, progress=False)
        assert result.config.family == "t5" and result.config.position_embedding_type == "learned_absolute"
        logits = megatron_outputs(out, batch)["logits"]
        assert (logits[keep] - own[name][keep]).abs().max() < 1e-4, name
        assert verify(tmp_path / name / src, out, vocab_size=ranks.VOCAB).ok
        with pytest.raises(ConversionError, match="learned_absolute positions, linear layers with bias, LayerNorm"):
            convert(out, tmp_path / f"{name}-hf", progress=False)
        assert not (tmp_path / f"{name}-hf").exists()
    with pytest.raises(LayoutError, match="PP=2"):
        reshape(tmp_path / "tied" / "torch", tmp_path / "pp2", tp=1, pp=2, vocab_size=ranks.VOCAB, progress=False)
