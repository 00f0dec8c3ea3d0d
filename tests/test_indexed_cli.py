"""`interop data …` end to end on a real corpus (stdlib sources, a BPE tokenizer trained here). Oracle for
preprocess: a Megatron-LM-style run (Transformers' own tokenizer call per document + Megatron-Core's
IndexedDatasetBuilder), which must give byte-identical files."""
import glob
import json
import os
import sysconfig

import numpy as np
import pytest
from click.testing import CliRunner

from formats.indexed import dtype_for_vocab, open_dataset
from interop import cli as cli_module
from interop.data.train_tokenizer import train_bpe_tokenizer

mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def run(*args, ok=True):
    result = CliRunner().invoke(cli_module.cli, list(args))
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "json", "*.py")) + glob.glob(os.path.join(stdlib, "email", "*.py")))
    tok_dir = train_bpe_tokenizer(files, str(root / "tok"), vocab_size=600)
    texts = [open(f, encoding="utf-8").read() for f in files]
    docs = [{"text": t, "title": os.path.basename(f)} for t, f in zip(texts, files)]
    docs[3]["text"] = ""  # an empty document: a repeated document-index entry, no sequence, no EOD
    jsonl = root / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return {"root": root, "tok": tok_dir, "jsonl": str(jsonl), "docs": docs, "files": files}


def _megatron_style(corpus, key, out_prefix):
    """What Megatron-LM's preprocess_data.py does per document (docs/indexed-formats.md §3), with Megatron-Core's builder."""
    from transformers import AutoTokenizer
    import torch

    tok = AutoTokenizer.from_pretrained(corpus["tok"])
    builder = mcore.IndexedDatasetBuilder(out_prefix + ".bin", dtype=dtype_for_vocab(len(tok)).type)
    for doc in corpus["docs"]:
        ids = tok(doc[key]).input_ids
        if ids:
            ids = ids + [tok.eos_token_id]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)] if ids else [])
    builder.finalize(out_prefix + ".idx")


@pytest.fixture(scope="module")
def preprocessed(corpus):
    prefix = str(corpus["root"] / "out")
    run("data", "preprocess", "--input", corpus["jsonl"], "--tokenizer", corpus["tok"], "--output-prefix", prefix,
        "--json-keys", "text,title", "--append-eod", "--workers", "2")
    return prefix


def test_preprocess_is_byte_identical_to_megatron_lm_style(corpus, preprocessed):
    for key in ("text", "title"):
        ref = str(corpus["root"] / f"ref_{key}")
        _megatron_style(corpus, key, ref)
        for ext in (".bin", ".idx"):
            assert open(f"{preprocessed}_{key}_document{ext}", "rb").read() == open(ref + ext, "rb").read(), (key, ext)
    ds = open_dataset(f"{preprocessed}_text_document")
    assert ds.dtype == np.uint16 and ds.num_documents == len(corpus["docs"]) == len(ds) + 1
    assert ds.document_indices[3] == ds.document_indices[4]  # the empty document


def test_tokenizer_json_and_text_inputs(corpus, tmp_path):
    prefix = str(tmp_path / "txt")
    files = corpus["files"][:5]
    run("data", "preprocess", *[a for f in files for a in ("--input", f)], "--tokenizer", os.path.join(corpus["tok"], "tokenizer.json"),
        "--output-prefix", prefix)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(corpus["tok"])
    ds = open_dataset(prefix + "_text_document")
    assert [x.tolist() for x in ds] == [tok(open(f, encoding="utf-8").read()).input_ids for f in files]
    lines = str(tmp_path / "lines")
    run("data", "preprocess", "--input", files[0], "--tokenizer",
        corpus["tok"], "--output-prefix", lines, "--text-unit", "line", "--impl", "lazy")
    ds = open_dataset(lines + "_text_document")
    n_lines = sum(1 for line in open(files[0], encoding="utf-8") if line.strip())
    assert ds.variant.value == "tntidx" and ds.dtype == np.int32 and len(ds) == n_lines


