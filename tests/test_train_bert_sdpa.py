"""The trainer's BERT on PyTorch's SDPA (issue 19's speed work), against Transformers' ``MegatronBertForPreTraining``
as the oracle, on one CPU rank:

- with padding, the layers get the key-padding mask ``[b, 1, 1, s]`` (never the square one that turns padding
  queries into NaN): logits at real positions and the binary head equal Transformers', padded rows are finite;
- without padding, ``attention_mask=None`` reaches SDPA as no mask at all, and the outputs equal Transformers'
  with an all-ones mask;
- the LM head at the loss positions only (the default step) gives the loss and every gradient of the LM head run
  at every position (a subclass's ``loss_func``), and it really sees only those rows.
"""
import pytest
import torch

from interop.launch import run_on_ranks
from tests.bert_tiny import assert_outputs_close, batch, hf_outputs, tiny_bert
from trainer.config import TrainConfig

SEQ = 12


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    from tests.bert_sdpa_ranks import sdpa_bert_checks

    hf_dir = str(tmp_path_factory.mktemp("sdpa_bert") / "hf")
    model = tiny_bert(binary_head=True, layers=2)
    model.save_pretrained(hf_dir)
    padded = batch(n=3, seq=SEQ)
    unpadded = dict(batch(n=3, seq=SEQ, seed=6), attention_mask=torch.ones(3, SEQ, dtype=torch.long))
    gen = torch.Generator().manual_seed(11)
    micro = []
    for b in (padded, unpadded):  # one micro-batch with padding, one without
        loss_mask = (torch.rand(3, SEQ, generator=gen) < 0.3).float() * b["attention_mask"]
        loss_mask[0, 1] = 1.0
        micro.append(dict(b, labels=torch.randint(5, 100, (3, SEQ), generator=gen), loss_mask=loss_mask,
                          is_random=torch.randint(0, 2, (3,), generator=gen)))
    cfg = TrainConfig(model=hf_dir, seq_length=SEQ, micro_batch_size=3, global_batch_size=6, synthetic_data=True,
                      train_iters=1, lr=1e-3, progress=False, plot=False, seed=7)
    out = run_on_ranks(sdpa_bert_checks, 1, cfg, padded, unpadded, micro, timeout_s=600)[0]
    return dict(out, model=model, padded_batch=padded, unpadded_batch=unpadded, micro=micro)


def test_padded_batch_gets_the_key_mask_and_transformers_outputs(checks):
    assert checks["core"] == "SDPAttention"
    assert checks["padded masks"] == [(3, 1, 1, SEQ)]  # every layer: the key mask, broadcast over the queries
    b = checks["padded_batch"]
    assert_outputs_close(checks["padded"], hf_outputs(checks["model"], b), b["attention_mask"], atol=1e-5)
    assert torch.isfinite(checks["padded"]["logits"]).all()  # padding queries attend to the real keys: no NaN


def test_unpadded_batch_runs_sdpa_without_a_mask_and_gives_transformers_outputs(checks):
    assert checks["unpadded masks"] == [None]
    b = checks["unpadded_batch"]
    assert_outputs_close(checks["unpadded"], hf_outputs(checks["model"], b), b["attention_mask"], atol=1e-5)
    # the training step reads the padding off the host batch: the key mask for the padded micro-batch, none for
    # the other
    assert set(checks["train masks"]) == {None, (3, 1, 1, SEQ)}


def test_lm_head_at_loss_positions_gives_the_loss_and_gradients_of_the_full_head(checks):
    loss, grads, rows = checks["default"]
    full_loss, full_grads, full_rows = checks["every position"]
    n = [int(mb["loss_mask"].sum()) for mb in checks["micro"]]
    assert rows == n and full_rows == [3 * SEQ] * 2 and 0 < n[0] < 3 * SEQ
    assert loss == pytest.approx(full_loss, rel=1e-6, abs=1e-6)
    assert set(grads) == set(full_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert full_grads["output_layer.bias"].abs().sum() > 0  # the LM head is trained on


@pytest.mark.gpu
def test_bf16_on_gpu_padded_rows_stay_finite_and_the_loss_positions_change_nothing(tmp_path):
    """On a GPU in bf16 (cuDNN / flash / memory-efficient SDPA kernels, not the CPU's): the padded batch's outputs are
    finite and close to Transformers' fp32 ones at real positions, and the LM head at the loss positions gives
    the full head's loss."""
    from tests.bert_sdpa_ranks import sdpa_bert_checks

    model = tiny_bert(binary_head=True, layers=2)
    model.save_pretrained(str(tmp_path / "hf"))
    padded = batch(n=3, seq=SEQ)
    unpadded = dict(batch(n=3, seq=SEQ, seed=6), attention_mask=torch.ones(3, SEQ, dtype=torch.long))
    micro = [dict(b, labels=torch.randint(5, 100, (3, SEQ)), loss_mask=(torch.arange(SEQ) % 3 == 0).float()
                  .expand(3, SEQ).contiguous() * b["attention_mask"], is_random=torch.tensor([0, 1, 0]))
             for b in (padded, unpadded)]
    cfg = TrainConfig(model=str(tmp_path / "hf"), seq_length=SEQ, micro_batch_size=3, global_batch_size=6,
                      synthetic_data=True, train_iters=1, lr=1e-3, progress=False, plot=False, seed=7,
                      mixed_precision="bf16")
    out = run_on_ranks(sdpa_bert_checks, 1, cfg, padded, unpadded, micro, timeout_s=600)[0]
    assert torch.isfinite(out["padded"]["logits"]).all() and torch.isfinite(out["unpadded"]["logits"]).all()
    for name, b in (("padded", padded), ("unpadded", unpadded)):
        assert_outputs_close(out[name], hf_outputs(model, b), b["attention_mask"], atol=0.15, msg=name)
    assert out["default"][0] == pytest.approx(out["every position"][0], rel=1e-2)
