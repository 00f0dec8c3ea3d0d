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


# ---- training and generation


def peaked(family: str, bloom_hidden: int = 48):
    """A tiny model of ``family`` with peaked next-token distributions (no near-ties between beams), perturbed
    norms and biases (a dropped bias, a wrong GELU or a misplaced norm changes tokens), EOS 78 and PAD 0, eager
    attention (Transformers' reference maths). BLOOM has 6 heads of ``bloom_hidden / 6``."""
    import transformers

    torch.manual_seed(0)
    ids = dict(bos_token_id=1, eos_token_id=78, pad_token_id=0)
    if family == "starcoder":
        model = transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(
            vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4, multi_query=True, initializer_range=0.25,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids))
    else:
        # a random BLOOM repeats one token at smaller scales (its ALiBi favours the last keys)
        model = transformers.BloomForCausalLM(transformers.BloomConfig(
            vocab_size=96, hidden_size=bloom_hidden, n_layer=2, n_head=6, initializer_range=1.0, hidden_dropout=0.0,
            attention_dropout=0.0, **ids))
    mlp_in = [blk.mlp.c_fc if family == "starcoder" else blk.mlp.dense_h_to_4h for blk in model.transformer.h]
    _perturb(model, [linear.bias for linear in mlp_in])
    model.config._attn_implementation = "eager"
    return model.eval()


def rank_generate(family: str, prompts, configs: list[dict], engines=("auto",)):
    """At TP1: the peaked model of ``family`` loaded into Megatron-Core through the converter, ``generate`` once
    per config dict (GenerationConfig fields) and engine; ``{engine: [tokens per config]}``, plus under
    ``"fast_used"`` whether ``engine="auto"`` ran the fast decode engine (its engine exists for the model)."""
    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed
    from tests.generate_helpers import hf_left_pad, megatron_from_hf
    from trainer import generate_fast
    from trainer.generate import GenerationConfig, generate

    hf_model = peaked(family)
    results = {}
    with distributed(RuntimeConfig(layout=Layout())):
        model, cfg = megatron_from_hf(hf_model)
        ids, mask = hf_left_pad(prompts)
        for engine in engines:
            results[engine] = []
            for kwargs in configs:
                config = GenerationConfig(eos_token_ids=(hf_model.config.eos_token_id,), **kwargs)
                out = generate(model, ids, mask, config=config, vocab_size=cfg.vocab_size, engine=engine)
                results[engine].append(out.logits if kwargs.get("return_logits") else out.tokens)
            if engine == "auto":
                results["fast_used"] = generate_fast.release(model)
    return results


def assert_step_logits_equal_transformers(hf_model, prompts, tokens, logits, atol: float = 1e-4) -> None:
    """Our greedy per-step logits ``[B, new, V]`` equal those of Transformers' own ``generate`` (which carries
    its cache and ALiBi positions its way) at every step each row really generated (up to its EOS)."""
    from tests.generate_helpers import PAD, hf_left_pad

    ids, mask = hf_left_pad(prompts)
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=hf_model.config.eos_token_id,
                                pad_token_id=PAD, max_new_tokens=logits.size(1), output_logits=True,
                                return_dict_in_generate=True)
    theirs = torch.stack(out.logits, dim=1).float()  # [B, new, V]
    for row, generated in enumerate(tokens):
        steps = len(generated)
        torch.testing.assert_close(logits[row, :steps, : theirs.size(-1)], theirs[row, :steps], atol=atol, rtol=0,
                                   msg=f"row {row}")


def train_losses(cfg):
    from trainer.run import rank_main

    return rank_main(cfg).losses


def transformers_first_loss(model, cfg) -> float:
    """Transformers' loss of ``model`` on the trainer's first global batch of synthetic samples under ``cfg``."""
    from trainer.data import SyntheticSamples

    samples = SyntheticSamples(cfg, model.config.vocab_size, cfg.seed)
    n = cfg.global_batch_size
    text = torch.stack([torch.cat([samples[i]["tokens"], samples[i]["labels"][-1:]]) for i in range(n)])
    with torch.no_grad():
        return model(input_ids=text, labels=text).loss.item()


