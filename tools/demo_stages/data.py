"""Demo stage "data": a byte-level BPE tokenizer trained on the Python standard library, the stdlib itself
preprocessed into a Megatron mmap dataset with ``interop data preprocess``, then ``inspect`` and ``verify``."""
from __future__ import annotations

import glob
import json
import os
import sysconfig

STDLIB = "/root/.pyenv/versions/3.11.7/lib/python3.11"
TOKENIZER_FILES = 600  # the tokenizer learns from a third of the files: keeps the stage well under 2 minutes


def stdlib_root() -> str:
    return STDLIB if os.path.isdir(STDLIB) else sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
    """Every non-empty .py file of the standard library (~1,800 files, ~31 MB, ~9M tokens)."""
    root = stdlib_root()
    return sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                  if "site-packages" not in f and os.path.getsize(f) > 0)


def run(ctx) -> None:
    from interop.data.train_tokenizer import train_bpe_tokenizer

    files = stdlib_files()
    tokenizer_dir = ctx.path("tokenizer")
    sample = files[:: max(1, len(files) // TOKENIZER_FILES)]
    print(f"training a byte-level BPE tokenizer (vocab 8192) on {len(sample)} of {len(files)} stdlib files", flush=True)
    train_bpe_tokenizer(sample, tokenizer_dir, vocab_size=8192)
    corpus = ctx.path("stdlib.jsonl")
    with open(corpus, "w", encoding="utf-8") as out:
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as f:
                out.write(json.dumps({"text": f.read(), "path": os.path.relpath(path, stdlib_root())}) + "\n")
    prefix = ctx.path("stdlib")
    ctx.interop("data", "preprocess", "--input", corpus, "--tokenizer", tokenizer_dir, "--output-prefix", prefix,
                "--append-eod", "--workers", "2", "--force")
    data_prefix = prefix + "_text_document"
    ctx.interop("data", "inspect", data_prefix, "--show", "2")
    ctx.interop("data", "verify", data_prefix)
    ctx.artifacts.update(tokenizer=tokenizer_dir, data_prefix=data_prefix, corpus=corpus)
