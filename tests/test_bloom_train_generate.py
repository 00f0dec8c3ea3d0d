"""BLOOM (ALiBi, 6 heads) with ``interop train``: the first-step loss from the HF checkpoint equals
Transformers' loss at TP1 and TP2 (each rank its heads' slopes), and TP2 reproduces TP1's loss curve."""
from __future__ import annotations

import pytest

from tests.alibi_mqa_tiny import first_step_check, tiny_bloom


def test_first_step_loss_equals_transformers_and_tp2_reproduces_tp1(tmp_path):
    losses = first_step_check(tmp_path, tiny_bloom())
    assert losses[2] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
