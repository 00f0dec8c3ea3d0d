"""Bad training configs, data and model configs are one-line errors before anything is built (issue 16,
items 11-14), and the cases that used to hang finish under a timeout.

The tables drive the real CLI (``interop train --set``/``interop convert``): each bad value must give exit 2
and a single ``error:`` line naming the field (or file), no traceback.
"""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from tests.sec_cli_helpers import cli, cli_process, edit_json, make_hf, one_line_error, train_yaml
from trainer.config import ArchConfig, TrainConfig
from trainer.config_values import ARCH_RULES, TRAIN_RULES


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from tests.test_trainer_helpers import write_corpus

    root = tmp_path_factory.mktemp("trainval")
    corpus = write_corpus(str(root / "corpus"), docs=600)
    small = write_corpus(str(root / "small"), docs=60, seed=3)
    return root, corpus, small, train_yaml(root / "t.yaml", corpus)


def test_every_config_field_has_a_rule():
    assert set(TRAIN_RULES) == {f.name for f in dataclasses.fields(TrainConfig)} - {"arch"}
    assert set(ARCH_RULES) == {f.name for f in dataclasses.fields(ArchConfig)}


BAD_TRAIN_VALUES = [
    ("lr", "-1", "lr must be"), ("lr", ".nan", "lr must be"), ("lr", ".inf", "lr must be"), ("lr", "lots", "lr must be"),
    ("min_lr", "-0.1", "min_lr must be"), ("min_lr", "1", "min_lr 1.0 exceeds lr"),
    ("weight_decay", "-1", "weight_decay"), ("adam_beta1", "1", "adam_beta1"), ("adam_beta2", "-0.5", "adam_beta2"),
    ("adam_eps", "0", "adam_eps"), ("gradient_clipping", "-1", "gradient_clipping"),
    ("loss_scale", "0", "loss_scale"), ("peak_tflops", "0", "peak_tflops"),
    ("log_interval", "0", "log_interval"), ("eval_interval", "-1", "eval_interval"),
    ("eval_iters", "-2", "eval_iters"), ("save_interval", "-1", "save_interval"),
    ("train_iters", "0", "train_iters"), ("train_iters", "2.5", "train_iters"),
    ("lr_warmup_iters", "-1", "lr_warmup_iters"), ("lr_decay_iters", "0", "lr_decay_iters"),
    ("micro_batch_size", "-2", "micro_batch_size"), ("micro_batch_size", "0", "micro_batch_size"),
    ("global_batch_size", "-4", "global_batch_size"), ("num_micro_batches", "0", "num_micro_batches"),
    ("seq_length", "0", "seq_length"), ("seq_length", "[1, 2]", "seq_length"),
    ("tp_degree", "0", "tp_degree"), ("pp_degree", "-1", "pp_degree"), ("vpp_degree", "0", "vpp_degree"),
    ("world_size", "0", "world_size"), ("seed", "-1", "seed"),
    ("mixed_precision", "fp8", "mixed_precision"), ("lr_decay_style", "exp", "lr_decay_style"),
    ("recompute_activations", "some", "recompute_activations"), ("attention_backend", "flash", "attention_backend"),
    ("ckpt_format", "zarr", "ckpt_format"), ("split", "abc", "split"), ("split", "0,0,0", "split"),
    ("split", "1,2,3,4", "split"), ("use_distributed_optimizer", "maybe", "use_distributed_optimizer"),
    ("model", "[a, b]", "model must be"), ("data_path", "{a: 1}", "data_path"),
    ("arch.num_attention_heads", "0", "arch.num_attention_heads"), ("arch.num_layers", "-1", "arch.num_layers"),
    ("arch.hidden_size", "30", "not divisible by arch.num_attention_heads"), ("arch.vocab_size", "0", "arch.vocab_size"),
    ("arch.family", "nonesuch", "arch.family"), ("arch.norm_epsilon", "0", "arch.norm_epsilon"),
    ("arch.num_query_groups", "3", "arch.num_query_groups"), ("arch.max_position_embeddings", "0", "max_position"),
    ("arch.rotary_base", "-1", "arch.rotary_base"), ("arch.ffn_hidden_size", "0", "arch.ffn_hidden_size"),
    ("arch", "[1, 2]", "unknown config field 'arch'"),
]


