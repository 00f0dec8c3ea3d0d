"""Stages of `make demo`, run in order by tools/demo.py. Each module exposes ``run(ctx: DemoContext)``."""
