"""Option spellings shared by the commands, so one setting has one set of names everywhere.

Parallel sizes take the short names (``--tp``, ``--pp``, ``--vpp``) and the Accelerate ``MegatronLMPlugin`` names
(``--tp-degree``, ``--pp-degree``, ``--vpp-degree``) interchangeably, whether the command is ``convert``,
``reshape``, ``generate`` or ``train``. Kept free of torch: every command module imports it at ``--help`` time.
"""
from __future__ import annotations

import click

PARALLEL_FLAGS = {
    "tp": ("--tp", "--tp-degree"),
    "pp": ("--pp", "--pp-degree"),
    "vpp": ("--vpp", "--vpp-degree"),
}


def parallel_option(setting: str, dest: str | None = None, **kwargs):
    """``click.option`` for ``tp``/``pp``/``vpp`` under both spellings (``dest`` defaults to the setting)."""
    return click.option(*PARALLEL_FLAGS[setting], dest or setting, type=int, **kwargs)
