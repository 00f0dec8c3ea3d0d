"""Indexed-dataset benchmarks (issue 3), all in one run so the ratios share one machine state:

  (a) preprocess tokens/s: ``interop data preprocess`` vs a Megatron-LM-style baseline (same tokenizer,
      per-document ``tokenizer(text)`` in a ``multiprocessing.Pool`` of the same size, feeding Megatron-Core's
      ``IndexedDatasetBuilder``, as tools/preprocess_data.py does), on the Python stdlib's sources as one
      document per file (long documents) and one per blank-line-separated block (short documents);
  (b) random ``ds[i]`` and ``ds.get(i, off, n)`` reads/s vs Megatron-Core's ``IndexedDataset``;
  (c) peak RSS of merging 20 datasets (50M tokens in all, and 0.1x / 4x that), ours vs Megatron-Core's
      ``add_index`` (merge_datasets.py), each in a fresh process (its own VmHWM).

Usage: .venv/bin/python tools/bench/bench_indexed.py [--workers 2] [--tokens 50000000] [--out DIR]
Prints a Markdown section (paste it into BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
STDLIB = "/root/.pyenv/versions/3.11.7/lib/python3.11"

BASELINE_PREPROCESS = r'''
import json, sys, time, multiprocessing
import numpy as np
from transformers import AutoTokenizer
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, DType
tok_dir, corpus, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

class Encoder:  # as Megatron-LM tools/preprocess_data.py: one tokenizer per worker, one call per document
    def initializer(self):
        Encoder.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    def encode(self, line):
        ids = Encoder.tokenizer(json.loads(line)["text"]).input_ids
        if ids:
            ids.append(Encoder.tokenizer.eos_token_id)
        return ids, ([len(ids)] if ids else []), len(line)

t0 = time.perf_counter()
encoder = Encoder()
vocab = len(AutoTokenizer.from_pretrained(tok_dir))
pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
builder = IndexedDatasetBuilder(out + ".bin", dtype=DType.optimal_dtype(vocab))
tokens = 0
with open(corpus, encoding="utf-8") as fin:
    for ids, lens, _ in pool.imap(encoder.encode, fin, 32):
        builder.add_document(ids, lens)
        tokens += len(ids)
builder.finalize(out + ".idx")
pool.close()
pool.join()
print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0}))
'''

OURS_PREPROCESS = r'''
import json, sys, time
from transformers import AutoTokenizer  # imported before the clock starts, as in the baseline
from interop.data.preprocess import PreprocessConfig, preprocess
t0 = time.perf_counter()
tok_dir, corpus, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
r = preprocess(PreprocessConfig([corpus], tok_dir, out, append_eod=True, workers=workers, force=True, progress=False))
print(json.dumps({"tokens": r.tokens, "seconds": time.perf_counter() - t0}))
'''

BASELINE_MERGE = r'''
import sys
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, IndexedDataset
out, prefixes = sys.argv[1], sys.argv[2:]
if prefixes:  # as tools/merge_datasets.py
    builder = IndexedDatasetBuilder(out + ".bin", dtype=IndexedDataset(prefixes[0]).index.dtype)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(out + ".idx")
'''


def run_json(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; its last stdout line is JSON. Adds ``cpu``: CPU seconds of the
    process and the children it waited for (the baseline's pool workers), from ``wait4``."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"})
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(stderr.decode()[-2000:])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    result["cpu"] = usage.ru_utime + usage.ru_stime - run_json.cpu_seen
    run_json.cpu_seen = usage.ru_utime + usage.ru_stime
    return result


run_json.cpu_seen = 0.0


HWM_WRAPPER = r"""
import atexit, runpy, sys
def _report():
    status = open("/proc/self/status").read()
    sys.stderr.write("VmHWM-kB " + status.split("VmHWM:")[1].split()[0] + "\n")
