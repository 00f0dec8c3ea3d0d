"""Tiny Hugging Face models and reference loops for the generation tests (module-level: ranks import it)."""
from __future__ import annotations

import torch


def ranks_or_fail(fn, n: int, *args):
    """``run_on_ranks(fn, n, *args)``; a rank's failure fails the test with the child's traceback."""
    import pytest

    from interop.launch import run_on_ranks

    try:
        return run_on_ranks(fn, n, *args)
    except Exception as exc:
        pytest.fail(f"{exc}\n{getattr(exc, 'details', '')}")


PROMPTS = [[5, 17, 33, 2, 9, 41, 12], [7, 3], [60, 22, 8, 14], [11]]
EOS = {"gpt2": 78, "llama": 6}
PAD = 0


def tiny_hf(family: str = "gpt2", seed: int = 0, vocab: int = 96):
    """A random tiny causal LM whose next-token distributions are peaked (no near-ties between beams)."""
    import transformers

    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.25,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=EOS[family], pad_token_id=PAD,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.25, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=EOS[family], pad_token_id=PAD,
        )
        model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    return model.eval()


def hf_left_pad(prompts):
    from trainer.generate import left_pad

    return left_pad(prompts, PAD)


def hf_generate(model, prompts, **kwargs) -> list[list[int]]:
    """Transformers' own generate on left-padded prompts; generated tokens cut after the first EOS."""
    eos = model.config.eos_token_id
    ids, mask = hf_left_pad(prompts)
    num_return = kwargs.get("num_return_sequences", 1)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, do_sample=False, eos_token_id=eos, pad_token_id=PAD, **kwargs
        )
    result = []
    for row in out[:, ids.size(1):].tolist():
        result.append(row[: row.index(eos) + 1] if eos in row else row)
    assert len(result) == len(prompts) * num_return
    return result


def megatron_from_hf(hf_model):
    """The same weights as a Megatron-Core GPTModel on this rank, through the project's converter API."""
    from interop.convert_stream import hf_to_canonical
    from interop.families.base import family_for_hf
    from interop.megatron_model import build_gpt_model, load_canonical

    hf_config = hf_model.config.to_dict()
    family = family_for_hf(hf_config)
    cfg = family.config_from_hf(hf_config)
    state = hf_model.state_dict()
    model = build_gpt_model(cfg)
    load_canonical(model, hf_to_canonical(family, cfg, state.__getitem__), cfg)
    return model.eval(), cfg


def rank_generate(family: str, tp: int, pp: int, prompts, configs: list[dict]):
    """On each rank: build the tiny HF model, load it into Megatron-Core at TP x PP, run ``generate`` once per
    config dict (GenerationConfig fields; ``sampling`` as a dict). Returns the outputs' token lists."""
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from trainer.generate import GenerationConfig, generate
    from trainer.generate_sampling import SamplingParams

    hf_model = tiny_hf(family)
    eos = hf_model.config.eos_token_id
    results = []
    with distributed(RuntimeConfig(layout=Layout(tp=tp, pp=pp))):
        model, cfg = megatron_from_hf(hf_model)
        ids, mask = hf_left_pad(prompts)
        for kwargs in configs:
            kwargs = dict(kwargs)
            sampling = SamplingParams(**kwargs.pop("sampling", {}))
            config = GenerationConfig(eos_token_ids=(eos,), sampling=sampling, **kwargs)
            out = generate(model, ids, mask, config=config, vocab_size=cfg.vocab_size)
            results.append(out.tokens)
    return results


def rank_generate_logits(family: str, prompts, max_new_tokens: int):
    """Greedy tokens plus the generated steps' full-vocab logits (last stage)."""
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from trainer.generate import GenerationConfig, generate

    hf_model = tiny_hf(family)
    with distributed(RuntimeConfig(layout=Layout())):
        model, cfg = megatron_from_hf(hf_model)
        ids, mask = hf_left_pad(prompts)
        config = GenerationConfig(max_new_tokens=max_new_tokens, return_logits=True, return_logprobs=True,
                                  return_prompt_logits=True)
        out = generate(model, ids, mask, config=config, vocab_size=cfg.vocab_size)
    return out.tokens, out.logits, out.logprobs, out.prompt_logits


def rank_gather_dp(rows_per_rank: list[int]):
    """Each data-parallel rank contributes ``rows_per_rank[rank]`` rows filled with its rank."""
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from trainer.generate import gather_across_data_parallel

    with distributed(RuntimeConfig(layout=Layout())) as rt:
        mine = torch.full((rows_per_rank[rt.rank], 3), float(rt.rank))
        return gather_across_data_parallel(mine)
