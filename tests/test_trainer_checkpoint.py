"""Checkpoints: a run killed after 3 steps and resumed in a new process continues exactly like a run of 6
steps (model, optimizer, scheduler, RNG and data position all restored), in both formats; a TP2xPP2
checkpoint converts to HF with ``interop convert`` and Transformers' own forward gives the trainer's logits."""
import json
import os

import pytest
import torch

from interop.launch import run_on_ranks
from tests.test_trainer_helpers import VOCAB, write_corpus
from trainer.config import ArchConfig, TrainConfig


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(str(tmp_path_factory.mktemp("corpus") / "counting"))


def make_cfg(data, **kw) -> TrainConfig:
    arch = ArchConfig(family=kw.pop("family", "gpt2"), num_layers=2, hidden_size=64, num_attention_heads=4,
                      num_query_groups=kw.pop("groups", None), vocab_size=VOCAB, max_position_embeddings=64,
                      tie_word_embeddings=kw.pop("tied", True))
    base = dict(arch=arch, seq_length=32, micro_batch_size=2, global_batch_size=8, data_path=[data],
                split="98,2,0", train_iters=6, lr_decay_iters=6, lr_warmup_iters=2, lr=1e-2, progress=False,
                seed=5, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def _train(cfg):
    from trainer.run import rank_main

    return rank_main(cfg)


@pytest.mark.parametrize(
    "fmt,layout",
    [("torch_dist", dict(use_distributed_optimizer=True, world_size=2)), ("torch", dict(tp_degree=2))],
    ids=["torch_dist-dp2-distopt", "torch-tp2"],
)
def test_kill_and_resume_matches_straight_run(tmp_path, corpus, fmt, layout):
    world = layout.get("world_size", layout.get("tp_degree", 1))
    straight = run_on_ranks(_train, world, make_cfg(corpus, ckpt_format=fmt, **layout), timeout_s=300)[0]
    save = str(tmp_path / "ckpt")
    first = run_on_ranks(_train, world, make_cfg(corpus, ckpt_format=fmt, train_iters=3, save=save, **layout),
                         timeout_s=300)[0]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "3"
    assert os.path.isdir(os.path.join(save, "iter_0000003"))
    assert not [p for p in os.listdir(save) if ".tmp-" in p]
    second = run_on_ranks(_train, world, make_cfg(corpus, ckpt_format=fmt, load=save, **layout), timeout_s=300)[0]
    assert len(straight.losses) == 6 and len(second.losses) == 3
    assert straight.losses[-1] < straight.losses[0]
    assert first.losses == pytest.approx(straight.losses[:3], rel=1e-6, abs=1e-6)
    assert second.losses == pytest.approx(straight.losses[3:], rel=1e-6, abs=1e-6)
    assert second.lrs == pytest.approx(straight.lrs[3:])
    assert second.consumed_samples == straight.consumed_samples == 6 * 8
    rows = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    assert [r["iteration"] for r in rows if "loss" in r] == [1, 2, 3]


TOKENS = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49], [200, 3, 77, 150, 9, 9, 31, 64, 128, 2, 1, 0]])


def _train_and_logits(cfg):
    from trainer.run import rank_main

    return rank_main(cfg, after=lambda trainer, result: (result.checkpoint, trainer.logits(TOKENS)))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tp2pp2_checkpoint_converts_to_hf_with_the_same_logits(tmp_path, corpus, family):
    from transformers import AutoModelForCausalLM

    from interop.conversion import convert

    save = str(tmp_path / "ckpt")
    cfg = make_cfg(corpus, family=family, groups=2 if family == "llama" else None, tied=family == "gpt2",
                   tp_degree=2, pp_degree=2, train_iters=2, save=save)
    results = run_on_ranks(_train_and_logits, 4, cfg, timeout_s=300)
    ckpt = results[0][0]
    logits = [r[1] for r in results if r[1] is not None]
    assert ckpt and len(logits) == 2  # the two last-stage TP ranks
    hf_dir = str(tmp_path / "hf")
    convert(ckpt, hf_dir, progress=False)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(TOKENS).logits
    for got in logits:
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
