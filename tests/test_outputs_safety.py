"""Outputs are whole or absent and never replace what they must not (issue 16, items 5-7).

5: ``--force`` refuses an output that is, contains or lies inside a source, and replaces only outputs of
   its own kind. 6: the final rename never replaces an output that appeared meanwhile (two real processes
   racing, and the rename primitive itself with and without ``renameat2``). 7: SIGTERM and a full disk
   (a real write failure under ``RLIMIT_FSIZE``, and ``ENOSPC`` injected) leave no temporaries and print one
   line; temporaries of dead runs are swept, those of live ones kept.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from formats import staging
from tests.sec_cli_helpers import (
    PY,
    child_env,
    cli,
    cli_process,
    leftovers,
    make_hf,
    one_line_error,
    train_yaml,
    tree,
)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from tests.test_trainer_helpers import write_corpus

    root = tmp_path_factory.mktemp("outputs")
    hf = make_hf(root / "models" / "hf")
    (root / "data").mkdir()
    corpus = write_corpus(str(root / "data" / "corpus"), docs=120)
    return root, hf, corpus


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------------------------- item 5
def test_force_never_deletes_a_source_or_foreign_directory(work, tmp_path):
    root, hf, _ = work
    before = tree(root / "models")
    for dst in (hf, hf.parent, hf / "inside"):  # equal, ancestor, inside
        one_line_error(cli("convert", hf, dst, "--force", "--no-progress"), str(dst), "source")
    assert tree(root / "models") == before and not leftovers(root)

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    one_line_error(cli("convert", hf, foreign, "--force", "--no-progress"), "not an output of this kind")
    assert (foreign / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("keep")
    one_line_error(cli("convert", hf, a_file, "--force", "--no-progress"), "not an output of this kind")
    assert a_file.read_text() == "keep"

    out = tmp_path / "meg"  # an output of ours is replaced by --force (and only with it)
    assert cli("convert", hf, out, "--no-progress").exit_code == 0
    one_line_error(cli("convert", hf, out, "--format", "torch", "--no-progress"), "output exists")
    assert (out / "release" / "metadata.json").is_file()
    r = cli("convert", hf, out, "--format", "torch", "--force", "--no-progress")
    assert r.exit_code == 0, r.output
    assert (out / "release" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert not (out / "release" / "metadata.json").exists() and not leftovers(tmp_path)
    one_line_error(cli("reshape", out, out.parent, "--tp", "1", "--pp", "1", "--force", "--no-progress"), "source")


def test_dataset_outputs_never_overwrite_their_inputs(work, tmp_path):
    _, _, corpus = work
    copy = str(tmp_path / "copy")
    assert cli("data", "convert", corpus, copy).exit_code == 0
    before = tree(tmp_path)
    one_line_error(cli("data", "convert", copy, copy, "--force"), "is the source")
    one_line_error(cli("data", "merge", copy, copy, corpus, "--force"), "is the source")
    assert tree(tmp_path) == before
    (tmp_path / "odd.bin").mkdir()  # an output name held by something that is not a file of ours
    one_line_error(cli("data", "convert", copy, tmp_path / "odd", "--force"), "not an output of this kind")
    assert (tmp_path / "odd.bin").is_dir() and not leftovers(tmp_path)


def test_train_save_never_replaces_what_it_reads(work, tmp_path):
    _, _, corpus = work
    import shutil

    save = tmp_path / "save"
    inside = save / "iter_0000002"
    inside.mkdir(parents=True)
    for ext in (".bin", ".idx"):
        shutil.copy(corpus + ext, inside / f"corpus{ext}")
    cfg = train_yaml(tmp_path / "t.yaml", str(inside / "corpus"))
    before = tree(save)
    one_line_error(cli("train", cfg, "--save", save, "--force"), "iteration directory of save")
    one_line_error(cli("train", cfg, "--save", inside / "corpus.bin"), "this is a file")
    assert tree(save) == before


# ----------------------------------------------------------------------------------------------- item 6
@pytest.mark.parametrize("native", [True, False])
def test_rename_noreplace_refuses_an_existing_target(tmp_path, monkeypatch, native):
    if not native:
        monkeypatch.setattr(staging, "_RENAMEAT2", None)  # the link / mkdir-lock fallbacks
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("old")
    with pytest.raises(FileExistsError):
        staging.rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "old" and (tmp_path / "a").exists()
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()  # an EMPTY directory: plain rename(2) would silently replace it
    with pytest.raises(FileExistsError):
        staging.rename_noreplace(tmp_path / "d1", tmp_path / "d2")
    staging.rename_noreplace(tmp_path / "d1", tmp_path / "d3")
    assert (tmp_path / "d3").is_dir() and not (tmp_path / "d1").exists()
    old = staging.replace_swapping(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "new" and old.read_text() == "old"


def test_an_output_that_appears_meanwhile_is_left_alone(work, tmp_path, monkeypatch):
    _, hf, _ = work
    dst = tmp_path / "dst"
    real = staging.rename_noreplace

    def other_run_finishes_first(src, target):
        Path(target).mkdir()
        (Path(target) / "theirs").write_text("other run")
        return real(src, target)

    monkeypatch.setattr(staging, "rename_noreplace", other_run_finishes_first)
    one_line_error(cli("convert", hf, dst, "--no-progress"), "appeared while this run was writing")
    assert tree(dst) == {"theirs": b"other run"} and not leftovers(tmp_path)


def test_two_concurrent_converts_one_wins_the_other_replaces_nothing(work, tmp_path):
    _, hf, _ = work
    dst = tmp_path / "dst"
    env = child_env()
    procs = [subprocess.Popen([PY, "-m", "interop", "convert", str(hf), str(dst), "--no-progress",
                               "--format", fmt], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for fmt in ("torch", "torch_dist")]
    outcomes = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    loser = next(err for code, err in outcomes if code == 2)
    assert "output exists" in loser or "appeared while" in loser, loser
    winner_fmt = ("torch", "torch_dist")[[c for c, _ in outcomes].index(0)]
    has_dist = (dst / "release" / "metadata.json").is_file()
    assert has_dist == (winner_fmt == "torch_dist")  # the winner's output, whole, was not replaced
    assert not leftovers(tmp_path)


# ----------------------------------------------------------------------------------------------- item 7
_SLOW_STREAM = """
import time, interop.conversion as conversion
cast_stream = conversion.cast_stream
def slow(stream, dtype):
    for item in cast_stream(stream, dtype):
        print("streaming", flush=True)
        time.sleep(0.3)
        yield item
