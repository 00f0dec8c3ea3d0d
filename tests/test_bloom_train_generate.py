"""BLOOM (ALiBi, 6 heads) with ``interop train``: the first-step loss from the HF checkpoint equals
Transformers' loss at TP1 and TP2 (each rank its heads' slopes), and TP2 reproduces TP1's loss curve; greedy and
beam generation through the fast decode engine (ALiBi in prefill and cached decode) equal Transformers'."""
from __future__ import annotations

import pytest

from tests.alibi_mqa_tiny import first_step_check, tiny_bloom


def test_first_step_loss_equals_transformers_and_tp2_reproduces_tp1(tmp_path):
    losses = first_step_check(tmp_path, tiny_bloom())
    assert losses[2] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)


NEW = 12
BEAM = dict(max_new_tokens=NEW, num_beams=4, length_penalty=1.5, early_stopping=False, num_return_sequences=2)


def test_greedy_and_beam_equal_transformers_on_the_fast_engine():
    """Left-padded prompts of uneven length: ALiBi's slot distances ignore the padding, as Transformers'
    cumulative positions do; prefill and cached decode. Every greedy step's logits equal Transformers' too (1e-4).
    ``engine="auto"`` must pick the fast engine (checked), and Megatron-Core's own path (the trainer's ALiBi core
    attention) gives the same tokens."""
    from tests.alibi_mqa_tiny import assert_step_logits_equal_transformers, peaked, rank_generate
    from tests.generate_helpers import PROMPTS, hf_generate, ranks_or_fail

    configs = [dict(max_new_tokens=NEW), BEAM, dict(max_new_tokens=NEW, return_logits=True)]
    out = ranks_or_fail(rank_generate, 1, "bloom", PROMPTS, configs, ("auto", "megatron"))[0]
    assert out["fast_used"]
    hf = peaked("bloom")
    greedy = hf_generate(hf, PROMPTS, max_new_tokens=NEW)
    assert out["auto"][0] == greedy
    assert out["auto"][1] == hf_generate(hf, PROMPTS, **BEAM)
    assert out["megatron"][:2] == out["auto"][:2]
    assert_step_logits_equal_transformers(hf, PROMPTS, greedy, out["auto"][2])
    assert len({len(t) for t in greedy}) > 1 or any(len(set(t)) > 2 for t in greedy)  # not a degenerate model
