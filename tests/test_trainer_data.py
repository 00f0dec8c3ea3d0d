"""Data plumbing: Megatron-LM's sampler order over DP ranks, weighted blends of indexed datasets through
Megatron-Core's BlendedMegatronDatasetBuilder, an empty validation split that never hangs, and a custom
loss through a ``GPTTrainStep`` subclass."""
import pytest
import torch

from interop.launch import run_on_ranks
from tests.test_trainer_helpers import VOCAB, write_corpus
from trainer.config import ArchConfig, TrainConfig
from trainer.data import BatchPlan
from trainer.step import GPTTrainStep


class _Indexed:
    def __getitem__(self, i):
        t = torch.tensor([i])
        return {"tokens": t, "labels": t, "loss_mask": t.float(), "position_ids": t}


def test_dp_ranks_partition_each_global_batch_in_megatron_order():
    seen = []
    for rank in range(2):
        plan = BatchPlan(micro=2, num_micro=3, dp=2, dp_rank=rank)
        seen.append([mb["tokens"].flatten().tolist() for mb in plan.micro_batches(_Indexed(), consumed=12)])
    assert seen[0] == [[12, 13], [16, 17], [20, 21]]
    assert seen[1] == [[14, 15], [18, 19], [22, 23]]
    assert sorted(sum(sum(seen, []), [])) == list(range(12, 24))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    return write_corpus(str(root / "a"), seed=1), write_corpus(str(root / "b"), docs=80, seed=2)


def _cfg(**kw) -> TrainConfig:
    arch = ArchConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=32)
    base = dict(arch=arch, seq_length=16, micro_batch_size=2, global_batch_size=4, train_iters=4, lr=1e-2,
                eval_interval=2, eval_iters=1, progress=False, plot=False, seed=9)
    base.update(kw)
    return TrainConfig(**base)


class DoubledLoss(GPTTrainStep):
    """A custom loss: twice the token mean (what a key-token weighting subclass would override)."""

    def loss_func(self, batch, token_losses):
        loss, metrics = super().loss_func(batch, token_losses)
        return 2 * loss, {"lm loss": 2 * metrics["lm loss"]}


def _run(cfg, doubled=False):
    from trainer.run import rank_main

    result = rank_main(cfg, step=DoubledLoss() if doubled else None)
    return result.losses, result.evals


def test_weighted_blend_and_eval(corpora):
    a, b = corpora
    losses, evals = run_on_ranks(_run, 1, _cfg(data_path=[0.7, a, 0.3, b], split="90,10,0"), timeout_s=300)[0]
    assert len(losses) == 4 and [e["iteration"] for e in evals] == [2, 4]
    assert all(e["ppl"] == pytest.approx(torch.tensor(e["loss"]).exp().item(), rel=1e-6) for e in evals)


def test_empty_validation_split_does_not_hang_and_custom_loss(corpora):
    a, _ = corpora
    losses, evals = run_on_ranks(_run, 1, _cfg(data_path=[a], split="100,0,0", train_iters=1), timeout_s=120)[0]
    assert evals == [] and len(losses) == 1
    doubled, _ = run_on_ranks(_run, 1, _cfg(data_path=[a], split="100,0,0", train_iters=1), True, timeout_s=120)[0]
    assert doubled[0] == pytest.approx(2 * losses[0], rel=1e-6)


def _first_loss(prefix):
    from trainer.run import rank_main

    cfg = _cfg(data_path=[prefix], split="100,0,0", train_iters=1, lr=0.0)
    return rank_main(cfg).losses[0]


@pytest.mark.parametrize("impl", ["lazy", "fairseq-mmap"])
def test_legacy_and_fairseq_variants_train_like_mmap(corpora, tmp_path, impl):
    """Same documents written as another variant by ``formats.indexed`` give the same first-step loss as
    Megatron-Core reading the mmap original."""
    from formats.indexed import create_writer, open_dataset

    a, _ = corpora
    src = open_dataset(a)
    prefix = str(tmp_path / impl)
    dtype = src.dtype if impl != "lazy" else "int32"  # Megatron-LM's TNTIDX table has no uint16
    with create_writer(prefix, impl=impl, dtype=dtype) as writer:
        for k in range(src.num_documents):
            for seq in src.document(k):
                writer.add_item(seq)
            writer.end_document()
    if impl.startswith("fairseq"):  # no document index there: one sequence per document, as in the original
        assert open_dataset(prefix).num_documents == src.num_documents
    ref, got = (run_on_ranks(_first_loss, 1, p, timeout_s=120)[0] for p in (a, prefix))
    assert got == pytest.approx(ref, rel=1e-6)
