"""``interop data preprocess --split-sentences`` offline (sentencex, no download): one indexed-dataset sequence per
sentence, one document per input document, read back by Megatron-Core's own ``IndexedDataset``; the oracle is
``sentencex.segment`` itself + the tokenizer, so the file holds exactly the splitter's sentences. Without the
package the flag is a one-line error (exit 2)."""
import json
import sys

import pytest
from click.testing import CliRunner

from interop import cli as cli_module
from tests.encoder_train_helpers import write_wordpiece_tokenizer

pytest.importorskip("sentencex")

DOCS = [
    "w5 w6 w7. Dr. w8 w9 went home! Was it w10? Yes w11 w12.",
    "w20 w21 w22 w23.",
    "Mr. w30 arrived at 5 p.m. on w31. He left w32 w33.",
]


def _write_inputs(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return str(path)


def test_split_sentences_writes_one_sequence_per_sentence(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from sentencex import segment
    from tokenizers import Tokenizer

    tok_path = write_wordpiece_tokenizer(str(tmp_path / "tok"))
    prefix = str(tmp_path / "out")
    result = CliRunner().invoke(cli_module.cli, ["data", "preprocess", "--input", _write_inputs(tmp_path),
                                                 "--tokenizer", tok_path, "--output-prefix", prefix,
                                                 "--split-sentences"])
    assert result.exit_code == 0, (result.output, result.exception)
    ds = IndexedDataset(prefix + "_text_sentence")
    tok = Tokenizer.from_file(tok_path)
    expected = [[tok.encode(s.strip()).ids for s in segment("en", d) if s.strip()] for d in DOCS]
    assert [len(e) for e in expected] == [4, 1, 2]  # abbreviations (Dr., p.m., Mr.) do not end sentences
    bounds = ds.document_indices
    assert len(bounds) - 1 == len(DOCS)
    for d, sentences in enumerate(expected):
        got = [ds[i].tolist() for i in range(bounds[d], bounds[d + 1])]
        assert got == sentences


def test_split_sentences_without_sentencex_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencex", None)  # import fails as if not installed
    tok_path = write_wordpiece_tokenizer(str(tmp_path / "tok"))
    result = CliRunner().invoke(cli_module.cli, ["data", "preprocess", "--input", _write_inputs(tmp_path),
                                                 "--tokenizer", tok_path, "--output-prefix", str(tmp_path / "o"),
                                                 "--split-sentences"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "sentencex" in lines[0] and "Traceback" not in result.output
    assert not list(tmp_path.glob("o_*"))
