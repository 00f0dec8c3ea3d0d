"""StarCoder (multi-query) with ``interop train`` and ``interop generate``'s engine, against Transformers: the
first-step loss from the HF checkpoint equals Transformers' loss at TP1 and TP2 (one K/V head over two ranks),
TP2 reproduces TP1's loss curve, and greedy / beam generation on the fast decode engine (one K/V group: its
GQA path) is token-identical to Transformers' generate."""
from __future__ import annotations

import pytest

from tests.alibi_mqa_tiny import (assert_step_logits_equal_transformers, first_step_check, peaked, rank_generate,
                                  tiny_starcoder)
from tests.generate_helpers import PROMPTS, hf_generate, ranks_or_fail

NEW = 12
BEAM = dict(max_new_tokens=NEW, num_beams=4, length_penalty=1.5, early_stopping=False, num_return_sequences=2)


def test_first_step_loss_equals_transformers_and_tp2_reproduces_tp1(tmp_path):
    losses = first_step_check(tmp_path, tiny_starcoder())
    assert losses[2] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)


def test_greedy_and_beam_equal_transformers_on_the_fast_engine():
    configs = [dict(max_new_tokens=NEW), BEAM, dict(max_new_tokens=NEW, return_logits=True)]
    out = ranks_or_fail(rank_generate, 1, "starcoder", PROMPTS, configs)[0]
    assert out["fast_used"]  # engine="auto" ran the fast engine, not Megatron-Core's path
    hf = peaked("starcoder")
    greedy = hf_generate(hf, PROMPTS, max_new_tokens=NEW)
    assert out["auto"][0] == greedy
    assert_step_logits_equal_transformers(hf, PROMPTS, greedy, out["auto"][2])
    assert out["auto"][1] == hf_generate(hf, PROMPTS, **BEAM)
