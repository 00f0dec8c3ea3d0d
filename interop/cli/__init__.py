"""The ``interop`` command line.

Subcommands live in their own modules and are imported only when used, so ``interop --help`` stays fast
(no torch import). Every command reports user-facing errors the same way: ``error: <one line>`` on stderr
and exit code 2, no traceback unless ``--debug`` is given.
"""
from __future__ import annotations

import importlib
import sys

import click

from interop import __version__

# name -> "module:attribute". A new command group is one line here and one module beside this file.
COMMANDS: dict[str, str] = {
    "inspect": "interop.cli.inspect_cmd:inspect_command",
    "convert": "interop.cli.convert_cmd:convert_command",
    "reshape": "interop.cli.convert_cmd:reshape_command",
    "verify": "interop.cli.convert_cmd:verify_command",
    "data": "interop.cli.data_cmd:data_group",
    "train": "interop.cli.train_cmd:train_command",
    "generate": "interop.cli.generate_cmd:generate_command",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)


class ErrorReportingGroup(LazyGroup):
    """Turns project errors into ``error: …`` + exit 2 for every subcommand."""

    def invoke(self, ctx: click.Context):
        from formats.errors import InteropError

        try:
            return super().invoke(ctx)
        except InteropError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=ErrorReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="interop")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Move Megatron checkpoints and indexed datasets between Megatron-LM, Megatron-Core and
    Hugging Face Transformers at any TP/PP/DP layout; train and generate with Megatron-Core."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="interop")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
