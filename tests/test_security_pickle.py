"""No checkpoint ever runs code (issue 16 items 1–3): real exploits planted in every pickled file kind of genuine
checkpoints, run through every command. The marker file an exploit would create must never appear, the command
exits 2 with one ``error:`` line naming the file and the refused global; genuine checkpoints (ours, Transformers',
Megatron-Core's via the trainer) keep loading.

The payloads are proven real first: plain ``pickle``/``torch.load(weights_only=False)`` runs every one of them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from formats.errors import FormatError
from interop.cli import cli
from tests import security_payloads as sp

PROTOCOLS = (0, 2, 4, 5)
KILLERS = ("os.system", "posix.system", "eval", "popen", "dotted-dcp", "dotted-megatron", "dotted-torch")


# ---- genuine checkpoints, built once


@pytest.fixture(scope="module", autouse=True)
def no_late_marker(tmp_path_factory):
    """A ``Popen`` payload would create its marker asynchronously: look again once every test has run."""
    yield
    import time

    time.sleep(2)
    base = tmp_path_factory.getbasetemp()
    assert not [p for p in base.rglob("MARKER")], "a payload ran"


def _tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(97 + i): i for i in range(26)} | {"<unk>": 26}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(path))
    return path


def _train_config(root: Path, corpus: str, **kw) -> Path:
    cfg = {"arch": {"family": "gpt2", "num_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                    "vocab_size": 256, "max_position_embeddings": 32},
           "seq_length": 16, "micro_batch_size": 2, "global_batch_size": 2, "data_path": [corpus],
           "split": "98,2,0", "train_iters": 1, "lr": 1e-3, "progress": False, "plot": False, "seed": 1}
    cfg.update(kw)
    path = root / f"train-{len(list(root.glob('train-*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return path


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                  "TORCHELASTIC_RUN_ID")


def interop_subprocess(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    """``python -m interop ...`` as a user runs it: without the rank variables earlier in-process tests may have
    left in ``os.environ`` (with them the trainer believes it runs under torchrun)."""
    clean = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    return subprocess.run([sys.executable, "-m", "interop", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**clean, "PYTHONWARNINGS": "ignore", **(env or {})})


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """HF (safetensors + tokenizer, and pytorch_model.bin), Megatron torch and torch_dist written by ``convert``, and
    a torch / torch_dist pair written by the trainer (Megatron-Core's dist_checkpointing) for ``train --load``."""
    from interop.conversion import convert
    from tests.ckpt_hf import tiny_gpt2
    from tests.test_trainer_helpers import write_corpus

    root = tmp_path_factory.mktemp("genuine")
    model = tiny_gpt2()
    model.save_pretrained(root / "hf")
    _tokenizer(root / "tokenizer.json")
    (root / "hf_bin").mkdir()
    (root / "hf_bin" / "config.json").write_text((root / "hf" / "config.json").read_text())
    torch.save({k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"},
               root / "hf_bin" / "pytorch_model.bin")
    convert(root / "hf", root / "mg_torch", format="torch")
    convert(root / "hf", root / "mg_dist", format="torch_dist")
    corpus = write_corpus(str(root / "corpus"), docs=60)
    paths = {"root": root, "corpus": corpus, "hf_bin": root / "hf_bin", "mg_torch": root / "mg_torch",
             "mg_dist": root / "mg_dist"}
    for fmt in ("torch", "torch_dist"):
        out = interop_subprocess("train", _train_config(root, corpus, ckpt_format=fmt), "--save", root / f"tr_{fmt}")
        assert out.returncode == 0, out.stderr[-2000:]
        paths[f"tr_{fmt}"] = root / f"tr_{fmt}"
    return paths


def _it(path: Path) -> Path:
    tracker = path / "latest_checkpointed_iteration.txt"
    text = tracker.read_text().strip()
    return path / ("release" if text == "release" else f"iter_{int(text):07d}")


# ---- planting


def plant(genuine, kind: str, killer: str, tmp: Path, protocol: int = 2) -> tuple[Path, str, str]:
    """A copy of the genuine checkpoint of ``kind`` with the exploit planted; (checkpoint, file name, global)."""
    marker = tmp / "MARKER"
    call = sp.calls(marker)[killer]
    name = f"{call.module}.{call.name}"
    if kind in ("model_optim_rng.pt", "distrib_optim.pt"):
        ckpt = sp.copy_checkpoint(genuine["mg_torch"], tmp / "ckpt")
        target = _it(ckpt) / "mp_rank_00" / kind
        if kind == "model_optim_rng.pt":
            sp.replace_torch_pickle(target, call, protocol)
        else:
            target.write_bytes(sp.torch_saved({"optimizer": {"x": call}}, protocol))
    elif kind == "common.pt":
        ckpt = sp.copy_checkpoint(genuine["mg_dist"], tmp / "ckpt")
        sp.replace_torch_pickle(_it(ckpt) / kind, call, protocol)
    elif kind == ".metadata":  # a hundred bytes prepended: plain pickle stops at the payload's STOP
        ckpt = sp.copy_checkpoint(genuine["mg_dist"], tmp / "ckpt")
        md = _it(ckpt) / kind
        md.write_bytes(sp.pickled({"x": call}, protocol) + md.read_bytes())
    elif kind == ".distcp":  # a bytes entry (DCP's load_bytes: torch.load(weights_only=False))
        ckpt = sp.copy_checkpoint(genuine["mg_dist"], tmp / "ckpt")
        kind = sp.replace_dcp_object(_it(ckpt), sp.torch_saved([call], protocol))
    elif kind == "pytorch_model.bin":
        ckpt = sp.copy_checkpoint(genuine["hf_bin"], tmp / "ckpt")
        state = torch.load(ckpt / kind, weights_only=True)
        (ckpt / kind).write_bytes(sp.torch_saved({**state, "x": call}, protocol))
    else:
        raise AssertionError(kind)
    return ckpt, kind, name


def assert_refused(result, marker: Path, file_name: str, global_name: str) -> None:
    out = result.stderr if hasattr(result, "stderr") else result.output
    assert not marker.exists(), "the payload ran"
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    assert code == 2, out[-3000:]
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out, out[-3000:]
    assert file_name in lines[0] and global_name in lines[0], lines[0]


def run_cli(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


# ---- the payloads are real


def test_payloads_run_under_plain_unpickling(tmp_path):
    marker = tmp_path / "MARKER"
    datas = []
    for killer, call in sp.calls(marker).items():
        for protocol in (4, 5) if killer.startswith("dotted") else PROTOCOLS:
            datas.append(sp.pickled({"x": call}, protocol))
        datas.append(sp.torch_saved({"x": call, "t": torch.ones(2)}, 4 if killer.startswith("dotted") else 2))
    ran = sp.executes(datas, marker, tmp_path)
    assert ran == [True] * len(datas)


# ---- item 1: every unpickler matches exact (module, name) pairs


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("killer", KILLERS)
def test_dcp_metadata_refuses_every_payload(genuine, tmp_path, killer, protocol):
    from formats.checkpoint import open_checkpoint

    if killer.startswith("dotted") and protocol < 4:
        protocol = 4  # a dotted name is an attribute path only from protocol 4 on
    ckpt, file_name, global_name = plant(genuine, ".metadata", killer, tmp_path, protocol)
    with pytest.raises(FormatError) as err:
        open_checkpoint(ckpt)
    assert not (tmp_path / "MARKER").exists()
    assert file_name in str(err.value) and global_name in str(err.value)


@pytest.mark.parametrize("killer", KILLERS)
@pytest.mark.parametrize("kind", ["model_optim_rng.pt", "common.pt", "pytorch_model.bin"])
def test_torch_pickles_refuse_every_payload(genuine, tmp_path, kind, killer):
    from formats.checkpoint import open_checkpoint

    ckpt, file_name, global_name = plant(genuine, kind, killer, tmp_path, 4 if killer.startswith("dotted") else 2)
    with pytest.raises(FormatError) as err:
        c = open_checkpoint(ckpt)
        [c.load(i.name) for i in c.tensors()]
    assert not (tmp_path / "MARKER").exists()
    assert file_name in str(err.value) and global_name in str(err.value)


def test_one_tensor_unpickler_takes_exact_names_only():
    import pickle

    from formats.checkpoint.blob_map import _OneTensorUnpickler
    from formats.checkpoint.dcp_metadata import MetadataUnpickler

    for unpickler in (_OneTensorUnpickler, MetadataUnpickler):
        for module, name in [("torch", "serialization.os.system"), ("torch", "FloatStorage.__init__"),
                             ("collections", "OrderedDict.fromkeys"), ("torch._utils", "os"),
                             ("torch.distributed.checkpoint.metadata", "pickle.loads")]:
            data = sp.pickled(sp.Call(module, name, ("x",)), 4)
            with pytest.raises(pickle.UnpicklingError, match="refused global"):
                unpickler(__import__("io").BytesIO(data)).load()


# ---- items 1–3 through the CLI: every file kind, every command


CASES = [  # (file kind, killer, protocol)
    (".metadata", "dotted-dcp", 4), (".metadata", "posix.system", 2), ("common.pt", "popen", 2),
    ("common.pt", "dotted-megatron", 4), ("model_optim_rng.pt", "eval", 2), ("model_optim_rng.pt", "dotted-torch", 5),
    ("pytorch_model.bin", "os.system", 2), ("pytorch_model.bin", "dotted-megatron", 4),
]


@pytest.mark.parametrize("kind,killer,protocol", CASES, ids=[f"{k}-{p}-{n}" for k, p, n in CASES])
def test_inspect_convert_reshape_verify_generate_refuse(genuine, tmp_path, kind, killer, protocol):
    ckpt, file_name, global_name = plant(genuine, kind, killer, tmp_path, protocol)
    marker = tmp_path / "MARKER"
    commands = [["inspect", ckpt, "--tensors"], ["convert", ckpt, tmp_path / "out-convert"],
                ["verify", ckpt, genuine["root"] / "hf"],
                ["generate", ckpt, "--prompt", "abc", "--max-new-tokens", "2", "--tokenizer",
                 genuine["root"] / "tokenizer.json"]]
    if kind != "pytorch_model.bin":
        commands.append(["reshape", ckpt, tmp_path / "out-reshape", "--tp", "1", "--pp", "1"])
    for args in commands:
        assert_refused(run_cli(*args), marker, file_name, global_name)
    assert not (tmp_path / "out-convert").exists() and not (tmp_path / "out-reshape").exists()


def test_distcp_bytes_entries_are_checked_before_megatron_core_loads_them(genuine, tmp_path):
    """Our readers never unpickle ``_extra_state`` entries, Megatron-Core's loader does (DCP ``load_bytes``):
    ``verify`` hands the checkpoint to it only after the pre-flight refused the entry."""
    ckpt, data_file, global_name = plant(genuine, ".distcp", "os.system", tmp_path)
    marker = tmp_path / "MARKER"
    assert run_cli("inspect", ckpt).exit_code == 0  # listing reads no objects
    assert_refused(run_cli("verify", ckpt, genuine["root"] / "hf"), marker, data_file, global_name)


def test_strict_check_refuses_placeholder_classes_megatron_core_would_resolve(genuine, tmp_path):
    """Our own reading turns an unknown ``megatron.*`` class into an inert placeholder; Megatron-Core would import
    the real one, so a file handed to it may name only the exact classes Megatron-Core lists."""
    from formats.checkpoint import open_checkpoint
    from formats.checkpoint.preflight import check_checkpoint_pickles

    ckpt = sp.copy_checkpoint(genuine["mg_dist"], tmp_path / "ckpt")
    sp.replace_torch_pickle(_it(ckpt) / "common.pt", sp.Call("megatron.core.utils.subprocess", "Popen", (["true"],)))
    open_checkpoint(ckpt)  # inert placeholder for our readers
    with pytest.raises(FormatError, match=r"common\.pt.*megatron\.core\.utils\.subprocess\.Popen"):
        check_checkpoint_pickles(ckpt)


def test_metadata_json_must_be_an_object(genuine, tmp_path):
    for bad in ("[1, 2]", '"torch_dist"', '{"sharded_backend": ["torch_dist"]}'):
        ckpt = sp.copy_checkpoint(genuine["mg_dist"], tmp_path / f"ckpt{len(bad)}")
        (_it(ckpt) / "metadata.json").write_text(bad)
        for args in (["inspect", ckpt], ["convert", ckpt, tmp_path / "o"]):
            result = run_cli(*args)
            assert result.exit_code == 2 and "metadata.json" in result.output and "Traceback" not in result.output


def test_genuine_checkpoints_pass_the_preflight(genuine):
    from formats.checkpoint.preflight import check_checkpoint_pickles

    for name in ("mg_torch", "mg_dist", "tr_torch", "tr_torch_dist"):
        check_checkpoint_pickles(genuine[name])


# ---- train --model and train --load (items 2 and 3), in a subprocess


LOAD_CASES = [("tr_torch", "model_optim_rng.pt", "os.system"), ("tr_torch", "distrib_optim.pt", "popen"),
              ("tr_torch_dist", "common.pt", "dotted-megatron"), ("tr_torch_dist", ".metadata", "posix.system"),
              ("tr_torch_dist", ".distcp", "eval")]


def _plant_trained(genuine, source: str, kind: str, killer: str, tmp: Path, protocol: int):
    ckpt = sp.copy_checkpoint(genuine[source], tmp / "ckpt")
    it = _it(ckpt)
    call = sp.calls(tmp / "MARKER")[killer]
    if kind == "model_optim_rng.pt":
        sp.replace_torch_pickle(it / "mp_rank_00" / kind, call, protocol)
    elif kind == "distrib_optim.pt":
        (it / "mp_rank_00" / kind).write_bytes(sp.torch_saved({"x": call}, protocol))
    elif kind == "common.pt":
        sp.replace_torch_pickle(it / kind, call, protocol)
    elif kind == ".metadata":
        (it / kind).write_bytes(sp.pickled({"x": call}, protocol) + (it / kind).read_bytes())
    else:
        kind = sp.replace_dcp_object(it, sp.torch_saved([call], protocol), key_part="rng_state")
    return ckpt, kind, f"{call.module}.{call.name}"


@pytest.mark.parametrize("source,kind,killer", LOAD_CASES, ids=[f"{s}-{k}" for s, k, _ in LOAD_CASES])
def test_train_load_refuses(genuine, tmp_path, source, kind, killer):
    ckpt, file_name, global_name = _plant_trained(genuine, source, kind, killer, tmp_path,
                                                  4 if killer.startswith("dotted") else 2)
    fmt = "torch" if source == "tr_torch" else "torch_dist"
    config = _train_config(tmp_path, genuine["corpus"], ckpt_format=fmt, train_iters=2)
    result = interop_subprocess("train", config, "--load", ckpt, "--save", tmp_path / "again")
    assert_refused(result, tmp_path / "MARKER", file_name, global_name)


def test_train_model_refuses(genuine, tmp_path):
    ckpt, file_name, global_name = plant(genuine, ".metadata", "dotted-dcp", tmp_path, 4)
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"model": str(ckpt), "seq_length": 16, "micro_batch_size": 2, "global_batch_size": 2,
                                  "data_path": [genuine["corpus"]], "split": "98,2,0", "train_iters": 1,
                                  "progress": False, "plot": False}))
    assert_refused(interop_subprocess("train", config), tmp_path / "MARKER", file_name, global_name)


def test_train_load_still_resumes_genuine_checkpoints(genuine, tmp_path):
    """Item 2's regression side: the restricted loader restores a real torch-format save (optimizer, RNG, args)."""
    config = _train_config(tmp_path, genuine["corpus"], ckpt_format="torch", train_iters=2)
    ckpt = sp.copy_checkpoint(genuine["tr_torch"], tmp_path / "ckpt")
    result = interop_subprocess("train", config, "--load", ckpt, "--save", ckpt)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
