"""Shared pieces of the output-safety, train-validation and CLI-error tests (no tests here).

``cli`` runs a command in-process (click's CliRunner); ``cli_process`` runs it in a fresh interpreter (for
signals, resource limits, warnings printed at import and anything that could hang: always under a timeout).
``one_line_error`` is the project's promise for bad input: exit 2, exactly one ``error: <file>: <problem>``
line on stderr, no traceback.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from interop import cli as cli_module

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def cli(*args):
    return CliRunner().invoke(cli_module.cli, [str(a) for a in args])


def cli_process(*args, timeout: float = 240, preamble: str = "", cwd=None) -> subprocess.CompletedProcess:
    """``python -c '<preamble>; interop main(args)'`` with this checkout first on the path."""
    code = f"import sys\n{preamble}\nfrom interop.cli import main\nmain(sys.argv[1:])\n"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([PY, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def stderr_of(result) -> str:
    return result.stderr if hasattr(result, "returncode") else result.stderr


def code_of(result) -> int:
    return result.returncode if hasattr(result, "returncode") else result.exit_code


def one_line_error(result, *needles: str) -> str:
    """Assert exit 2 and a single ``error: …`` line (containing ``needles``) on stderr; return that line."""
    err = stderr_of(result)
    out = (result.stdout or "") + err
    assert code_of(result) == 2, out
    assert "Traceback" not in out, out
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def leftovers(directory: Path) -> list[str]:
    """Temporaries of ours anywhere under ``directory``."""
    return sorted(str(p) for p in Path(directory).rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes (to prove something was left untouched)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def make_hf(path: Path) -> Path:
    from tests.ckpt_hf import tiny_gpt2

    tiny_gpt2().save_pretrained(path)
    return path


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def train_yaml(path: Path, data_prefix: str, **extra) -> Path:
    """A tiny random-init GPT-2 run (vocab 256, the corpus of ``tests.test_trainer_helpers``)."""
    cfg = {
        "arch": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 256,
                 "max_position_embeddings": 32},
        "seq_length": 16, "micro_batch_size": 2, "global_batch_size": 4, "train_iters": 2,
        "data_path": [data_prefix], "progress": False, "plot": False, **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path