atexit.register(_report)
mode, target, *rest = sys.argv[1:]
sys.argv = [target, *rest]
if mode == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    exec(compile(target, "<bench>", "exec"), {"__name__": "__main__"})
"""


def peak_rss_mb(mode: str, target: str, *args: str) -> float:
    """Peak RSS (MiB) of running a module (``mode="module"``) or code, from the process's own VmHWM.

    VmHWM is per address space and resets at exec; ``wait4``'s ru_maxrss would not (it keeps the forking
    parent's high-water mark), which made small commands look as large as this benchmark process."""
    out = subprocess.run([sys.executable, "-c", HWM_WRAPPER, mode, target, *args], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stderr.rsplit("VmHWM-kB ", 1)[1].split()[0]) / 1024


def write_corpora(work: str, style: str = "gpt2") -> tuple[str, dict[str, str]]:
    """Two JSONL corpora from the same stdlib sources: one document per file (long, ~5k tokens) and one per
    blank-line-separated block (short, ~100 tokens, like web text paragraphs); and the tokenizer (GPT-2 or
    Llama-3 pipeline, see ``train_bpe_tokenizer``)."""
    from interop.data.train_tokenizer import train_bpe_tokenizer

    files = sorted(f for f in glob.glob(os.path.join(STDLIB, "**", "*.py"), recursive=True) if "site-packages" not in f)
    tok_dir = train_bpe_tokenizer(files[::4], os.path.join(work, "tok"), vocab_size=8192, style=style)
    corpora = {"files": os.path.join(work, "files.jsonl"), "blocks": os.path.join(work, "blocks.jsonl")}
    with open(corpora["files"], "w", encoding="utf-8") as by_file, open(corpora["blocks"], "w", encoding="utf-8") as by_block:
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            by_file.write(json.dumps({"text": text}) + "\n")
            for block in text.split("\n\n"):
                if block.strip():
                    by_block.write(json.dumps({"text": block}) + "\n")
    return tok_dir, corpora


def bench_preprocess(work: str, tok_dir: str, corpus: str, workers: int, reps: int) -> dict:
    results = {"ours": [], "baseline": []}
    for _ in range(reps):  # alternate, so both see the same load
        results["baseline"].append(run_json(BASELINE_PREPROCESS, tok_dir, corpus, os.path.join(work, "base"), str(workers)))
        results["ours"].append(run_json(OURS_PREPROCESS, tok_dir, corpus, os.path.join(work, "ours"), str(workers)))
    same = all(open(os.path.join(work, "base") + e, "rb").read() == open(os.path.join(work, "ours_text_document") + e, "rb").read()
               for e in (".bin", ".idx"))
    best = {k: max(r["tokens"] / r["seconds"] for r in v) for k, v in results.items()}
    per_cpu = {k: max(r["tokens"] / r["cpu"] for r in v) for k, v in results.items()}
    with open(corpus, encoding="utf-8") as f:
        docs = sum(1 for _ in f)
    return {"docs": docs, "mb": os.path.getsize(corpus) / 2**20, "tokens": results["ours"][0]["tokens"],
            "ours_tok_s": best["ours"], "baseline_tok_s": best["baseline"], "identical": same,
            "ours_tok_cpu": per_cpu["ours"], "baseline_tok_cpu": per_cpu["baseline"],
            "ours_all": [round(r["tokens"] / r["seconds"]) for r in results["ours"]],
            "baseline_all": [round(r["tokens"] / r["seconds"]) for r in results["baseline"]]}


def make_parts(work: str, total_tokens: int, parts: int, tag: str) -> list[str]:
    from formats.indexed import create_writer

    rng = np.random.default_rng(0)
    prefixes = []
    os.makedirs(os.path.join(work, tag), exist_ok=True)
    for k in range(parts):
        prefix = os.path.join(work, tag, f"part{k:02d}")
        left = total_tokens // parts
        with create_writer(prefix, dtype=np.uint16, force=True) as w:
            while left > 0:
                lengths = rng.integers(1, 200, size=100_000)  # ~100 tokens per sequence: index-heavy
                lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), left)) + 1]
                lengths[-1] -= max(0, int(lengths.sum()) - left)
                lengths = lengths[lengths > 0]
                w.add_documents(rng.integers(0, 8192, size=int(lengths.sum()), dtype=np.uint16), lengths)
                left -= int(lengths.sum())
        prefixes.append(prefix)
    return prefixes