conversion.cast_stream = slow
"""


def test_sigterm_mid_write_removes_the_temporary(work, tmp_path):
    _, hf, _ = work
    dst = tmp_path / "dst"
    code = f"import sys\n{_SLOW_STREAM}\nfrom interop.cli import main\nmain(sys.argv[1:])\n"
    env = child_env()
    proc = subprocess.Popen([PY, "-c", code, "convert", str(hf), str(dst), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "streaming"
    assert leftovers(tmp_path)  # mid-write: the temporary exists
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM)" and "Traceback" not in err
    assert not dst.exists() and not leftovers(tmp_path)


def test_stale_temporaries_of_dead_runs_are_swept_live_ones_kept(work, tmp_path):
    _, hf, corpus = work
    dst = tmp_path / "dst"
    dead, live = _dead_pid(), os.getppid()
    for pid in (dead, live):
        (tmp_path / f"dst.tmp-{pid}").mkdir()
    (tmp_path / "dst.old-1x").mkdir()  # not our pattern: never touched
    assert cli("convert", hf, dst, "--no-progress").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["dst", f"dst.tmp-{live}", "dst.old-1x"])

    prefix = tmp_path / "ds"
    (tmp_path / f"ds.bin.tmp-{dead}").write_bytes(b"x")
    (tmp_path / f"ds.lengths.tmp-{dead}").write_bytes(b"x")
    assert cli("data", "convert", corpus, prefix).exit_code == 0
    assert not list(tmp_path.glob(f"ds.*.tmp-{dead}"))

    save = tmp_path / "save"  # a killed training run's iteration and tracker temporaries
    (save / f"iter_0000002.tmp-{dead}").mkdir(parents=True)
    (save / f"latest_checkpointed_iteration.txt.tmp-{dead}").write_text("2")
    staging.sweep_matching(save, r"iter_\d{7,}|latest_checkpointed_iteration\.txt")
    assert list(save.iterdir()) == []


def test_a_killed_force_replace_puts_the_old_output_back(tmp_path):
    old = tmp_path / f"out.old-{_dead_pid()}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    staging.sweep_stale(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file() and not old.exists()


_FULL_DISK = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as a full disk does
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
"""


