"""Tiny random Transformers T5 models and the rank functions of the T5 tests (module-level: ranks import it)."""
from __future__ import annotations

import torch

VOCAB = 100
PAD, EOS = 0, 1
# uneven encoder inputs (no PAD/EOS inside) and decoder inputs starting with the start token (= PAD)
INPUTS = [[5, 17, 33, 2, 9, 41, 12, 70, 8], [7, 3, 44], [60, 22, 8, 14, 90, 31], [11]]
DECODER_INPUTS = [[0, 9, 14, 3, 77], [0, 21], [0, 5, 6, 8], [0, 40, 41]]


def tiny_t5(version: str = "1.0", seed: int = 0, decoder_layers: int = 3):
    """A tiny random T5: ``1.0`` (ReLU, tied, output scaling), ``1.1`` (gated tanh GELU, untied head, no
    scaling) or ``mt5``. ``decoder_layers`` other than the encoder's 2 breaks Transformers 5.24's ``generate``
    (its cache is sized by the encoder depth: IndexError), so the generation tests use 2. Norm weights and the
    relative-bias tables are perturbed away from their init so that a dropped final norm, a wrong bucket or a
    wrong head split changes the logits; the start token's (PAD) embedding is shrunk so that it does not
    dominate the tied outputs (else every greedy token is PAD)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=decoder_layers,
                  num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                  dropout_rate=0.0, initializer_factor=2.0, pad_token_id=PAD, eos_token_id=EOS,
                  decoder_start_token_id=PAD)
    if version == "1.0":
        cfg, cls = transformers.T5Config(feed_forward_proj="relu", **common), transformers.T5ForConditionalGeneration
    elif version == "1.1":
        cfg = transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **common)
        cls = transformers.T5ForConditionalGeneration
    else:
        cfg = transformers.MT5Config(feed_forward_proj="gated-gelu", **common)
        cls = transformers.MT5ForConditionalGeneration
    model = cls(cfg)
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "shared" in name:
                p[PAD] *= 0.3
            elif "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
        if version != "1.0":  # an untied head of its own (Transformers 5 ties T5's lm_head in memory)
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 64) * 0.5)
    return model.eval()


def hf_state(model) -> dict[str, torch.Tensor]:
    """The tensors a save would write (the head only when it is its own tensor)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "embed_tokens" not in k}
    if model.lm_head.weight is model.shared.weight:
        state.pop("lm_head.weight", None)
    return state


def pad_batch(rows, side: str = "right"):
    """[B, S] ids and 0/1 mask for uneven rows, padded on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def hf_logits(model, enc_side="right"):
    ids, mask = pad_batch(INPUTS, enc_side)
    dec, dec_mask = pad_batch(DECODER_INPUTS, "right")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                     decoder_attention_mask=dec_mask).logits


def megatron_t5(version: str, seed: int = 0, decoder_layers: int = 3):
    """Inside an initialised runtime: the Megatron-Core T5Model (our spec) with the HF weights loaded."""
    from interop.t5.config import T5Config
    from interop.t5.spec import build_t5_model
    from interop.t5.tensor_map import hf_to_megatron, load_into_model

    hf = tiny_t5(version, seed, decoder_layers)
    cfg = T5Config.from_hf(hf.config, untied_lm_head=version != "1.0")
    model = build_t5_model(cfg).eval()
    load_into_model(model, hf_to_megatron(hf_state(hf), cfg), cfg)
    return hf, cfg, model


def megatron_logits(model, cfg, enc_side="right"):
    from interop.t5.forward import t5_logits

    ids, mask = pad_batch(INPUTS, enc_side)
    dec, dec_mask = pad_batch(DECODER_INPUTS, "right")
    return t5_logits(model, cfg, ids, mask, dec, dec_mask)


def rank_logits(tp: int, versions=("1.0", "1.1")):
    """Per version: Megatron logits per encoder padding side, the weights read back out of the model (as HF
    tensors), and the model's parameter and dist-checkpoint key names."""
    from interop.runtime import RuntimeConfig, distributed
    from interop.t5.tensor_map import megatron_to_hf, read_from_model
    from formats.layout import Layout

    out = {}
    with distributed(RuntimeConfig(layout=Layout(tp=tp))):
        for version in versions:
            hf, cfg, model = megatron_t5(version)
            logits = {side: megatron_logits(model, cfg, side) for side in ("right", "left")}
            names = (sorted(n for n, _ in model.named_parameters()),
                     sorted({getattr(v, "key", k) for k, v in model.sharded_state_dict().items()}))
            out[version] = (logits, megatron_to_hf(read_from_model(model, cfg), cfg), names)
    return out


# ------------------------------------------------------------------------------------------- generation

NEW = 10
GEN_DECODER_LAYERS = 2
#: an end token each random model produces after a few steps for some inputs and not for others
GEN_EOS = {"1.0": 12, "1.1": 83}
GEN_INPUTS = [[5, 17, 33, 2, 9, 41, 12, 70, 8], [7, 3, 44], [60, 22, 8, 14, 90, 31], [11], [3, 3, 95, 4]]


def hf_generate(model, eos: int, side: str = "right", **kwargs) -> list[list[int]]:
    """Transformers' own generate; decoder start token dropped, each sequence cut after its first EOS."""
    ids, mask = pad_batch(GEN_INPUTS, side)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=eos, pad_token_id=PAD,
                             decoder_start_token_id=PAD, max_new_tokens=NEW, **kwargs)
    seqs = []
    for row in out[:, 1:].tolist():
        seqs.append(row[: row.index(eos) + 1] if eos in row else row)
    return seqs


def rank_generate(tp: int, version: str, configs: list[tuple[str, dict]]) -> list[list[list[int]]]:
    """Our generate_seq2seq for each (padding side, ``GenerationConfig`` kwargs with ``sampling`` a dict)."""
    from interop.runtime import RuntimeConfig, distributed
    from formats.layout import Layout
    from trainer.generate import GenerationConfig
    from trainer.generate_sampling import SamplingParams
    from trainer.generate_seq2seq import generate_seq2seq

    with distributed(RuntimeConfig(layout=Layout(tp=tp))):
        _, cfg, model = megatron_t5(version, decoder_layers=GEN_DECODER_LAYERS)
        results = []
        for side, kwargs in configs:
            ids, mask = pad_batch(GEN_INPUTS, side)
            kwargs = dict(kwargs)
            sampling = SamplingParams(**kwargs.pop("sampling", {}))
            config = GenerationConfig(eos_token_ids=(GEN_EOS[version],), sampling=sampling, **kwargs)
            results.append(generate_seq2seq(model, ids, mask, config=config, vocab_size=cfg.vocab_size,
                                            decoder_start_token_id=PAD).tokens)
    return results
