"""Tiny StarCoder (``gpt_bigcode``) and BLOOM models for the family tests: Transformers' own classes with
perturbed norms and biases (so a wrong GELU, a dropped bias or a misplaced norm shows at 1e-5), fixed tokens,
and the producers' logits on them."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 100  # not a multiple of 128: vocabulary padding is exercised at every TP
LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2)]
FORMATS = ["torch", "torch_dist"]


def _perturb(model, mlp_biases) -> None:
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
        for b in mlp_biases:  # pre-activations where erf and tanh GELU differ most
            b.add_(1.5)


def tiny_starcoder(multi_query: bool = True, act: str = "gelu_pytorch_tanh", seed: int = 0, layers: int = 2):
    import transformers

    torch.manual_seed(seed)
    conf = transformers.GPTBigCodeConfig(
        vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=layers, n_head=4, n_inner=96, multi_query=multi_query,
        activation_function=act, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1,
    )
    model = transformers.GPTBigCodeForCausalLM(conf)
    _perturb(model, [blk.mlp.c_fc.bias for blk in model.transformer.h])
    return model.eval()


def tiny_bloom(seed: int = 0, layers: int = 2, heads: int = 6):
    """6 heads (hidden 48): not a power of two, so ALiBi's interleaved extra slopes are exercised."""
    import transformers

    torch.manual_seed(seed)
    conf = transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=8 * heads, n_layer=layers, n_head=heads, hidden_dropout=0.0,
        attention_dropout=0.0, initializer_range=0.1, layer_norm_epsilon=1e-5,
    )
    model = transformers.BloomForCausalLM(conf)
    _perturb(model, [blk.mlp.dense_h_to_4h.bias for blk in model.transformer.h])
    return model.eval()


def tokens(n: int = 2, seq: int = 12, seed: int = 5) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, toks: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(toks).logits.float()


def hf_dir_logits(path: Path, toks: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return hf_logits(model, toks)


def hf_config(path: Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def assert_close(got: torch.Tensor, expected: torch.Tensor, msg: str = "", atol: float = 1e-5) -> None:
    torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=msg)
