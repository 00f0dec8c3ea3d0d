"""Fuzzing every checkpoint file kind (issue 16, "done when"): generated hostile inputs — truncations, bit flips,
overwritten byte ranges, mutated safetensors/JSON headers, crafted pickles — each run through ``inspect --tensors``,
a full read of every tensor, and (every fifth input) ``convert`` to HF, under a per-input timeout.

Required: 0 code executions (a marker file), 0 tracebacks (exit code 0 or 2 with one ``error:`` line, never 1),
0 hangs, and no output half-written. ``INTEROP_FUZZ_EXAMPLES=5000`` (or ``-m slow``) runs more inputs.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from formats.errors import InteropError
from interop.cli import cli
from tests import security_payloads as sp

EXAMPLES = int(os.environ.get("INTEROP_FUZZ_EXAMPLES", "320"))
PER_INPUT_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from interop.conversion import convert
    from tests.ckpt_hf import tiny_gpt2

    root = tmp_path_factory.mktemp("fuzz-src")
    model = tiny_gpt2()
    model.save_pretrained(root / "hf")
    model.save_pretrained(root / "hf_sharded", max_shard_size="20KB")
    (root / "hf_bin").mkdir()
    (root / "hf_bin" / "config.json").write_text((root / "hf" / "config.json").read_text())
    torch.save({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"},
               root / "hf_bin" / "pytorch_model.bin")
    convert(root / "hf", root / "mg_torch", format="torch")
    convert(root / "hf", root / "mg_dist", format="torch_dist")
    return root


# (source checkpoint, file inside it) the mutations target
TARGETS = [
    ("hf", "model.safetensors"), ("hf", "config.json"), ("hf_sharded", "model.safetensors.index.json"),
    ("hf_bin", "pytorch_model.bin"), ("mg_torch", "release/mp_rank_00/model_optim_rng.pt"),
    ("mg_torch", "latest_checkpointed_iteration.txt"), ("mg_dist", "release/.metadata"),
    ("mg_dist", "release/common.pt"), ("mg_dist", "release/metadata.json"), ("mg_dist", "release/__0_0.distcp"),
]


def _mutate_json(value, rng: random.Random):
    """A hostile replacement for one JSON value."""
    return rng.choice([-1, -2**40, 2**63, 2**70, "12", 1.5, None, True, [], {}, [1, 2, 3], "../../etc/passwd",
                       "/etc/passwd", "F128", "x" * 1000, [[[[[]]]]], 0])


def _json_paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _json_paths(v, prefix + (i,))


def _set(tree, path, value):
    if not path:
        return value
    node = tree
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return tree


def mutate(raw: bytes, name: str, rng: random.Random, marker: Path) -> bytes:
    op = rng.choice(["truncate", "flip", "overwrite", "header", "pickle"])
    if op == "header" and name.endswith(".safetensors"):
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        path = rng.choice(list(_json_paths(header))[1:])
        header = _set(header, path, _mutate_json(None, rng))
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + raw[8 + n:]
    if op == "header" and name.endswith(".json"):
        tree = json.loads(raw)
        path = rng.choice(list(_json_paths(tree)))
        return json.dumps(_set(tree, path, _mutate_json(None, rng))).encode()
    if op == "pickle" and name.endswith((".pt", ".bin", ".metadata", ".distcp")):
        call = rng.choice(list(sp.calls(marker).values()))
        protocol = rng.choice([4, 5] if "." in call.name else [0, 1, 2, 3, 4, 5])
        if name.endswith(".metadata"):
            return sp.pickled({"x": call}, protocol) + raw
        return sp.torch_saved({"x": call, "t": torch.ones(2)}, protocol)
    if op == "truncate" or not raw:
        return raw[: rng.randrange(0, max(1, len(raw)))]
    data = bytearray(raw)
    if op == "flip" or op in ("header", "pickle"):
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data)
    start = rng.randrange(len(data))
    end = min(len(data), start + rng.randint(1, 64))
    data[start:end] = bytes(rng.randrange(256) for _ in range(end - start))
    return bytes(data)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def _read_everything(path: Path) -> None:
    from formats.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    for info in ckpt.tensors():
        if ckpt.kind == "megatron" and ckpt.format == "torch":
            tp, pp = (int(x[2:]) for x in info.shard.split(".")[:2])
            ckpt.load(info.name, tp, pp)
        else:
            ckpt.load(info.name)


def _run_one(src: Path, work: Path, index: int, rng: random.Random, marker: Path) -> dict:
    source, rel = TARGETS[index % len(TARGETS)]
    ckpt = work / f"case{index}"
    shutil.copytree(src / source, ckpt)
    target = ckpt / rel
    target.write_bytes(mutate(target.read_bytes(), target.name, rng, marker))
    outcome = {"case": index, "target": f"{source}/{rel}"}
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(PER_INPUT_TIMEOUT_S)
    try:
        result = CliRunner().invoke(cli, ["inspect", str(ckpt), "--tensors"])
        outcome["inspect"] = (result.exit_code, result.output.strip().splitlines()[-1:] if result.output else [],
                              None if result.exception is None or isinstance(result.exception, SystemExit)
                              else repr(result.exception))
        try:
            _read_everything(ckpt)
            outcome["read"] = "ok"
        except InteropError as exc:
            outcome["read"] = "refused" if "\n" not in str(exc) else f"multi-line: {exc!r}"
        if index % 5 == 0:
            out = work / f"out{index}"
            result = CliRunner().invoke(cli, ["convert", str(ckpt), str(out)])
            outcome["convert"] = (result.exit_code, result.output.strip().splitlines()[-1:] if result.output else [],
                                  None if result.exception is None or isinstance(result.exception, SystemExit)
                                  else repr(result.exception))
            leftovers = [p.name for p in work.iterdir() if p.name.startswith(f"out{index}.")]
            outcome["leftovers"] = leftovers
            shutil.rmtree(out, ignore_errors=True)
    except _Hang:
        outcome["hang"] = True
    except Exception as exc:  # a traceback would have reached the user
        outcome["traceback"] = repr(exc)[:500]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        shutil.rmtree(ckpt, ignore_errors=True)
    outcome["executed"] = marker.exists()
    marker.unlink(missing_ok=True)
    return outcome


def _problems(outcome: dict) -> list[str]:
    bad = []
    if outcome.get("executed"):
        bad.append("code executed")
    if outcome.get("hang"):
        bad.append("hang")
    if outcome.get("traceback"):
        bad.append(f"traceback {outcome['traceback']}")
    if str(outcome.get("read", "")).startswith("multi-line"):
        bad.append(outcome["read"])
    for step in ("inspect", "convert"):
        if step in outcome:
            code, last, exc = outcome[step]
            if exc is not None or code not in (0, 2):
                bad.append(f"{step}: exit {code}, exception {exc}")
            elif code == 2 and not (last and last[0].startswith("error:")):
                bad.append(f"{step}: exit 2 without an error line: {last}")
    if outcome.get("leftovers"):
        bad.append(f"half-written output {outcome['leftovers']}")
    return bad


def _fuzz(sources: Path, work: Path, examples: int, seed: int) -> None:
    rng = random.Random(seed)
    marker = work / "MARKER"
    started = time.monotonic()
    failures, refused = [], 0
    for i in range(examples):
        outcome = _run_one(sources, work, i, rng, marker)
        refused += outcome.get("read") == "refused"
        if _problems(outcome):
            failures.append((outcome["case"], outcome["target"], _problems(outcome)))
    time.sleep(1)  # a Popen payload would create its marker asynchronously
    assert not marker.exists(), "a payload ran"
    assert not failures, failures[:10]
    assert refused > examples // 4, f"only {refused} of {examples} inputs were refused: the mutations are too weak"
    print(f"fuzz: {examples} inputs in {time.monotonic() - started:.0f} s, {refused} refused, 0 failures")


def test_fuzz_every_file_kind(sources, tmp_path):
    _fuzz(sources, tmp_path, EXAMPLES, seed=16)


@pytest.mark.slow
def test_fuzz_every_file_kind_long(sources, tmp_path, request):
    """Runs only when asked for: ``-m slow`` (the default suite's ``-m "not gpu"`` skips it)."""
    expr = request.config.option.markexpr or ""
    if "slow" not in expr or "not slow" in expr:
        pytest.skip("5000 fuzz inputs: run with -m slow")
    _fuzz(sources, tmp_path, max(EXAMPLES, 5000), seed=1616)
