"""Silence the warnings our dependencies print on every run, and only those.

Megatron-Core warns at import and model build that apex/Transformer Engine are missing (they are optional
here: README) and about its own deprecations; a `train`/`verify`/`generate` run printed ~14 such lines
before anything useful. They are filtered by message prefix (and module for the deprecations) in this
process, and passed on as ``-W`` options (message prefixes only: ``-W`` cannot match a module pattern) (``sys.warnoptions``), which Python hands to every interpreter
that ``multiprocessing`` starts (the fork server and spawned ranks, tokenizer pools). Warnings of this
project and any other warning still show.
"""
from __future__ import annotations

import os
import sys
import warnings

# (message prefix, category): each one is a known, harmless dependency warning
DEPENDENCY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    ("Transformer Engine and Apex are not installed", UserWarning),
    ("Apex is not installed", UserWarning),
    ("full scope is deprecated", UserWarning),
    ("Transformer Engine is not installed", UserWarning),
    ("When using async grad allreduce it is recommended", UserWarning),
    ("`load_state_dict` is deprecated and will be removed", FutureWarning),
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
)
# deprecation notices raised inside these packages concern their own internals, not our calls
DEPENDENCY_MODULES = r"(megatron|transformers|torch\.distributed\.checkpoint|torch\.utils\._pytree|tqdm)(\.|$)"


def silence_dependency_warnings() -> None:
    """Install the filters here and in the ``-W`` options inherited by child interpreters (idempotent).
    Transformers' "Loading weights" bar (not a download; we never download) is turned off the same way,
    through the environment that child processes inherit."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for message, category in DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
        option = f"ignore:{message}:{category.__name__}"
        if option not in sys.warnoptions:
            sys.warnoptions.append(option)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=DEPENDENCY_MODULES)
