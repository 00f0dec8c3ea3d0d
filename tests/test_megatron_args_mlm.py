"""Issue 25 against Megatron-LM's OWN code: set ``MEGATRON_LM_DIR`` to a core_v0.16.1 checkout (outside this
repository; ``six`` importable) and these tests load our converted checkpoints with Megatron-LM's argument
handling, tokenizer, model builder and ``load_checkpoint`` (``tests/megatron_lm_probe.py``), offline, on CPU
ranks, and compare the logits with Transformers' in fp32. Skipped otherwise; ``tests/test_megatron_args.py``
encodes the same rules for CI.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import interop
from interop.conversion import open_source
from interop.megatron_args import megatron_lm_flags, megatron_lm_limits
from tests.test_convert_megatron_model import tiny_hf
from tests.test_megatron_args import word_tokenizer

MLM = os.environ.get("MEGATRON_LM_DIR")
pytestmark = pytest.mark.skipif(not MLM, reason="set MEGATRON_LM_DIR to a Megatron-LM core_v0.16.1 checkout")


def probe(tmp_path: Path, dst: Path, reference: dict | None, world: int, extra: list[str],
          refused: tuple[str, ...] = ()) -> dict:
    """Run tests/megatron_lm_probe.py on ``world`` ranks with the flags ``interop inspect`` prints (+ ``extra``);
    ``reference``: ``{"batch": …, "outputs": …}`` of the HF source (None: T5, args and tokenizers only)."""
    from tests.megatron_lm_probe import launch

    torch.save(reference or {}, tmp_path / "hf.pt")
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join([MLM, root, os.environ.get("PYTHONPATH", "")])
    flags = megatron_lm_flags(open_source(dst).args) + extra  # exactly what `interop inspect` prints
    report = launch(str(tmp_path / "report.json"), str(dst), str(tmp_path / "hf.pt"), world, flags)
    assert "error" not in report, report["error"]
    # keys Megatron-LM's strict load refused (it then loads non-strict, silently): exactly the expected ones
    fallback = " ".join(report["strict_fallback"])
    assert bool(fallback) == bool(refused) and all(k in fallback for k in refused), report["strict_fallback"]
    return report


def causal_reference(hf: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return {"batch": {"tokens": tokens}, "outputs": {"logits": model(tokens).logits}}


@pytest.mark.parametrize("family, tok, fmt, world, extra", [
    ("gpt2", True, "torch_dist", 4, ["--use-mp-args-from-checkpoint-args"]),
    ("gpt2", True, "torch_dist", 1, []),  # another layout: TP1 x PP1 from TP2 x PP2
    ("gpt2", False, "torch", 4, []),
    ("llama", True, "torch", 4, []),
    ("llama", False, "torch_dist", 2, ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2"]),
])
def test_megatron_lm_loads_what_we_write(tmp_path, family, tok, fmt, world, extra):
    hf = tmp_path / "hf"
    model = tiny_hf(family, seed=2)
    if family == "llama":
        model.config.rms_norm_eps = 1e-6
    model.save_pretrained(hf)
    if tok:
        word_tokenizer(hf, model.config.vocab_size)
    dst = tmp_path / "meg"
    interop.convert(hf, dst, tp=2, pp=2, format=fmt, progress=False)
    report = probe(tmp_path, dst, causal_reference(hf), world, extra)
    print(f"Megatron-LM {family} tokenizer={tok} {fmt} -> {report.get('tp')}x{report.get('pp')}: "
          f"max |dlogit| {report.get('max_abs_diff')} (max |logit| {report.get('max_abs_logit')})")
    assert report["tokenizer"] == ("_HuggingFaceTokenizer" if tok else "_NullTokenizer")
    assert report["tokenizer_vocab_size"] == 100
    assert report["max_abs_diff"] <= 1e-5, report


def bert_reference(model, binary_head: bool) -> dict:
    """Transformers' outputs on a padded two-segment batch; without the binary head pretrain_bert.py passes no
    token types (its forward_step), so the batch has none and Transformers uses type 0."""
    from tests.bert_tiny import batch, hf_outputs

    b = batch()
    if not binary_head:
        b.pop("tokentype_ids")
        b_hf = {**b, "tokentype_ids": torch.zeros_like(b["tokens"])}
        return {"batch": b, "outputs": hf_outputs(model, b_hf)}
    return {"batch": b, "outputs": hf_outputs(model, b)}


@pytest.mark.parametrize("binary, tok, fmt, tp, world, extra", [
    (True, True, "torch", 2, 2, []),
    (True, False, "torch_dist", 2, 1, []),  # another layout: TP1 from TP2
    (True, True, "torch_dist", 1, 2, ["--tensor-model-parallel-size", "2"]),  # TP2 from TP1
    (False, True, "torch_dist", 2, 2, ["--use-mp-args-from-checkpoint-args"]),
    (False, False, "torch", 1, 1, []),
])
def test_megatron_lm_loads_our_bert(tmp_path, binary, tok, fmt, tp, world, extra):
    """pretrain_bert.py's own model_provider and load_checkpoint on what `interop convert` wrote from a
    MegatronBertForPreTraining (binary head) / MegatronBertForMaskedLM (none): MLM (and NSP) logits within 1e-5."""
    from tests.bert_tiny import tiny_bert
    from tests.test_megatron_args import wordpiece_tokenizer

    if not (Path(MLM) / "pretrain_bert.py").exists():
        pytest.skip("MEGATRON_LM_DIR has no pretrain_bert.py")
    hf = tmp_path / "hf"
    model = tiny_bert(binary_head=binary, seed=3)
    if not binary:  # pretrain_bert.py builds no token-type table without the binary head: a zero one adds nothing
        model.bert.embeddings.token_type_embeddings.weight.data.zero_()
    model.save_pretrained(hf)
    if tok:
        wordpiece_tokenizer(hf, model.config.vocab_size)
    dst = tmp_path / "meg"
    interop.convert(hf, dst, tp=tp, pp=1, format=fmt, progress=False)
    args = open_source(dst).args
    limits = megatron_lm_limits(args)
    assert bool(limits) == (not binary), limits  # MaskedLM: 2 token types (HF always has them), Megatron-LM 0
    # the table Megatron-LM does not build: its torch-format strict load refuses it (and retries non-strict),
    # dist_checkpointing loads only the keys the model asks for (the table is ignored without a word)
    refused = ("embedding.tokentype_embeddings.weight",) if not binary and fmt == "torch" else ()
    report = probe(tmp_path, dst, bert_reference(model, binary), world, extra, refused)
    print(f"Megatron-LM bert binary={binary} tokenizer={tok} {fmt} TP{tp} -> TP{report['tp']}: {report['diffs']}")
    assert report["spec"] == ["local"]
    assert report["tokenizer"] == ("_HuggingFaceTokenizer" if tok else "_NullTokenizer")
    assert report["tokenizer_vocab_size"] == 100
    if tok:  # what BERTMaskedWordPieceDataset reads from pretrain_bert.py's (megatron.core) tokenizer
        core = report["core_tokenizer"]
        assert (core["cls"], core["sep"], core["mask"], core["pad"], core["vocab_size"]) == (2, 3, 4, 0, 100), core
    assert report["outputs"] == (["binary_logits", "logits"] if binary else ["logits"])
    assert report["max_abs_diff"] <= 1e-5, report


@pytest.mark.parametrize("version, decoder_layers, tok, fmt, tp, world, extra", [
    ("1.0", 2, True, "torch_dist", 2, 2, ["--tensor-model-parallel-size", "2"]),
    ("1.1", 3, False, "torch", 1, 1, []),
])
def test_megatron_lm_reads_our_t5_args(tmp_path, version, decoder_layers, tok, fmt, tp, world, extra):
    """pretrain_t5.py's argument handling and tokenizers on what `interop convert` wrote from a Transformers T5.
    Megatron-LM builds a relative-position T5 only with Transformer Engine (absent on CPU), so the model itself is
    not loaded: the probe reports pretrain_t5.model_provider's error, and Megatron-LM's own TransformerConfig shows
    what :func:`megatron_lm_limits` says it cannot express (T5's MLP; an encoder deeper or shallower than the
    decoder)."""
    from tests.t5_helpers import tiny_t5
    from tests.test_megatron_args import t5_tokenizer

    if not (Path(MLM) / "pretrain_t5.py").exists():
        pytest.skip("MEGATRON_LM_DIR has no pretrain_t5.py")
    hf = tmp_path / "hf"
    model = tiny_t5(version, decoder_layers=decoder_layers)
    model.save_pretrained(hf)
    if tok:
        t5_tokenizer(hf, model.config.vocab_size)
    dst = tmp_path / "meg"
    interop.convert(hf, dst, tp=tp, pp=1, format=fmt, progress=False)
    limits = megatron_lm_limits(open_source(dst).args)
    report = probe(tmp_path, dst, None, world, extra)
    print(f"Megatron-LM t5 {version} tokenizer={tok} {fmt}: {report}")
    args, config = report["args"], report["config"]
    # what the checkpoint's args and the printed flags gave Megatron-LM
    assert report["transformer_impl"] == "transformer_engine"  # relative positions: TE only
    assert (args["position_embedding_type"], args["relative_attention_num_buckets"],
            args["relative_attention_max_distance"]) == ("relative", 8, 12)
    assert (config["hidden_size"], config["num_attention_heads"], config["kv_channels"],
            config["ffn_hidden_size"]) == (64, 4, 16, 96)
    assert (config["normalization"], config["add_bias_linear"]) == ("RMSNorm", False)
    assert config["layernorm_epsilon"] == model.config.layer_norm_epsilon
    assert args["untie_embeddings_and_output_weights"] == (version == "1.1")
    assert report["tp"] == tp and report["padded_vocab_size"] == open_source(dst).args.padded_vocab_size
    # both stacks get num_layers (= the decoder's): an uneven T5 is one of the limits
    assert config["num_layers"] == args["encoder_num_layers"] == decoder_layers
    assert any("num_layers" in why for why in limits) == (decoder_layers != 2)
    # Megatron-LM's MLP is GELU (no ReLU / gated GELU argument): T5's activation is always a limit
    assert (config["activation_func"], config["gated_linear_unit"]) == ("gelu", False)
    assert any("MLP" in why for why in limits)
    assert report["tokenizer"] == ("_HuggingFaceTokenizer" if tok else "_NullTokenizer")
    assert report["tokenizer_vocab_size"] == 100
    if tok:  # T5MaskedWordPieceDataset's sentinels: Megatron-LM's HF wrapper reads the tokenizer's
        # `additional_special_tokens`, which Transformers 5 renamed `extra_special_tokens` (our <extra_id_*> are
        # there): with Transformers 5, pretrain_t5.py's dataset cannot get sentinels from any HF tokenizer
        from transformers import AutoTokenizer

        assert report["core_tokenizer"]["additional_special_tokens_ids"] == "error: AttributeError"
        sentinels = AutoTokenizer.from_pretrained(dst / "tokenizer").convert_tokens_to_ids(
            [f"<extra_id_{i}>" for i in range(10)])
        assert sorted(sentinels) == list(range(90, 100))
    # the TE block spec: not_none(TELayerNormColumnParallelLinear) without Transformer Engine
    assert report["model_built"] is False and "not None" in report["model_error"], report
    # our keys against pretrain_t5.py's local-spec T5: the same modules and names, except what only the TE spec
    # (final norms; relative tables, TE-only in Megatron-LM) or only the local one (learned positions) has
    from formats.checkpoint import open_checkpoint

    ours = {t.name for t in open_checkpoint(dst).tensors()}
    learned = {"embedding.position_embeddings.weight", "position_embeddings.weight"}
    te_only = {f"{s}.final_layernorm.weight" for s in ("encoder", "decoder")} | {
        f"{s}_relative_pos_emb.relative_attention_bias.weight" for s in ("encoder", "decoder")}
    local = set(report["local_spec_keys"][fmt])
    # and the encoder layers Megatron-LM adds to an uneven T5 (its encoder gets num_layers = the decoder's depth)
    added = {k for k in local if k.startswith("encoder.layers.") and k.split(".")[2].isdigit()
             and int(k.split(".")[2]) >= model.config.num_layers}
    assert bool(added) == (decoder_layers != model.config.num_layers)
    assert ours == (local - learned - added) | te_only, sorted(ours ^ ((local - learned - added) | te_only))
    # the torch format keeps the local names of the fused norms (TE's are linear_qkv/linear_fc1.layer_norm_weight)
    assert any("torch format" in why for why in limits) == (fmt == "torch")
