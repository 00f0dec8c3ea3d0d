"""CLI spellings and defaults: ``--tp``/``--tp-degree`` (and pp, vpp) are one option on every command that has the
setting, generation has one ``max_new_tokens`` default (the library's), and the convert/reshape format choices
are the format registry's."""
from __future__ import annotations

import pytest

from interop.cli.convert_cmd import FORMAT_CHOICE, convert_command, reshape_command
from interop.cli.generate_cmd import generate_command
from interop.cli.train_cmd import train_command


def _params(command, args):
    return command.make_context(command.name, list(args)).params


@pytest.fixture
def src(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "cfg.yaml").write_text("{}\n")
    return tmp_path


@pytest.mark.parametrize("short,long,dest", [("--tp", "--tp-degree", "tp"), ("--pp", "--pp-degree", "pp"),
                                             ("--vpp", "--vpp-degree", "vpp")])
def test_convert_and_reshape_accept_both_spellings(src, short, long, dest):
    base = [str(src / "src"), str(src / "dst")]
    assert _params(convert_command, base + [short, "3"])[dest] == 3
    assert _params(convert_command, base + [long, "3"])[dest] == 3
    need = ["--tp", "1", "--pp", "1"]
    assert _params(reshape_command, base + need + [short, "4"])[dest] == 4
    assert _params(reshape_command, base + need + [long, "4"])[dest] == 4


@pytest.mark.parametrize("short,long,dest", [("--tp", "--tp-degree", "tp_degree"), ("--pp", "--pp-degree", "pp_degree"),
                                             ("--vpp", "--vpp-degree", "vpp_degree")])
def test_train_accepts_both_spellings(src, short, long, dest):
    cfg = str(src / "cfg.yaml")
    assert _params(train_command, [cfg, short, "2"])[dest] == 2
    assert _params(train_command, [cfg, long, "2"])[dest] == 2
    assert _params(train_command, [cfg])[dest] is None  # left out: the config's value stands


def test_generate_accepts_both_spellings(src):
    ckpt = str(src / "src")
    assert _params(generate_command, [ckpt, "--tp-degree", "2", "--pp", "2"])["tp"] == 2
    assert _params(generate_command, [ckpt, "--tp", "2", "--pp-degree", "2"])["pp"] == 2


def test_generate_uses_the_library_max_new_tokens_default(src, monkeypatch):
    import interop.checkpoints
    import trainer.generate_text
    from trainer.generate import GenerationConfig

    seen = []
    monkeypatch.setattr(interop.checkpoints, "require_capability", lambda path, what: None)
    monkeypatch.setattr(trainer.generate_text, "generate_text", lambda request: seen.append(request) or [])
    default = GenerationConfig().max_new_tokens
    generate_command.main([str(src / "src"), "--prompt", "hi"], standalone_mode=False)
    generate_command.main([str(src / "src"), "--prompt", "hi", "--max-new-tokens", "5"], standalone_mode=False)
    assert [r.config.max_new_tokens for r in seen] == [default, 5]
    help_text = generate_command.get_help(generate_command.make_context("generate", [str(src / "src")]))
    assert f"default: {default}," in " ".join(help_text.split())


def test_format_choices_are_the_registry_formats():
    from formats.checkpoint import format_names
    from interop.conversion import FORMATS, LEGACY

    assert sorted(FORMAT_CHOICE.choices) == sorted(FORMATS) == sorted([*format_names(kind="megatron"), LEGACY])
