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
CKPT_FORMATS = ("torch_dist", "torch")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert_data")
    return write_sentence_corpus(str(root / "sentences")), write_wordpiece_tokenizer(str(root / "tok"))


def make_cfg(data, layers: int = 2, **kw) -> TrainConfig:
    corpus, tok = data
    arch = ArchConfig(family="bert", num_layers=layers, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB,
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
    """One rank: the reference curve (captured weights), selective/full recompute, a custom loss, runs killed
    after 3 steps with a checkpoint (``torch_dist`` and ``torch``), bf16 from the same weights, and a 4-layer
    reference for the interleaved pipeline."""
    root = tmp_path_factory.mktemp("bert_kill")
    saves = {fmt: str(root / fmt) for fmt in CKPT_FORMATS}
    runs = [
        (make_cfg(data), ("capture", "state"), None),
        (make_cfg(data, recompute_activations="selective"), ("load", None), None),
        (make_cfg(data, recompute_activations="full"), ("load", None), None),
        (make_cfg(data, train_iters=1), ("load", None), DoubledLoss()),
        *[(make_cfg(data, save=saves[fmt], ckpt_format=fmt), ("kill", 3), None) for fmt in CKPT_FORMATS],
        (make_cfg(data, lr=0.0), ("load", None), None),
        (make_cfg(data, mixed_precision="bf16"), ("load", None), None),
        (make_cfg(data, layers=4), ("capture", "deep"), None),
    ]
    *curves, states = run_on_ranks(run_many, 1, runs, timeout_s=600)[0]
    ref, selective, full, custom, *killed, frozen, bf16, deep = curves
    return dict(ref=ref, selective=selective, full=full, custom=custom, killed=dict(zip(CKPT_FORMATS, killed)),
                frozen=frozen, bf16=bf16, deep=deep, states=states, saves=saves)


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


def test_bf16_curve_is_close_to_fp32(single):
    """bf16 on CPU (Megatron-Core's Float16Module, fp32 main params and grads): the same weights and batches give
    a finite curve within bf16 resolution of the fp32 one, and not the same numbers (it did run in bf16)."""
    ref, bf16 = single["ref"], single["bf16"]
    assert all(map(torch.isfinite, torch.tensor(bf16)))
    assert bf16 == pytest.approx(ref, rel=2e-2, abs=2e-2)
    assert bf16 != pytest.approx(ref, rel=1e-6, abs=1e-6)


def test_layouts_reproduce_single_rank_curve(data, single):
    layouts = {
        "tp2": dict(tp_degree=2),
        "pp2": dict(pp_degree=2),
        "dp2-distopt": dict(use_distributed_optimizer=True),
        "sp-tp2": dict(tp_degree=2, sequence_parallelism=True),
        "pp2-vpp2": dict(layers=4, pp_degree=2, vpp_degree=2),
    }
    states = single["states"]
    runs = [(make_cfg(data, world_size=2, **kw), ("load", states["deep" if "vpp_degree" in kw else "state"]), None)
            for kw in layouts.values()]
    *curves, _ = run_on_ranks(run_many, 2, runs, True, timeout_s=600)[0]
    assert single["deep"] != pytest.approx(single["ref"], rel=1e-3)  # the 4-layer reference is another curve
    for (name, kw), per_rank in zip(layouts.items(), curves):
        ref = single["deep" if "vpp_degree" in kw else "ref"]
        for curve in per_rank:  # every rank reports the same DP-averaged curve
            assert curve == pytest.approx(ref, **TOL), name


@pytest.mark.parametrize("fmt", CKPT_FORMATS)
def test_kill_and_resume_matches_straight_run(data, single, fmt):
    ref, save = single["ref"], single["saves"][fmt]
    assert single["killed"][fmt] == pytest.approx(ref[:3], rel=1e-6, abs=1e-6)
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "3"
    iter_dir = os.path.join(save, "iter_0000003")
    assert os.path.exists(os.path.join(iter_dir, "mp_rank_00", "model_optim_rng.pt")) == (fmt == "torch")
    runs = [(make_cfg(data, load=save, ckpt_format=fmt), "perturb", None)]
    resumed, _ = run_on_ranks(run_many, 1, runs, timeout_s=600)[0]
    assert resumed == pytest.approx(ref[3:], rel=1e-6, abs=1e-6)


def test_eval_reports_mlm_perplexity_and_accuracies_of_the_logits(data):
    """At TP2 (the vocabulary split over ranks): the eval's masked-token accuracy, NSP/SOP accuracy, MLM
    perplexity and loss equal the ones computed by hand from the trained model's full logits on the same
    validation batch."""
    import math

    import torch.nn.functional as F

    from tests.encoder_ranks import eval_with_batch

    cfg = make_cfg(data, world_size=2, tp_degree=2, split="50,50,0", micro_batch_size=4, global_batch_size=8,
                   eval_iters=1, train_iters=30, lr_decay_iters=30)
    ev, batch, out, _ = run_on_ranks(eval_with_batch, 2, cfg, timeout_s=600)[0]
    mask = batch["loss_mask"] > 0
    logits = out["logits"]
    acc = (logits.argmax(-1)[mask] == batch["labels"][mask]).float().mean().item()
    sop_acc = (out["binary_logits"].argmax(-1) == batch["is_random"]).float().mean().item()
    micro = (slice(0, 4), slice(4, 8))  # the loss is the mean of the micro-batches' masked-token means
    lm = torch.stack([F.cross_entropy(logits[m][mask[m]], batch["labels"][m][mask[m]]) for m in micro])
    sop = torch.stack([F.cross_entropy(out["binary_logits"][m], batch["is_random"][m]) for m in micro])
    assert 0.0 < acc < 1.0 and mask.sum() > 8 and 0.0 < sop_acc < 1.0
    assert ev["acc"] == pytest.approx(acc, abs=1e-6)
    assert ev["sop_acc"] == pytest.approx(sop_acc, abs=1e-6)
    assert ev["ppl"] == pytest.approx(math.exp(lm.mean().item()), rel=1e-4)
    assert ev["loss"] == pytest.approx((lm + sop).mean().item(), rel=1e-4)


def test_vocab_parallel_argmax_is_the_argmax_of_the_gathered_logits():
    """Two TP ranks, each holding half the vocabulary: the predicted ids are ``torch.argmax`` of the whole
    logits, ties (planted across the two halves) going to the lowest id as there."""
    from tests.encoder_ranks import tp_argmax

    logits = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    logits[0, 0, 3] = logits[0, 0, 12] = 9.0  # a tie across the shards
    logits[1, 2, 14] = 9.0  # the winner in the second shard
    got = run_on_ranks(tp_argmax, 2, logits, timeout_s=300)
    assert got[0].tolist() == got[1].tolist() == logits.argmax(-1).tolist()
    assert got[0][0, 0] == 3 and got[0][1, 2] == 14


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
