"""The same comparisons on a CUDA device (run by `make test-gpu` on the device machine): fp32 greedy and beam
search on the GPU equal Transformers' on the CPU, at TP1 and (with two GPUs) TP2."""
import pytest
import torch

from interop.launch import run_on_ranks
from tests.generate_helpers import PROMPTS, hf_generate, rank_generate, tiny_hf

pytestmark = pytest.mark.gpu

CONFIGS = [dict(max_new_tokens=12), dict(max_new_tokens=12, num_beams=4, length_penalty=0.6, early_stopping=True)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tp", [1, 2])
def test_cuda_generation_equals_transformers(family, tp):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    out = run_on_ranks(rank_generate, tp, family, tp, 1, PROMPTS, CONFIGS)[0]
    hf = tiny_hf(family)
    assert out[0] == hf_generate(hf, PROMPTS, max_new_tokens=12)
    assert out[1] == hf_generate(hf, PROMPTS, max_new_tokens=12, num_beams=4, length_penalty=0.6, early_stopping=True)