@pytest.mark.parametrize("command", [
    ["convert", "{hf}", "{out}", "--no-progress"],
    ["convert", "{hf}", "{out}", "--format", "torch", "--no-progress"],
    ["convert", "{meg}", "{out}", "--no-progress"],
    ["data", "convert", "{corpus}", "{out}"],
    ["data", "merge", "{out}", "{corpus}", "{corpus}"],
    ["train", "{yaml}", "--save", "{out}"],
])
def test_a_full_disk_is_one_line_and_leaves_nothing(work, tmp_path, command):
    root, hf, corpus = work
    meg = root / "meg_for_disk"
    if not meg.exists():
        assert cli("convert", hf, meg, "--no-progress").exit_code == 0
    yaml_path = train_yaml(tmp_path / "t.yaml", corpus)
    out = tmp_path / "out"
    args = [a.format(hf=hf, meg=meg, corpus=corpus, out=out, yaml=yaml_path) for a in command]
    result = cli_process(*args, preamble=_FULL_DISK)
    one_line_error(result, "cannot write")
    assert not list(tmp_path.glob("out.*")) and not leftovers(tmp_path)
    if command[0] == "train":  # the run's directory (metrics) stays; no checkpoint, no tracker
        assert not list(out.glob("iter_*")) and not (out / "latest_checkpointed_iteration.txt").exists()
    else:
        assert not out.exists()


def test_enospc_in_any_write_is_one_line(work, tmp_path, monkeypatch):
    _, hf, corpus = work
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    meg = tmp_path / "meg"
    assert cli("convert", hf, meg, "--no-progress").exit_code == 0
    import formats.checkpoint.rangewrite as rangewrite

    monkeypatch.setattr(rangewrite.os, "pwrite", no_space)  # every tensor byte of the streaming writers
    one_line_error(cli("convert", meg, tmp_path / "back", "--no-progress"), "back: cannot write: No space left")
    one_line_error(cli("convert", hf, tmp_path / "torch", "--format", "torch", "--no-progress"),
                   "torch: cannot write: No space left")
    monkeypatch.undo()
    assert not leftovers(tmp_path) and not (tmp_path / "back").exists()
    import formats.indexed.writer as indexed_writer

    monkeypatch.setattr(indexed_writer.IndexedWriter, "_write_mmap_index", no_space)
    one_line_error(cli("data", "convert", corpus, tmp_path / "ds"), "ds.bin: cannot write: No space left")
    assert not list(tmp_path.glob("ds*"))


_SLOW_PUBLISH = """
import time, trainer.checkpoint as checkpoint
_publish = checkpoint._publish
def slow(*args, **kwargs):
    print("saved", flush=True)
    time.sleep(60)
    return _publish(*args, **kwargs)
checkpoint._publish = slow
"""


def test_sigterm_during_train_save_leaves_no_iteration_temporary(work, tmp_path):
    _, _, corpus = work
    cfg = train_yaml(tmp_path / "t.yaml", corpus)
    save = tmp_path / "save"
    code = f"import sys\n{_SLOW_PUBLISH}\nfrom interop.cli import main\nmain(sys.argv[1:])\n"
    env = child_env()
    proc = subprocess.Popen([PY, "-c", code, "train", str(cfg), "--save", str(save)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved"
        assert list(save.glob("iter_0000002.tmp-*"))  # the whole iteration is written, not yet published
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM)"
    assert not list(save.glob("iter_*")) and not (save / "latest_checkpointed_iteration.txt").exists()
    assert not leftovers(save)


def _wait_on_queue(queue):
    queue.get()  # blocks until terminated


def test_a_forked_worker_still_dies_on_sigterm_under_the_cli_handler():
    """The CLI's SIGTERM handler (raise, so cleanups run) is inherited by forked pool workers; there SIGTERM must
    keep its default action, or ``Pool.terminate()`` (every multi-worker ``data preprocess``) waits forever."""
    import multiprocessing

    from interop.cli import install_signal_handlers

    before = signal.getsignal(signal.SIGTERM)
    install_signal_handlers()
    try:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.SimpleQueue()
        proc = ctx.Process(target=_wait_on_queue, args=(queue,))
        proc.start()
        time.sleep(0.5)
        proc.terminate()
        proc.join(timeout=20)
        assert proc.exitcode == -signal.SIGTERM, proc.exitcode
    finally:
        signal.signal(signal.SIGTERM, before)
