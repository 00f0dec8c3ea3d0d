"""Issue 25: the args we write let Megatron-LM 0.16.1 (``pretrain_gpt.py --load DST --use-checkpoint-args``) build the
same model and tokenizer offline. CI cannot fetch Megatron-LM, so :class:`MegatronLM016` re-implements exactly the
steps of Megatron-LM core_v0.16.1 that touch these fields (verified against the real code by
``tests/test_megatron_args_mlm.py`` when ``MEGATRON_LM_DIR`` points at a checkout):

* ``megatron/training/arguments.py``: the parser defaults of the fields below and the flags that change them;
* ``megatron/training/checkpointing.py`` ``load_args_from_checkpoint``: ``_set_arg`` copies a field when it is
  forced or the command line left it None; tokenizer fields forced while ``use_tokenizer_model_from_checkpoint_args``
  (default True); ``padded_vocab_size`` only when None; TP/PP only with ``--use-mp-args-from-checkpoint-args``;
* ``megatron/training/tokenizer/tokenizer.py`` ``build_tokenizer``: NullTokenizer asserts ``vocab_size`` and has
  ``vocab_size + 1`` tokens; HuggingFaceTokenizer is ``AutoTokenizer.from_pretrained(tokenizer_model)`` with
  ``len()`` tokens; ``padded_vocab_size`` is kept when the checkpoint gave it;
* ``arguments.py`` ``core_transformer_config_from_args``: ``persist_layer_norm = not no_persist_layer_norm``,
  ``layernorm_epsilon``; ``gpt_builders.py``: the local spec iff ``transformer_impl == 'local'``, and
  ``megatron/core/transformer/torch_norm.py`` ``WrappedTorchNorm`` (the local spec's norm without apex) asserts
  ``not persist_layer_norm``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import interop
from interop.conversion import open_source
from interop.megatron_args import megatron_lm_flags, moved_tokenizer_hint
from tests.test_convert_megatron_model import tiny_hf

# load_args_from_checkpoint: (field, force)
COPIED = [("num_layers", False), ("hidden_size", False), ("ffn_hidden_size", False), ("seq_length", False),
          ("num_attention_heads", False), ("num_query_groups", True), ("group_query_attention", True),
          ("kv_channels", False), ("max_position_embeddings", False), ("position_embedding_type", True),
          ("add_position_embedding", True), ("use_rotary_position_embeddings", True), ("rotary_base", True),
          ("rotary_percent", True), ("rotary_interleaved", True), ("add_bias_linear", True),
          ("add_qkv_bias", True), ("swiglu", True), ("untie_embeddings_and_output_weights", True),
          ("normalization", True), ("spec", True)]
MP_FIELDS = ["tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size"]
# arguments.py defaults of what the above and the tokenizer/config steps read
DEFAULTS = dict(num_layers=None, hidden_size=None, ffn_hidden_size=None, seq_length=None, num_attention_heads=None,
                num_query_groups=1, group_query_attention=False, kv_channels=None, max_position_embeddings=None,
                position_embedding_type="learned_absolute", add_position_embedding=True,
                use_rotary_position_embeddings=False, rotary_base=10000, rotary_percent=1.0, rotary_interleaved=False,
                add_bias_linear=True, add_qkv_bias=False, swiglu=False, untie_embeddings_and_output_weights=False,
                normalization="LayerNorm", tokenizer_type=None, tokenizer_model=None, vocab_size=None,
                padded_vocab_size=None, transformer_impl="transformer_engine", no_persist_layer_norm=False,
                layernorm_epsilon=1e-5, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                virtual_pipeline_model_parallel_size=None, ckpt_format="torch_dist", bf16=False, fp16=False,
                use_rope_scaling=False, rope_scaling_factor=8.0, spec=None, bert_binary_head=True,
                bias_gelu_fusion=True, encoder_num_layers=None, relative_attention_num_buckets=32,
                relative_attention_max_distance=128)


class MegatronLM016:
    """The Megatron-LM 0.16.1 steps above, for one ``--load DST --use-checkpoint-args FLAGS`` command line."""

    def __init__(self, dst: Path, flags: list[str]):
        p = argparse.ArgumentParser()
        p.add_argument("--transformer-impl")
        p.add_argument("--no-persist-layer-norm", action="store_true")
        p.add_argument("--norm-epsilon", type=float, dest="layernorm_epsilon")
        p.add_argument("--vocab-size", type=int)
        p.add_argument("--tokenizer-type")
        p.add_argument("--tokenizer-model")
        p.add_argument("--no-use-tokenizer-model-from-checkpoint-args", action="store_false",
                       dest="use_tokenizer_model_from_checkpoint_args")
        p.add_argument("--use-mp-args-from-checkpoint-args", action="store_true")
        p.add_argument("--ckpt-format")
        p.add_argument("--use-legacy-models", action="store_true")
        p.add_argument("--use-rope-scaling", action="store_true")
        p.add_argument("--rope-scaling-factor", type=float)
        p.add_argument("--bf16", action="store_true")
        p.add_argument("--fp16", action="store_true")
        p.add_argument("--bert-no-binary-head", action="store_false", dest="bert_binary_head", default=None)
        p.add_argument("--no-bias-gelu-fusion", action="store_false", dest="bias_gelu_fusion", default=None)
        p.add_argument("--spec", nargs="*")
        p.add_argument("--relative-attention-num-buckets", type=int)
        p.add_argument("--relative-attention-max-distance", type=int)
        given = {k: v for k, v in vars(p.parse_args(flags)).items() if v is not None}
        self.args = argparse.Namespace(**{**DEFAULTS, "use_tokenizer_model_from_checkpoint_args": True, **given})
        self.ckpt_args = open_source(dst).args  # our restricted reader sees what torch.load would
        self._load_args_from_checkpoint()
        self._validate_args()

    def _set_arg(self, name: str, force: bool = False) -> None:
        if not force and getattr(self.args, name, None) is not None:
            return
        value = getattr(self.ckpt_args, name, None)
        if value is not None:
            setattr(self.args, name, value)

    def _load_args_from_checkpoint(self) -> None:
        for name, force in COPIED:
            self._set_arg(name, force)
        if self.args.use_tokenizer_model_from_checkpoint_args:
            self._set_arg("tokenizer_model", force=True)
            self._set_arg("tokenizer_type", force=True)
        self._set_arg("padded_vocab_size")
        if getattr(self.args, "use_mp_args_from_checkpoint_args", False):
            for name in MP_FIELDS:
                self._set_arg(name, force=True)

    def _validate_args(self) -> None:
        a = self.args
        if not a.add_bias_linear:
            a.bias_gelu_fusion = False
        assert a.add_position_embedding or a.position_embedding_type == "rope", \
            "validate_args: --no-position-embedding is deprecated, use --position-embedding-type"
        if a.position_embedding_type == "relative":
            assert a.transformer_impl == "transformer_engine", "validate_args: relative positions need TE"
        assert a.encoder_num_layers is None, "validate_args: cannot have both num-layers and encoder-num-layers"
        a.encoder_num_layers = a.num_layers

    def mlp(self) -> tuple[str, bool]:
        """core_transformer_config_from_args' activation and gating; Megatron-Core's MLP runs the *tanh* GELU
        when the bias is fused with it (bias_activation_fusion = bias_gelu_fusion, off without biases)."""
        a = self.args
        if a.swiglu:
            return "silu", True
        return ("gelu_tanh" if a.bias_gelu_fusion and a.add_bias_linear else "gelu"), False

    def bert_model(self) -> dict:
        """pretrain_bert.py's model_provider: the layer spec from ``spec``, token types from the binary head."""
        a = self.args
        assert a.spec == ["local"], "model_provider would use the Transformer-Engine BERT spec (ImportError)"
        return dict(add_binary_head=a.bert_binary_head, num_tokentypes=2 if a.bert_binary_head else 0,
                    mlp=self.mlp(), tied=not a.untie_embeddings_and_output_weights)

    def t5_model(self) -> dict:
        """pretrain_t5.py's model_provider (the TE block specs): both stacks from num_layers."""
        a = self.args
        return dict(encoder_num_layers=a.encoder_num_layers, num_layers=a.num_layers, mlp=self.mlp(),
                    kv_channels=a.kv_channels, normalization=a.normalization, add_bias_linear=a.add_bias_linear,
                    buckets=a.relative_attention_num_buckets, distance=a.relative_attention_max_distance,
                    tied=not a.untie_embeddings_and_output_weights)

    def tokenizer_size(self) -> int:
        a = self.args
        if a.tokenizer_type == "NullTokenizer":
            assert a.vocab_size is not None  # build_tokenizer
            return a.vocab_size + 1
        if a.tokenizer_type == "HuggingFaceTokenizer":
            from transformers import AutoTokenizer

            return len(AutoTokenizer.from_pretrained(a.tokenizer_model))  # offline: HF_HUB_OFFLINE=1 (fixture)
        raise AssertionError(f"pretrain_gpt.py would build {a.tokenizer_type} (needs vocab/merge files)")

    def transformer_config(self) -> dict:
        a = self.args
        assert a.transformer_impl == "local", "gpt_builders would pick the Transformer-Engine spec"
        persist = not a.no_persist_layer_norm
        assert not persist, "WrappedTorchNorm (local spec without apex) asserts not persist_layer_norm"
        return dict(num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
                    num_query_groups=a.num_query_groups if a.group_query_attention else a.num_attention_heads,
                    ffn_hidden_size=a.ffn_hidden_size, normalization=a.normalization,
                    layernorm_epsilon=a.layernorm_epsilon, add_bias_linear=a.add_bias_linear,
                    gated_linear_unit=a.swiglu, vocab=a.padded_vocab_size,
                    position_embedding_type=a.position_embedding_type, rotary_base=a.rotary_base,
                    tied=not a.untie_embeddings_and_output_weights)


