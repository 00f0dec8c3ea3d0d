"""BERT training with the embedded trainer (issue 19), on CPU gloo ranks, tiny models, data written by
Megatron-Core's own ``IndexedDatasetBuilder`` and sampled by its ``BERTMaskedWordPieceDataset``:

- TP2, PP2, DP2 + distributed optimizer, SP + TP2, selective and full recompute reproduce the single-rank loss
  curve (same weights, through the canonical stream) over 5 steps at fp32 tolerance;
- a run killed after a checkpoint and resumed in a new process gives the straight run's losses;
- a subclassed step's loss is the one trained on;
- fine-tuning from an HF ``MegatronBertForPreTraining``: the first step's loss is Transformers' own loss (MLM + NSP
  labels) on the same batch, and the trained checkpoint converts to HF whose outputs are the trainer's;
- a tokenizer without MASK is a one-line error naming it.
"""
import os

import pytest
import torch

from interop.launch import run_on_ranks
from tests.encoder_ranks import run_many, train_with_outputs
from tests.encoder_train_helpers import VOCAB, write_sentence_corpus, write_wordpiece_tokenizer
from trainer.config import ArchConfig, TrainConfig
from trainer.steps.bert import BertTrainStep

STEPS = 5
TOL = dict(rel=2e-5, abs=2e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert_data")
    return write_sentence_corpus(str(root / "sentences")), write_wordpiece_tokenizer(str(root / "tok"))


def make_cfg(data, **kw) -> TrainConfig:
    corpus, tok = data
    arch = ArchConfig(family="bert", num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB,
                      max_position_embeddings=64)
    base = dict(arch=arch, seq_length=32, micro_batch_size=2, global_batch_size=4, data_path=[corpus], tokenizer=tok,
                split="100,0,0", train_iters=STEPS, lr_decay_iters=STEPS, lr=1e-2, lr_warmup_iters=1, progress=False,
                plot=False, seed=7)
    base.update(kw)
    return TrainConfig(**base)


class DoubledLoss(BertTrainStep):
    """A custom loss: twice the MLM loss plus the binary loss."""

    def loss_func(self, batch, token_losses, binary_logits=None):
        _, metrics = super().loss_func(batch, token_losses, binary_logits)
        loss = 2 * super().loss_func(batch, token_losses, None)[0] + (metrics["loss"] - metrics["lm loss"])
        return loss, {**metrics, "loss": loss.detach().clone()}


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """One rank: the reference curve (captured weights), selective/full recompute, a custom loss, and a run killed
    after 3 steps with a checkpoint."""
    save = str(tmp_path_factory.mktemp("bert_kill") / "ckpt")
    runs = [
        (make_cfg(data), "capture", None),
        (make_cfg(data, recompute_activations="selective"), ("load", None), None),
        (make_cfg(data, recompute_activations="full"), ("load", None), None),
        (make_cfg(data, train_iters=1), ("load", None), DoubledLoss()),
        (make_cfg(data, save=save), ("kill", 3), None),
        (make_cfg(data, lr=0.0), ("load", None), None),
    ]
    *curves, state = run_on_ranks(run_many, 1, runs, timeout_s=600)[0]
    return dict(ref=curves[0], selective=curves[1], full=curves[2], custom=curves[3], killed=curves[4],
                frozen=curves[5], state=state, save=save)


def test_reference_learns(single):
    """The updates move the curve far beyond the comparison tolerance (the same weights and batches without
    learning give another curve), so a layout that updates wrongly cannot pass."""
    ref, frozen = single["ref"], single["frozen"]
    assert len(ref) == STEPS and all(map(torch.isfinite, torch.tensor(ref)))
    assert frozen[:2] == pytest.approx(ref[:2], **TOL)  # step 1 runs at the warm-up's lr 0
    assert all(abs(a - b) > 1e-2 for a, b in zip(ref[2:], frozen[2:])), (ref, frozen)


@pytest.mark.parametrize("kind", ["selective", "full"])
def test_recompute_reproduces_single_rank_curve(single, kind):
    assert single[kind] == pytest.approx(single["ref"], **TOL)


def test_custom_loss_step_is_trained_on(single):
    ref = single["ref"]
    assert single["custom"][0] != pytest.approx(ref[0], rel=1e-3)
    assert ref[0] < single["custom"][0] < 2 * ref[0]  # twice the MLM part, the binary part once


def test_layouts_reproduce_single_rank_curve(data, single):
    layouts = {
        "tp2": dict(tp_degree=2),
        "pp2": dict(pp_degree=2),
        "dp2-distopt": dict(use_distributed_optimizer=True),
        "sp-tp2": dict(tp_degree=2, sequence_parallelism=True),
    }
    runs = [(make_cfg(data, world_size=2, **kw), ("load", single["state"]), None) for kw in layouts.values()]
    *curves, _ = run_on_ranks(run_many, 2, runs, True, timeout_s=600)[0]
    for name, per_rank in zip(layouts, curves):
        for curve in per_rank:  # every rank reports the same DP-averaged curve
            assert curve == pytest.approx(single["ref"], **TOL), name


def test_kill_and_resume_matches_straight_run(data, single):
    ref, save = single["ref"], single["save"]
    assert single["killed"] == pytest.approx(ref[:3], rel=1e-6, abs=1e-6)
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "3"
    runs = [(make_cfg(data, load=save), "perturb", None)]
    resumed, _ = run_on_ranks(run_many, 1, runs, timeout_s=600)[0]
    assert resumed == pytest.approx(ref[3:], rel=1e-6, abs=1e-6)


def test_tokenizer_without_mask_is_one_line_error(data, tmp_path):
    from trainer.data_encoders import special_tokens
    from trainer.errors import TrainConfigError

    path = write_wordpiece_tokenizer(str(tmp_path / "nomask"), drop="[MASK]")
    with pytest.raises(TrainConfigError, match=r"no MASK token.*\[MASK\]") as err:
        special_tokens(path)
    assert "\n" not in str(err.value) and "nomask" in str(err.value)


def test_finetune_from_hf_first_loss_is_transformers_loss_and_result_converts(data, tmp_path):
    """From Transformers' ``MegatronBertForPreTraining`` (perturbed norms/biases): step 1's loss is the model's own
    loss with ``labels`` and ``next_sentence_label`` on the same batch; after two steps the ``torch_dist``
    checkpoint converts to HF with ``interop convert`` and Transformers gives the trainer's outputs."""
    from transformers import MegatronBertForPreTraining

    from interop.conversion import convert
    from tests.bert_tiny import assert_outputs_close, batch, tiny_bert

    hf_dir = str(tmp_path / "hf")
    model = tiny_bert(binary_head=True, layers=2)
    model.save_pretrained(hf_dir)
    save = str(tmp_path / "ckpt")
    cfg = make_cfg(data, model=hf_dir, micro_batch_size=4, global_batch_size=4, train_iters=2, lr_decay_iters=2,
                   lr_warmup_iters=0, lr=1e-3, save=save)
    probe = batch(n=2, seq=12)
    first, losses, ckpt, outputs = run_on_ranks(train_with_outputs, 1, cfg, probe, timeout_s=600)[0]
    assert first["loss_mask"].sum() > 0 and first["attention_mask"].min() == 0  # masked tokens and padding
    labels = torch.where(first["loss_mask"] > 0, first["labels"], torch.full_like(first["labels"], -100))
    with torch.no_grad():
        ref = model(input_ids=first["tokens"], attention_mask=first["attention_mask"],
                    token_type_ids=first["tokentype_ids"], labels=labels, next_sentence_label=first["is_random"]).loss
    assert losses[0] == pytest.approx(float(ref), rel=1e-5, abs=1e-5)

    out_dir = str(tmp_path / "hf_out")
    convert(ckpt, out_dir, progress=False)
    trained = MegatronBertForPreTraining.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = trained(probe["tokens"], attention_mask=probe["attention_mask"], token_type_ids=probe["tokentype_ids"])
    expected = {"logits": got.prediction_logits.float(), "binary_logits": got.seq_relationship_logits.float()}
    assert not torch.allclose(expected["logits"], model(probe["tokens"], attention_mask=probe["attention_mask"],
                                                        token_type_ids=probe["tokentype_ids"]).prediction_logits)
    assert_outputs_close(outputs, expected, probe["attention_mask"], atol=1e-4)