def bench_merge(work: str, total_tokens: int, factors: list[float]) -> dict:
    out = {}
    sizes = sorted({int(total_tokens * f) for f in factors} | {total_tokens})
    for tokens in sizes:
        tag = "full" if tokens == total_tokens else f"t{tokens}"
        prefixes = make_parts(work, tokens, 20, tag)
        size = sum(os.path.getsize(p + e) for p in prefixes for e in (".bin", ".idx")) / 2**20
        ours = peak_rss_mb("module", "interop", "data", "merge", os.path.join(work, f"merged-{tag}"), *prefixes, "--force")
        ours_idle = peak_rss_mb("code", "import numpy, tqdm, formats.indexed, interop.cli.data_cmd")
        base = peak_rss_mb("code", BASELINE_MERGE, os.path.join(work, f"base-{tag}"), *prefixes)
        base_idle = peak_rss_mb("code", BASELINE_MERGE, os.path.join(work, "none"))
        same = all(open(os.path.join(work, f"merged-{tag}") + e, "rb").read() == open(os.path.join(work, f"base-{tag}") + e, "rb").read()
                   for e in (".bin", ".idx"))
        from formats.indexed import open_dataset

        n_seq = len(open_dataset(os.path.join(work, f"merged-{tag}")))
        out[tag] = {"tokens": tokens, "sequences": n_seq, "input_mb": size, "ours_peak": ours, "ours_idle": ours_idle,
                    "base_peak": base, "base_idle": base_idle, "identical": same}
    return out