def expected_config(cfg, padded: int) -> dict:
    """What Megatron-LM must build: our own ModelConfig of the checkpoint, in the same terms."""
    return dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                num_query_groups=cfg.num_query_groups, ffn_hidden_size=cfg.ffn_hidden_size,
                normalization=cfg.normalization, layernorm_epsilon=cfg.norm_epsilon,
                add_bias_linear=cfg.add_bias_linear, gated_linear_unit=cfg.gated_linear_unit, vocab=padded,
                position_embedding_type=cfg.position_embedding_type,
                rotary_base=cfg.rotary_base, tied=cfg.tie_word_embeddings)


def word_tokenizer(directory: Path, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"w{size - 1}").save_pretrained(directory)


def wordpiece_tokenizer(directory: Path, size: int) -> None:
    """A lower-casing BERT word-piece tokenizer of ``size`` tokens with BERT's five special tokens (what a
    ``MegatronBertForPreTraining`` source ships; Transformers 5 saves it as ``tokenizer.json``)."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(5, size)]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(directory)


def t5_tokenizer(directory: Path, size: int, sentinels: int = 10) -> None:
    """A T5 (Unigram) tokenizer of ``size`` tokens whose last ``sentinels`` are ``<extra_id_*>`` (the span-masking
    sentinels that Megatron-LM's T5 dataset reads as ``additional_special_tokens_ids``)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"w{i}", -float(i)) for i in range(3, size - sentinels)]
    T5Tokenizer(vocab=pieces, extra_ids=sentinels).save_pretrained(directory)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlm-args")
    out = {}
    for family in ("gpt2", "llama"):
        model = tiny_hf(family, seed=2)
        if family == "llama":
            model.config.rms_norm_eps = 1e-6  # not Megatron-LM's default: needs --norm-epsilon
        for tok in (True, False):
            d = root / f"{family}-{'tok' if tok else 'notok'}"
            model.save_pretrained(d)
            if tok:
                word_tokenizer(d, model.config.vocab_size)
            out[(family, tok)] = d
    return root, out


def megatron_builds(dst: Path, flags: list[str]):
    from interop.convert_megatron import megatron_config

    ckpt = open_source(dst)
    cfg = megatron_config(ckpt)
    mlm = MegatronLM016(dst, flags)
    assert mlm.transformer_config() == expected_config(cfg, ckpt.args.padded_vocab_size)
    assert mlm.tokenizer_size() == cfg.vocab_size  # the tokenizer covers exactly the true vocabulary
    return mlm, cfg


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tok", [True, False], ids=["tokenizer", "no-tokenizer"])
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_converted_checkpoint_loads_with_the_printed_flags(sources, tmp_path, family, tok, fmt):
    _, hf = sources
    dst = tmp_path / "meg"
    interop.convert(hf[(family, tok)], dst, tp=2, pp=2, format=fmt, progress=False)
    args = open_source(dst).args
    if tok:
        assert args.tokenizer_type == "HuggingFaceTokenizer" and os.path.isabs(args.tokenizer_model)
        assert Path(args.tokenizer_model) == (dst / "tokenizer").resolve()
    else:  # no tokenizer in the source: none is pointed at, and NullTokenizer gets the true size
        assert args.tokenizer_type == "NullTokenizer" and args.tokenizer_model is None
        assert args.vocab_size + 1 == args.true_vocab_size == 100
    flags = megatron_lm_flags(args)
    mlm, cfg = megatron_builds(dst, flags)
    if fmt == "torch":  # per-rank files: check_checkpoint_args compares TP/PP with the command line
        assert (mlm.args.tensor_model_parallel_size, mlm.args.pipeline_model_parallel_size) == (2, 2)
    assert ("--norm-epsilon" in flags) == (family == "llama")
    # without the printed flags Megatron-LM would build another model or no tokenizer
    with pytest.raises(AssertionError):
        megatron_builds(dst, [])


def test_cli_inspect_prints_the_flags(sources, tmp_path):
    from click.testing import CliRunner

    from interop import cli as cli_module

    _, hf = sources
    dst = tmp_path / "meg"
    interop.convert(hf[("llama", False)], dst, tp=1, pp=2, format="torch_dist", progress=False)
    r = CliRunner().invoke(cli_module.cli, ["inspect", str(dst), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["megatron_lm_flags"] == ("--use-checkpoint-args --transformer-impl local --no-persist-layer-norm "
                                         "--norm-epsilon 1e-06 --vocab-size 99")
    assert info["vocab_size"] == {"true": 100, "padded": 128, "source": "args.true_vocab_size (interop)"}


def test_moved_checkpoint_says_what_to_pass(sources, tmp_path):
    _, hf = sources
    first = tmp_path / "first"
    interop.convert(hf[("gpt2", True)], first, tp=2, pp=1, format="torch_dist", progress=False)
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    args = open_source(moved).args
    assert moved_tokenizer_hint(args, moved) is not None
    hint = moved_tokenizer_hint(args, moved).split()
    mlm = MegatronLM016(moved, megatron_lm_flags(args) + hint)
    assert Path(mlm.args.tokenizer_model) == (moved / "tokenizer").resolve()
    assert mlm.tokenizer_size() == 100
    stale = MegatronLM016(moved, megatron_lm_flags(args) + hint[1:])  # forgetting --no-use-tokenizer-model...
    assert stale.args.tokenizer_model == str((first / "tokenizer").resolve())  # the checkpoint's wins (forced)


def test_reshape_writes_loadable_args(sources, tmp_path):
    _, hf = sources
    src = tmp_path / "src"
    interop.convert(hf[("llama", True)], src, tp=2, pp=2, format="torch_dist", progress=False)
    dst = tmp_path / "reshaped"
    interop.reshape(src, dst, tp=1, pp=2, format="torch", progress=False)
    args = open_source(dst).args
    assert Path(args.tokenizer_model) == (dst / "tokenizer").resolve()  # points at ITS copy, not the source's
    mlm, _ = megatron_builds(dst, megatron_lm_flags(args))
    assert (mlm.args.tensor_model_parallel_size, mlm.args.pipeline_model_parallel_size) == (1, 2)


def test_trainer_args_use_the_same_convention(sources, tmp_path):
    """trainer.checkpoint.megatron_args goes through interop.megatron_args like convert and reshape."""
    import types

    from formats.layout import Layout
    from interop.families.base import family_for_hf
    from trainer.checkpoint import megatron_args
    from trainer.config import TrainConfig

    _, hf = sources
    model_cfg = family_for_hf(json.loads((hf[("gpt2", True)] / "config.json").read_text())).config_from_hf(
        json.loads((hf[("gpt2", True)] / "config.json").read_text()))
    built = types.SimpleNamespace(padded_vocab_size=128, model_config=model_cfg,
                                  config=types.SimpleNamespace(params_dtype=torch.float32),
                                  side_files=sorted((hf[("gpt2", True)]).glob("tokenizer*.json")))
    cfg = TrainConfig.from_dict({"save": str(tmp_path / "run")})
    args = megatron_args(cfg, built, Layout(tp=1, pp=1), iteration=3, consumed=0)
    assert args.tokenizer_type == "HuggingFaceTokenizer"
    assert args.tokenizer_model == str((tmp_path / "run" / "tokenizer").resolve())
    assert args.transformer_impl == "local" and args.no_persist_layer_norm is True
    built.side_files = []
    args = megatron_args(cfg, built, Layout(tp=1, pp=1), iteration=3, consumed=0)
    assert args.tokenizer_type == "NullTokenizer" and args.vocab_size == model_cfg.vocab_size - 1


@pytest.mark.parametrize("binary", [True, False], ids=["binary-head", "no-binary-head"])
@pytest.mark.parametrize("tok", [True, False], ids=["tokenizer", "no-tokenizer"])
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_converted_bert_builds_in_pretrain_bert(tmp_path, binary, tok, fmt):
    """pretrain_bert.py: the local spec from the recorded ``spec``, the binary head and the erf GELU from the
    printed flags, the token types from the binary head (a MaskedLM's table is a stated limit)."""
    from interop.megatron_args import megatron_lm_limits
    from tests.bert_tiny import tiny_bert

    hf = tmp_path / "hf"
    tiny_bert(binary_head=binary, seed=1).save_pretrained(hf)
    if tok:
        wordpiece_tokenizer(hf, 100)
    dst = tmp_path / "meg"
    interop.convert(hf, dst, tp=2, pp=1, format=fmt, progress=False)
    args = open_source(dst).args
    assert args.spec == ["local"] and args.bert_binary_head is binary
    flags = megatron_lm_flags(args)
    assert "--transformer-impl" not in flags or args.transformer_impl == "local"
    mlm = MegatronLM016(dst, flags)
    from interop.convert_megatron import megatron_config

    cfg = megatron_config(open_source(dst))
    built = mlm.bert_model()
    assert (built["add_binary_head"], built["mlp"], built["tied"]) == (binary, ("gelu", False), True)
    assert mlm.tokenizer_size() == 100
    limits = megatron_lm_limits(args)
    assert (built["num_tokentypes"] == cfg.num_tokentypes) == (not limits), limits
    assert bool(limits) == (not binary)  # Transformers' MegatronBertForMaskedLM always has 2 token types
    if not binary and fmt == "torch_dist":
        from click.testing import CliRunner

        from interop import cli as cli_module

        r = CliRunner().invoke(cli_module.cli, ["inspect", str(dst), "--json"])
        assert r.exit_code == 0, r.output
        info = json.loads(r.output)
        assert info["megatron_lm_cannot"] == limits
        assert "--bert-no-binary-head" in info["megatron_lm_flags"].split()
    # without the flags: the binary head on, the fused tanh GELU
    bare = MegatronLM016(dst, []).bert_model()
    assert (bare["add_binary_head"], bare["mlp"]) == (True, ("gelu_tanh", False))


def test_gpt_args_record_no_spec(sources, tmp_path):
    """gpt_builder imports any ``spec`` as a module path: only BERT records one."""
    _, hf = sources
    dst = tmp_path / "meg"
    interop.convert(hf[("gpt2", False)], dst, tp=1, pp=1, format="torch_dist", progress=False)
    assert getattr(open_source(dst).args, "spec", None) is None


@pytest.mark.parametrize("version, decoder_layers", [("1.0", 2), ("1.1", 3)])
def test_converted_t5_args_in_pretrain_t5(tmp_path, version, decoder_layers):
    """pretrain_t5.py: relative positions need Transformer Engine (no ``--transformer-impl local``), the bucket
    settings travel as flags, both stacks get ``num_layers``; what it cannot express is listed."""
    from interop.megatron_args import megatron_lm_limits
    from tests.t5_helpers import tiny_t5

    hf = tmp_path / "hf"
    tiny_t5(version, decoder_layers=decoder_layers).save_pretrained(hf)
    t5_tokenizer(hf, 100)
    dst = tmp_path / "meg"
    interop.convert(hf, dst, tp=2, pp=1, format="torch_dist", progress=False)
    args = open_source(dst).args
    flags = megatron_lm_flags(args)
    assert "--transformer-impl" not in flags
    assert flags[flags.index("--relative-attention-num-buckets") + 1] == "8"
    assert flags[flags.index("--relative-attention-max-distance") + 1] == "12"
    mlm = MegatronLM016(dst, flags)
    built = mlm.t5_model()
    assert (built["buckets"], built["distance"], built["kv_channels"]) == (8, 12, 16)
    assert (built["normalization"], built["add_bias_linear"], built["tied"]) == ("RMSNorm", False, version == "1.0")
    assert built["encoder_num_layers"] == built["num_layers"] == decoder_layers
    assert mlm.tokenizer_size() == 100
    limits = megatron_lm_limits(args)
    assert any("MLP (relu)" in w for w in limits) == (version == "1.0")
    assert any("MLP (gated gelu_tanh)" in w for w in limits) == (version == "1.1")
    assert any("num_layers=3" in w for w in limits) == (decoder_layers == 3)
    with pytest.raises(AssertionError, match="relative positions need TE"):
        MegatronLM016(dst, flags + ["--transformer-impl", "local"])