def first_step_check(tmp_path, model, tps=(1, 2)) -> dict[int, list[float]]:
    """The trainer's losses from ``model``'s HF checkpoint at each TP; asserts the first equals Transformers'
    loss on the same batch and that the model trained."""
    import pytest

    from interop.launch import run_on_ranks
    from trainer.config import TrainConfig

    path = str(tmp_path / "hf")
    model.save_pretrained(path)
    out = {}
    for tp in tps:
        cfg = TrainConfig(model=path, tp_degree=tp, seq_length=16, micro_batch_size=2, global_batch_size=4,
                          synthetic_data=True, train_iters=3, lr=1e-3, progress=False, seed=3, plot=False)
        out[tp] = run_on_ranks(train_losses, tp, cfg, timeout_s=300)[0]
    expected = transformers_first_loss(model, cfg)
    for tp, losses in out.items():
        assert losses[0] == pytest.approx(expected, rel=1e-5, abs=1e-5), tp
        assert losses[1] != pytest.approx(losses[0], abs=1e-6)  # it trained
    return out


# ---- conversions shared by the StarCoder and BLOOM modules


def convert_everywhere(root: Path, model) -> dict[tuple, Path]:
    """``model`` saved as HF under ``root/hf`` and converted to every format x layout, plus two reshapes
    (torch_dist TP2 PP2 -> torch TP1, torch TP1 -> TP2): ``{(format, tp, pp): path}``."""
    import interop

    model.save_pretrained(root / "hf")
    megs = {}
    for fmt in FORMATS:
        for tp, pp in LAYOUTS:
            megs[(fmt, tp, pp)] = root / f"{fmt}-tp{tp}pp{pp}"
            interop.convert(root / "hf", megs[(fmt, tp, pp)], tp=tp, pp=pp, format=fmt, progress=False)
    interop.reshape(megs[("torch_dist", 2, 2)], root / "reshaped-tp1", tp=1, pp=1, format="torch", progress=False)
    interop.reshape(megs[("torch", 1, 1)], root / "reshaped-tp2", tp=2, pp=1, format="torch", progress=False)
    megs[("reshaped", 1, 1)] = root / "reshaped-tp1"
    megs[("reshaped", 2, 1)] = root / "reshaped-tp2"
    return megs


def back_to_hf(root: Path, toks, expected, megs: dict[tuple, Path]):
    """Each Megatron checkpoint (at its recorded layout) converted back to HF gives Transformers' logits; yields
    ``(conversion result, HF config)`` per checkpoint for family-specific checks."""
    import interop
    from formats.checkpoint import open_checkpoint

    for (fmt, tp, pp), meg in megs.items():
        ck = open_checkpoint(meg)
        assert (ck.layout.tp, ck.layout.pp) == (tp, pp), (fmt, tp, pp)
        back = root / f"back-{meg.name}"
        result = interop.convert(meg, back, progress=False)
        assert_close(hf_dir_logits(back, toks), expected, msg=f"{fmt} TP{tp}PP{pp} -> HF")
        yield result, hf_config(back)


def megatron_core_agrees(megs: dict[tuple, Path], toks, expected) -> None:
    """One 4-rank run: Megatron-Core's own model at each checkpoint's layout, loaded by Megatron-Core's loaders
    (``load_state_dict(strict=True)``, ``dist_checkpointing.load``), gives Transformers' logits."""
    from interop.launch import run_on_ranks
    from tests import bert_ranks

    entries = [(str(p), tp, pp, None) for (fmt, tp, pp), p in megs.items()]
    results = run_on_ranks(bert_ranks.outputs_at_layouts, 4, entries, [{"tokens": toks}], timeout_s=900)[0]
    for (fmt, tp, pp), path in megs.items():
        assert_close(results[str(path)][0]["logits"], expected, msg=f"Megatron-Core {fmt} TP{tp}PP{pp}")
