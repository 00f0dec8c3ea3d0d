"""`make demo`: the main job, end to end, on a real corpus (the Python standard library's sources).

Each stage is a function; stages that have not landed yet say so instead of failing.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "demo-out")


def interop(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the CLI the way a user would and echo the command."""
    cmd = [sys.executable, "-m", "interop", *args]
    print("$ interop " + " ".join(args), flush=True)
    return subprocess.run(cmd, check=check)


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    start = time.time()
    banner("the CLI")
    interop("--version")
    interop("--help")
    print(f"\ndemo finished in {time.time() - start:.0f} s; outputs in {OUT}")


if __name__ == "__main__":
    main()
