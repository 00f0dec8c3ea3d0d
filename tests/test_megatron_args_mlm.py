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
from interop.megatron_args import megatron_lm_flags
from tests.test_convert_megatron_model import tiny_hf
from tests.test_megatron_args import word_tokenizer

MLM = os.environ.get("MEGATRON_LM_DIR")
pytestmark = pytest.mark.skipif(not MLM, reason="set MEGATRON_LM_DIR to a Megatron-LM core_v0.16.1 checkout")


def probe(tmp_path: Path, dst: Path, hf: Path, world: int, extra: list[str]) -> dict:
    from transformers import AutoModelForCausalLM

    from tests.megatron_lm_probe import launch

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"tokens": tokens, "logits": model(tokens).logits}, tmp_path / "hf.pt")
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join([MLM, root, os.environ.get("PYTHONPATH", "")])
    flags = megatron_lm_flags(open_source(dst).args) + extra  # exactly what `interop inspect` prints
    return launch(str(tmp_path / "report.json"), str(dst), str(tmp_path / "hf.pt"), world, flags)


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
    report = probe(tmp_path, dst, hf, world, extra)
    assert "error" not in report, report["error"]
    assert report["tokenizer"] == ("_HuggingFaceTokenizer" if tok else "_NullTokenizer")
    assert report["tokenizer_vocab_size"] == 100
    assert report["max_abs_diff"] <= 1e-5, report
