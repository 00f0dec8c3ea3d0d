"""Fine-tuning from a Hugging Face checkpoint: the trainer's first-step loss at TP2 equals Transformers' own
loss on the same batch (the vocabulary, 200, is padded to 256 by Megatron: padded rows must not count)."""
import pytest
import torch

from interop.launch import run_on_ranks
from trainer.config import TrainConfig

VOCAB = 200


def _hf_model(family: str):
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def _train(cfg):
    from trainer.run import rank_main

    return rank_main(cfg).losses


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_first_step_loss_equals_transformers_loss(tmp_path, family):
    from trainer.data import SyntheticSamples

    model = _hf_model(family).eval()
    path = str(tmp_path / "hf")
    model.save_pretrained(path)
    cfg = TrainConfig(model=path, tp_degree=2, seq_length=16, micro_batch_size=2, global_batch_size=4,
                      synthetic_data=True, train_iters=2, lr=1e-3, progress=False, seed=3, plot=False)
    losses = run_on_ranks(_train, 2, cfg, timeout_s=300)[0]

    samples = SyntheticSamples(cfg, VOCAB, cfg.seed)
    text = torch.stack([torch.cat([samples[i]["tokens"], samples[i]["labels"][-1:]]) for i in range(4)])
    with torch.no_grad():
        expected = model(input_ids=text, labels=text).loss.item()
    assert losses[0] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert losses[1] != pytest.approx(losses[0], abs=1e-6)  # it trained