@pytest.mark.parametrize("field,value,needle", BAD_TRAIN_VALUES, ids=[f"{f}={v}" for f, v, _ in BAD_TRAIN_VALUES])
def test_bad_train_value_is_one_line(work, field, value, needle):
    _, _, _, cfg = work
    one_line_error(cli("train", cfg, "--set", f"{field}={value}"), needle)


@pytest.mark.parametrize("text,needle", [
    ("arch: [1, 2]\n", "arch must be a mapping"),
    ("lr: -1\ndata_path: [x]\n", "lr must be"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("seq_length: {a: 1}\n", "seq_length must be int"),
])
def test_bad_config_file_is_one_line(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    one_line_error(cli("train", path), needle)


BAD_HF_VALUES = [
    ("n_head", 0), ("n_head", -2), ("n_layer", 2.5), ("n_layer", 0), ("vocab_size", "lots"), ("n_embd", True),
    ("n_positions", None), ("n_positions", [32]), ("layer_norm_epsilon", -1), ("layer_norm_epsilon", "small"),
    ("n_layer", 10**12), ("model_type", ["gpt2"]),
]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp("hfval") / "hf")


@pytest.mark.parametrize("key,value", BAD_HF_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_HF_VALUES])
def test_bad_hf_config_value_is_one_line(hf, tmp_path, key, value):
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    edit_json(bad / "config.json", **{key: value})
    one_line_error(cli("convert", bad, tmp_path / "out", "--no-progress"), "config.json")
    assert not (tmp_path / "out").exists()


def test_a_billion_layers_config_is_refused_at_once(hf, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    edit_json(bad / "config.json", n_layer=10**9)
    result = cli_process("convert", bad, tmp_path / "out", "--no-progress", timeout=120)
    one_line_error(result, "config.json", "1000000000 layers", "stores")


# ----------------------------------------------------------------------------------------------- item 11
def _corrupt(prefix: str, out: str, how: str) -> str:
    shutil.copy(prefix + ".bin", out + ".bin")
    raw = bytearray(open(prefix + ".idx", "rb").read())
    n, d = np.frombuffer(bytes(raw[18:34]), np.uint64)
    n, d = int(n), int(d)
    sizes, ptrs, docs = 34, 34 + 4 * n, 34 + 12 * n
    if how == "pointer past .bin":
        p = np.frombuffer(bytes(raw[ptrs:docs]), np.int64).copy()
        p[-1] = 10**9
        raw[ptrs:docs] = p.tobytes()
    elif how == "negative length":
        s = np.frombuffer(bytes(raw[sizes:ptrs]), np.int32).copy()
        s[3] = -5
        raw[sizes:ptrs] = s.tobytes()
    elif how == "bad document index":
        doc = np.frombuffer(bytes(raw[docs:docs + 8 * d]), np.int64).copy()
        doc[1:-1] = doc[1:-1][::-1]
        raw[docs:docs + 8 * d] = doc.tobytes()
    open(out + ".idx", "wb").write(raw)
    return out


@pytest.mark.parametrize("how", ["pointer past .bin", "negative length", "bad document index"])
def test_corrupt_dataset_is_refused_before_training(work, tmp_path, how):
    _, corpus, _, cfg = work
    bad = _corrupt(corpus, str(tmp_path / "bad"), how)
    one_line_error(cli("train", cfg, "--data-path", bad), bad, "corrupt dataset")


def test_token_ids_beyond_the_vocabulary_name_the_dataset(work):
    _, corpus, _, cfg = work
    line = one_line_error(cli("train", cfg, "--set", "arch.vocab_size=100"), corpus, "outside the model's vocabulary")
    assert "of 100" in line


# ----------------------------------------------------------------------------------------------- item 12
def test_default_split_on_a_small_corpus_trains_instead_of_hanging(work, tmp_path):
    _, _, small, cfg = work
    result = cli_process("train", cfg, "--data-path", small, "--split", "969,30,1", "--save", tmp_path / "s",
                         timeout=300)
    assert result.returncode == 0, result.stderr
    assert "trained to iteration 2" in result.stdout
    assert "Warning" not in result.stderr and "apex" not in result.stderr.lower(), result.stderr  # item 15


def test_an_empty_training_split_is_an_error(work):
    _, _, small, cfg = work
    one_line_error(cli("train", cfg, "--data-path", small, "--split", "0,1,0"), small, "training tokens")


def test_sizes_beyond_the_machine_are_refused(work):
    _, _, _, cfg = work
    one_line_error(cli("train", cfg, "--micro-batch-size", "100000000", "--global-batch-size", "100000000"),
                   "micro_batch_size 100000000", "GiB")
    one_line_error(cli("train", cfg, "--train-iters", "1000000000000", "--global-batch-size", "1000000"),
                   "sample index")


# ----------------------------------------------------------------------------------------------- items 13, 14
def test_load_that_holds_no_checkpoint_is_an_error(work, tmp_path):
    root, _, _, cfg = work
    one_line_error(cli("train", cfg, "--load", tmp_path / "missing"), "missing", "holds no checkpoint")
    one_line_error(cli("train", cfg, "--load", cfg), "this is a file")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("train", cfg, "--load", tmp_path / "empty", "--save", tmp_path / "other"),
                   "holds no checkpoint")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("1")
    one_line_error(cli("train", cfg, "--load", tmp_path / "junk"), "not the save directory")
    (tmp_path / "junk" / "latest_checkpointed_iteration.txt").write_text("9" * 4000)
    one_line_error(cli("train", cfg, "--load", tmp_path / "junk"), "at most 18 digits")


