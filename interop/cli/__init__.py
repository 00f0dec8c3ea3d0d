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


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``except``/``finally`` cleanup runs (the default
    action would kill the process and leave ``DST.tmp-<pid>`` behind)."""


_HANDLER_PID: int | None = None  # the process that installed the handler (forked children inherit it)


def _on_sigterm(signum, frame):
    import os
    import signal

    if os.getpid() != _HANDLER_PID:
        # a forked child (e.g. a multiprocessing pool worker, which Pool.terminate() ends with SIGTERM): die as
        # the default action would; raising here left a worker blocked on the pool's queue lock forever
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated()


def install_signal_handlers() -> None:
    import os
    import signal
    import threading

    global _HANDLER_PID
    if threading.current_thread() is threading.main_thread():
        _HANDLER_PID = os.getpid()
        signal.signal(signal.SIGTERM, _on_sigterm)


def _end_progress_bars() -> None:
    """Close live tqdm bars so that an error starts on a line of its own (not glued to a bar)."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass
    sys.stdout.flush()


def _fail(message: str, code: int) -> None:
    """Remove what this process left half-written, then print one line and exit with ``code``."""
    from formats import staging

    staging.abort_all()
    _end_progress_bars()
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


def _plain_message(exc) -> str:
    """A rank that raised one of our errors reports ``rank N failed: TrainConfigError: <file>: <problem>``;
    the user needs only ``<file>: <problem>`` (the rank's traceback stays in ``RankFailure.details``)."""
    import re

    from formats.errors import InteropError

    text = str(exc)
    if type(exc).__name__ != "RankFailure":
        return text
    names, todo = set(), [InteropError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    m = re.match(r"rank \d+ failed: (\w+): (.+)$", text)
    if m and m[1] in names - {"RankFailure"}:
        return m[2]
    if m and m[1] == "OSError" or m and m[1] in ("FileNotFoundError", "PermissionError", "IsADirectoryError"):
        return m[2]
    return text


class ErrorReportingGroup(LazyGroup):
    """Turns every failure of a subcommand into one line on stderr: project errors (``InteropError``) and
    operating-system errors exit 2, Ctrl-C 130, SIGTERM 143, anything unexpected 1 (``--debug``: traceback).
    Temporaries of outputs being written are removed first (:func:`formats.staging.abort_all`)."""

    def invoke(self, ctx: click.Context):
        from formats import staging
        from formats.errors import InteropError

        def debug() -> bool:  # the group's callback sets it inside super().invoke
            return bool(ctx.obj and ctx.obj.get("debug"))

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except InteropError as exc:
            if debug():
                raise
            _fail(_plain_message(exc), 2)
        except OSError as exc:
            if debug():
                raise
            err = staging.disk_error(exc)
            if err is not None:
                _fail(str(err), 2)
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}", 2)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Terminated:
            _fail("terminated (SIGTERM)", 143)
        except MemoryError:
            if debug():
                raise
            _fail("out of memory (an input declares sizes beyond what this machine holds?)", 2)
        except Exception as exc:  # noqa: BLE001 - a bug of ours: still one line, the traceback behind --debug
            if debug():
                raise
            frame = exc.__traceback__
            while frame is not None and frame.tb_next is not None:
                frame = frame.tb_next
            at = f" at {frame.tb_frame.f_code.co_filename}:{frame.tb_lineno}" if frame is not None else ""
            text = " ".join(str(exc).split())[:300]
            _fail(f"internal error {type(exc).__name__}: {text}{at} (rerun with --debug for the traceback)", 1)


@click.group(cls=ErrorReportingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="interop")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Move Megatron checkpoints and indexed datasets between Megatron-LM, Megatron-Core and
    Hugging Face Transformers at any TP/PP/DP layout; train and generate with Megatron-Core."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    from interop.cli.quiet import silence_dependency_warnings

    silence_dependency_warnings()
    install_signal_handlers()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="interop")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