def test_inspect_verify_convert_merge(corpus, preprocessed, tmp_path):
    prefix = f"{preprocessed}_text_document"
    info = json.loads(run("data", "inspect", prefix, "--json").output)
    ds = open_dataset(prefix)
    assert info["variant"] == "mmap" and info["tokens"] == ds.num_tokens and info["empty_documents"] == 1
    assert info["sequences"] == len(ds) and info["sequence_length"]["p100"] == int(ds.sizes.max())
    assert "ok   bin size" in run("data", "verify", prefix).output
    run("data", "convert", prefix, str(tmp_path / "legacy"), "--impl", "lazy")
    run("data", "convert", str(tmp_path / "legacy"), str(tmp_path / "back"), "--impl", "mmap", "--dtype", "uint16")
    for ext in (".bin", ".idx"):
        assert open(prefix + ext, "rb").read() == open(str(tmp_path / "back") + ext, "rb").read()
    os.makedirs(tmp_path / "parts")
    run("data", "convert", prefix, str(tmp_path / "parts" / "b"))
    run("data", "convert", f"{preprocessed}_title_document", str(tmp_path / "parts" / "a"))
    run("data", "merge", str(tmp_path / "merged"), str(tmp_path / "parts"))
    b = mcore.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for name in ("a", "b"):  # merge_datasets.py order: sorted names
        b.add_index(str(tmp_path / "parts" / name))
    b.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert open(str(tmp_path / "merged") + ext, "rb").read() == open(str(tmp_path / "ref") + ext, "rb").read()


def test_errors_are_one_line_exit_2(corpus, preprocessed, tmp_path):
    prefix = f"{preprocessed}_text_document"
    cases = [
        (["data", "inspect", str(tmp_path / "nothing")], "nothing.idx: missing file"),
        (["data", "preprocess", "--input", corpus["jsonl"], "--tokenizer", corpus["tok"], "--output-prefix",
          preprocessed], "exists (use --force"),
        (["data", "preprocess", "--input", str(tmp_path / "*.nope"), "--tokenizer", corpus["tok"],
          "--output-prefix", str(tmp_path / "x")], "glob matches no file"),
        (["data", "convert", prefix, str(tmp_path / "small"), "--dtype", "int8"], "do not fit"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    cases.append((["data", "preprocess", "--input", str(bad), "--tokenizer", corpus["tok"], "--output-prefix",
                   str(tmp_path / "y")], "bad.jsonl: line 2: missing key(s) ['text']"))
    try:
        import sentencex  # noqa: F401
    except ImportError:  # the offline splitter is an optional extra: a clear error without it
        cases.append((["data", "preprocess", "--input", corpus["jsonl"], "--tokenizer", corpus["tok"],
                       "--output-prefix", str(tmp_path / "z"), "--split-sentences"], "needs the 'sentencex' package"))
    trunc = tmp_path / "trunc"
    (tmp_path / "trunc.idx").write_bytes(open(prefix + ".idx", "rb").read()[:-5])
    (tmp_path / "trunc.bin").write_bytes(open(prefix + ".bin", "rb").read())
    cases.append((["data", "verify", str(trunc)], "truncated or corrupt"))
    cases.append((["data", "inspect", str(trunc)], "trunc.idx: truncated or corrupt"))
    for args, message in cases:
        result = run(*args, ok=False)
        assert result.exit_code == 2, (args, result.output)
        err = result.stderr.strip().splitlines()[-1]
        assert err.startswith("error: ") and message in err, (args, err)
        assert "Traceback" not in result.output
    assert not glob.glob(str(tmp_path / "*.tmp-*")) and not os.path.exists(tmp_path / "small.bin")


def test_process_pool_path_for_slow_tokenizers(corpus, preprocessed, tmp_path, monkeypatch):
    """Tokenizers without a Rust backend are encoded by a process pool; the output must not change."""
    import dataclasses
    import importlib

    pre = importlib.import_module("interop.data.preprocess")

    real = pre.load_tokenizer
    monkeypatch.setattr(pre, "load_tokenizer", lambda *a: dataclasses.replace(real(*a), backend=None))
    out = str(tmp_path / "pool")
    pre.preprocess(pre.PreprocessConfig([corpus["jsonl"]], corpus["tok"], out, ["text", "title"], append_eod=True,
                                        workers=2, batch_size=7, progress=False))
    for key in ("text", "title"):
        for ext in (".bin", ".idx"):
            assert open(f"{out}_{key}_document{ext}", "rb").read() == open(f"{preprocessed}_{key}_document{ext}", "rb").read()
