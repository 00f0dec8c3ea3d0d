"""Demo stage "convert": a small random Llama-style HF model for the demo tokenizer, converted to Megatron
TP2xPP2 torch_dist and back to HF, both with ``--verify`` (Transformers vs Megatron-Core logits)."""
from __future__ import annotations


def build_hf_init(tokenizer_dir: str, out: str) -> None:
    """Random Llama-style model (hidden 128, 4 layers, 4 heads / 2 KV groups) saved with its tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"random Llama-style model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"vocab {len(tok)}", flush=True)


def run(ctx) -> None:
    hf_init = ctx.path("hf-init")
    build_hf_init(ctx.artifacts["tokenizer"], hf_init)
    megatron_init = ctx.path("megatron-init")
    ctx.interop("convert", hf_init, megatron_init, "--tp", "2", "--pp", "2", "--format", "torch_dist",
                "--verify", "--force")
    ctx.interop("convert", megatron_init, ctx.path("hf-roundtrip"), "--verify", "--force")
    ctx.interop("inspect", megatron_init, check=False)
    ctx.artifacts.update(hf_init=hf_init, megatron_init=megatron_init)
