"""The trainer's SDPA core attention against Megatron-Core's own unfused ``DotProductAttention`` (the oracle):
same outputs and input gradients for causal self-attention (MHA, GQA and MQA, with query-key layer scaling),
an explicit Megatron-style mask, and a query block at the end of a longer key sequence; and a model built with
each backend trains the same loss curve (tests/test_trainer_parallel.py runs every layout on the SDPA default)."""
import pytest
import torch

from interop.launch import run_on_ranks


def _pair(heads: int, groups: int, layer_scaling: bool = False, bf16: bool = False, dropout: float = 0.0):
    """(SDPAttention, DotProductAttention) for one layer of a tiny config."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from trainer.attention import SDPAttention

    config = TransformerConfig(num_layers=4, hidden_size=16 * heads, num_attention_heads=heads, num_query_groups=groups,
                               use_cpu_initialization=True, attention_dropout=dropout, hidden_dropout=0.0,
                               masked_softmax_fusion=False, apply_query_key_layer_scaling=layer_scaling,
                               attention_softmax_in_fp32=True, bf16=bf16)
    args = dict(config=config, layer_number=3, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return SDPAttention(**args), DotProductAttention(**args)


def _compare(heads, groups, sq, sk, layer_scaling, with_mask, dtype=torch.float32):
    """Outputs and input gradients of both modules on the same inputs (on the GPU when there is one)."""
    from interop.runtime import RuntimeConfig, distributed

    out = {}
    with distributed(RuntimeConfig(seed=5)) as rt:
        device = rt.device
        ours, oracle = _pair(heads, groups, layer_scaling, bf16=dtype == torch.bfloat16)
        gen = torch.Generator().manual_seed(heads * 100 + groups * 10 + sq)
        b, d = 3, 16
        q, k, v = (torch.randn(s, b, n, d, generator=gen).to(device, dtype)
                   for s, n in ((sq, heads), (sk, groups), (sk, groups)))
        mask = None
        if with_mask:  # Megatron convention: True = masked; causal + the first key slots of row 1 padded
            mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq).logical_not()[None, None].repeat(b, 1, 1, 1)
            mask = mask.to(device)
            mask[1, :, :, :2] = True
            mask[1, :, :, -1] = False  # every query row keeps a key
        elif sq != sk:  # the oracle needs the explicit bottom-right causal mask; ours derives it
            oracle_mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq).logical_not()[None, None].to(device)
        for name, module in (("ours", ours), ("oracle", oracle)):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            given = mask if (with_mask or name == "ours" or sq == sk) else oracle_mask
            y = module(qq, kk, vv, given)
            (y.float() * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
            out[name] = tuple(t.detach().float().cpu() for t in (y, qq.grad, kk.grad, vv.grad))
    return out


@pytest.mark.parametrize("heads,groups,sq,sk,layer_scaling,with_mask", [
    (4, 4, 12, 12, False, False),   # MHA, training shape
    (4, 2, 12, 12, True, False),    # GQA, query-key layer scaling
    (4, 1, 12, 12, False, True),    # MQA, explicit padding mask
    (4, 2, 3, 12, False, False),    # a query block at the end of the keys (bottom-right causal)
], ids=["mha", "gqa-layer-scaling", "mqa-mask", "suffix-queries"])
def test_sdpa_attention_matches_megatron_dot_product_attention(heads, groups, sq, sk, layer_scaling, with_mask):
    out = run_on_ranks(_compare, 1, heads, groups, sq, sk, layer_scaling, with_mask, timeout_s=120)[0]
    ours, oracle = out["ours"], out["oracle"]
    assert ours[0].shape == oracle[0].shape == (sq, 3, heads * 16)
    assert oracle[0].abs().max() > 0.1  # not vacuous
    for a, b in zip(ours, oracle):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layer_spec_picks_the_core_attention():
    from trainer.attention import SDPAttention
    from trainer.spec import layer_spec

    with pytest.raises(ValueError, match="attention backend"):
        layer_spec("LayerNorm", "flash9")
    assert layer_spec("LayerNorm", "sdpa").submodules.self_attention.submodules.core_attention is SDPAttention
    local = layer_spec("LayerNorm", "local").submodules.self_attention.submodules.core_attention
    assert local.__name__ == "DotProductAttention"


def test_config_rejects_unknown_attention_backend():
    from trainer.config import TrainConfig
    from trainer.errors import TrainConfigError

    with pytest.raises(TrainConfigError, match="attention_backend"):
        TrainConfig(attention_backend="flash9", synthetic_data=True).validate(world_size=1)