def bench_reads(prefix: str, n: int = 200_000, reps: int = 3) -> dict:
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MC

    from formats.indexed import open_dataset

    ours, ref = open_dataset(prefix), MC(prefix)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(ours), size=n).tolist()
    offs = [(i, min(3, int(ours.sizes[i]) - 1)) for i in idx]

    def getitem(ds):
        t = time.perf_counter()
        for i in idx:
            ds[i]
        return n / (time.perf_counter() - t)

    def get(ds):
        t = time.perf_counter()
        for i, o in offs:
            ds.get(i, offset=o, length=1)
        return n / (time.perf_counter() - t)

    res = {"ours_getitem": 0, "mc_getitem": 0, "ours_get": 0, "mc_get": 0}
    for _ in range(reps):
        res["mc_getitem"] = max(res["mc_getitem"], getitem(ref))
        res["ours_getitem"] = max(res["ours_getitem"], getitem(ours))
        res["mc_get"] = max(res["mc_get"], get(ref))
        res["ours_get"] = max(res["ours_get"], get(ours))
    for i in idx[:1000]:
        assert np.array_equal(ours[i], ref[i])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--merge-factors", default="0.1,1,4", help="merge sizes as multiples of --tokens (RSS flatness)")
    ap.add_argument("--out", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["preprocess", "reads", "merge"])
    ap.add_argument("--tokenizer-style", default="gpt2", choices=["gpt2", "llama3"],
                    help="(a)'s tokenizer: GPT-2's ByteLevel pipeline (as the demo) or Llama-3's Split+ByteLevel with a BOS")
    args = ap.parse_args()
    work_ctx = tempfile.TemporaryDirectory(prefix="bench-indexed-") if args.out is None else None
    work = args.out or work_ctx.name
    os.makedirs(work, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"## Indexed datasets ({started}, {platform.node()}, {os.cpu_count()} cores, "
             f"load avg {os.getloadavg()[0]:.1f} at start)", "",
             f"Command: `.venv/bin/python tools/bench/bench_indexed.py {' '.join(sys.argv[1:])}`".rstrip(), ""]
    if "preprocess" not in args.skip:
        tok_dir, corpora = write_corpora(work, args.tokenizer_style)
        lines += [f"(a) preprocess, stdlib .py sources as JSONL, byte-level BPE (vocab 8192, {args.tokenizer_style} "
                  "pipeline), --append-eod, "
                  f"{args.workers} workers each, runs alternated, best of {args.reps}; wall tokens/s (all runs) and "
                  "tokens per CPU-second (process + pool children, from rusage; load-independent):", "",
                  "| corpus | docs | tokens | baseline tok/s | ours tok/s | wall ratio | baseline tok/CPU-s | ours tok/CPU-s "
                  "| CPU ratio | byte-identical |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, corpus in corpora.items():
            p = bench_preprocess(work, tok_dir, corpus, args.workers, args.reps)
            lines.append(f"| {name} ({p['mb']:.0f} MiB) | {p['docs']:,} | {p['tokens']:,} | {p['baseline_tok_s']:,.0f} "
                         f"{p['baseline_all']} | {p['ours_tok_s']:,.0f} {p['ours_all']} | "
                         f"**{p['ours_tok_s'] / p['baseline_tok_s']:.2f}x** | {p['baseline_tok_cpu']:,.0f} | "
                         f"{p['ours_tok_cpu']:,.0f} | **{p['ours_tok_cpu'] / p['baseline_tok_cpu']:.2f}x** | {p['identical']} |")
        lines += ["", "Baseline = Megatron-LM tools/preprocess_data.py's structure: `Pool(workers).imap(encode, lines, 32)`, "
                  "per-document `AutoTokenizer(text).input_ids`, Megatron-Core `IndexedDatasetBuilder.add_document`."]
        lines.append("")
    merge = None
    if "merge" not in args.skip or "reads" not in args.skip:
        merge = bench_merge(work, args.tokens, [float(f) for f in args.merge_factors.split(",")])
    if "reads" not in args.skip:
        r = bench_reads(os.path.join(work, "merged-full"))
        lines += [f"(b) random reads on the merged dataset ({merge['full']['sequences']:,} sequences, "
                  f"{merge['full']['tokens']:,} uint16 tokens), 200k random indices, best of 3:", "",
                  "| | Megatron-Core `IndexedDataset` | ours | ratio |", "|---|---:|---:|---:|",
                  f"| `ds[i]` reads/s | {r['mc_getitem']:,.0f} | {r['ours_getitem']:,.0f} | **{r['ours_getitem'] / r['mc_getitem']:.2f}x** |",
                  f"| `ds.get(i, offset, length)` reads/s | {r['mc_get']:,.0f} | {r['ours_get']:,.0f} | **{r['ours_get'] / r['mc_get']:.2f}x** |", ""]
    if "merge" not in args.skip:
        lines += ["(c) peak RSS of merging 20 datasets (fresh process each, its own VmHWM; 'idle' = the same "
                  "process doing no merge, i.e. interpreter + imports):", "",
                  "| tokens | sequences | inputs (MiB) | ours peak / idle (MiB) | ours growth | Megatron-Core peak / idle (MiB) | MC growth | identical |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for tag, m in sorted(merge.items(), key=lambda kv: kv[1]["tokens"]):
            lines.append(f"| {m['tokens']:,} | {m['sequences']:,} | {m['input_mb']:.0f} | {m['ours_peak']:.0f} / {m['ours_idle']:.0f} | "
                         f"{m['ours_peak'] - m['ours_idle']:.0f} | {m['base_peak']:.0f} / {m['base_idle']:.0f} | "
                         f"{m['base_peak'] - m['base_idle']:.0f} | {m['identical']} |")
        lines.append("")
    print("\n".join(lines))
    if work_ctx is not None:
        work_ctx.cleanup()


if __name__ == "__main__":
    main()