def test_load_equal_to_save_on_a_fresh_run_starts_from_scratch(work, tmp_path):
    _, _, _, cfg = work
    run = tmp_path / "run"
    r = cli("train", cfg, "--load", run, "--save", run, "--train-iters", "1")
    assert r.exit_code == 0, r.output
    assert "starting from scratch" in r.stderr and (run / "iter_0000001").is_dir()


def _as_training_checkpoint(src, dst, iteration: int = 5):
    shutil.copytree(src, dst)
    (dst / "release").rename(dst / f"iter_{iteration:07d}")
    (dst / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return dst


def test_resume_at_another_layout_names_both_and_what_works(hf, work, tmp_path):
    _, _, _, cfg = work
    tp2 = tmp_path / "tp2"
    assert cli("convert", hf, tp2, "--tp", "2", "--no-progress").exit_code == 0
    ckpt = _as_training_checkpoint(tp2, tmp_path / "run")
    line = one_line_error(cli("train", cfg, "--load", ckpt, "--use-distributed-optimizer"),
                          "saved at TP2xPP1", "this run is TP1xPP1", "interop reshape", "model:")
    assert "iter_0000005" in line
    torch_tp2 = tmp_path / "tp2t"
    assert cli("convert", hf, torch_tp2, "--tp", "2", "--format", "torch", "--no-progress").exit_code == 0
    ckpt = _as_training_checkpoint(torch_tp2, tmp_path / "run_t")
    one_line_error(cli("train", cfg, "--load", ckpt), "per-rank torch files")


def test_hostile_common_pt_on_load_is_refused_without_running(work, tmp_path, hf):
    import pickle

    _, _, _, cfg = work
    meg = tmp_path / "meg"
    assert cli("convert", hf, meg, "--no-progress").exit_code == 0
    ckpt = _as_training_checkpoint(meg, tmp_path / "run")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    (ckpt / "iter_0000005" / "common.pt").write_bytes(pickle.dumps({"args": Payload()}))
    one_line_error(cli("train", cfg, "--load", ckpt), "common.pt")
    assert not marker.exists()
