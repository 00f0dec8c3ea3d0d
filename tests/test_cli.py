"""The CLI skeleton: version, help, and the one error convention."""
import subprocess
import sys

import click
from click.testing import CliRunner

from formats.errors import FormatError
from interop import cli as cli_module


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(cli_module.cli, ["--version"])
    assert result.exit_code == 0 and "interop, version" in result.output
    result = runner.invoke(cli_module.cli, ["--help"])
    assert result.exit_code == 0 and "Hugging Face" in result.output


def test_console_script_runs_without_importing_torch():
    code = "import sys; from interop.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_project_errors_become_one_line_and_exit_2(monkeypatch):
    @click.command("explode")
    def explode():
        raise FormatError("bad magic 'XXXX' (expected MMIDIDX)", path="/tmp/x.idx")

    monkeypatch.setitem(cli_module.COMMANDS, "explode", "tests.test_cli:_EXPLODE")
    globals()["_EXPLODE"] = explode
    runner = CliRunner()
    result = runner.invoke(cli_module.cli, ["explode"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: /tmp/x.idx: bad magic 'XXXX' (expected MMIDIDX)"
    assert "Traceback" not in result.output
    debug = runner.invoke(cli_module.cli, ["--debug", "explode"])
    assert isinstance(debug.exception, FormatError)


def test_unknown_command_is_usage_error():
    result = CliRunner().invoke(cli_module.cli, ["no-such-command"])
    assert result.exit_code == 2
