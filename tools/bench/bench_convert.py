"""Benchmark: HF -> Megatron TP2xPP2 -> HF on a GPT-2-XL-shaped random fp32 checkpoint (1.56 B parameters).

Each step runs as its own process under ``/usr/bin/time -v`` (wall time, peak RSS), in one job, and every step
(``cp`` included) starts from the same state (``--settle``, the default): outputs of earlier steps removed, ``sync``
(no dirty pages left to throttle the step), the step's source files read once (hot in the page cache). Two measures
per step: "to page cache" (the process's wall time, what the old runs reported) and "durable" (the step plus a
timed ``sync`` of what it wrote). ``--no-settle`` reproduces the old back-to-back runs (a step then started with
the previous step's dirty pages still being written back, while ``cp`` ran first on a clean cache). ``--fill-free``
additionally starts every step with (almost) no free memory, the case where ``cp`` is fastest on this VM (see
``fill_free_memory``).
  cp -r            the HF directory copied (throughput reference, target: convert >= 0.8x of its bytes/s)
  convert          ``interop convert`` HF -> Megatron (torch and torch_dist), then Megatron -> HF
  naive            load-everything conversion in the same job (all tensors in memory, then written)
  baseline         the interpreter with our imports only (the RSS floor of any Python step)
  floor            (``--floor``) what any converter must at least do, in the same job as ``cp -r``: start Python
                   and ``import torch``; copy the same bytes with our writer (``RangeWriter``, O_DIRECT,
                   no CRC, no zip, source mapped) in 64 MiB pieces, tensor by tensor, and tensor by tensor with
                   every GPT-2 Conv1D weight transposed on the way (one strided copy each, as HF <-> Megatron needs);
                   and without torch (``import numpy`` only): the files copied in the kernel (``copy_file_range``,
                   what ``cp`` does) and with the Conv1D weights transposed by numpy (see ``torchless_floor``)
The round trip is checked tensor by tensor against the source (fp32, bit-exact).

``--family bert``: the same steps for a BERT-large-shaped (340M) ``MegatronBertForPreTraining`` (hidden 1024, 24
layers, 16 heads, vocab 30522, 512 positions, binary head) at Megatron TP2 (PP1).

GPT-2-XL has 25 heads, which TP=2 cannot split; the benchmark keeps every other GPT-2-XL dimension (hidden 1600,
48 layers, vocab 50257, 1024 positions) and uses 32 heads (head dim 50): same parameter count and tensor shapes.

    .venv/bin/python tools/bench/bench_convert.py [--family gpt2|bert] [--shape xl|medium|tiny|large]
        [--workdir /tmp/bench-convert]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = {
    "xl": dict(n_embd=1600, n_layer=48, n_head=32, vocab_size=50257, n_positions=1024),
    "medium": dict(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257, n_positions=1024),
    "tiny": dict(n_embd=128, n_layer=4, n_head=4, vocab_size=1000, n_positions=128),
}
BERT_SHAPES = {
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  vocab_size=30522, max_position_embeddings=512),
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                 vocab_size=1000, max_position_embeddings=128),
}
#: family -> (default shape, Megatron TP, PP of the benchmark)
FAMILIES = {"gpt2": ("xl", 2, 2), "bert": ("large", 2, 1)}


# ----------------------------------------------------------------------------------------------------------
# the random checkpoint


def make_hf(path: str, shape: str, family: str = "gpt2") -> None:
    """A random GPT-2 / Megatron-BERT checkpoint written shard by shard (never the whole model in memory)."""
    import torch
    import transformers

    sys.path.insert(0, ROOT)
    from formats.checkpoint import HFCheckpointWriter

    if family == "bert":
        config = transformers.MegatronBertConfig(**BERT_SHAPES[shape], layer_norm_eps=1e-5)
        arch, tied = "MegatronBertForPreTraining", ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
    else:
        config = transformers.GPT2Config(**SHAPES[shape], bos_token_id=0, eos_token_id=0)
        arch, tied = "GPT2LMHeadModel", ("lm_head.weight",)
    with torch.device("meta"):
        meta = getattr(transformers, arch)(config)
    conf = config.to_dict()
    conf["architectures"] = [arch]
    gen = torch.Generator().manual_seed(0)
    with HFCheckpointWriter(path, conf, max_shard_size="2GB") as writer:
        for name, p in meta.state_dict().items():
            if name in tied:
                continue
            writer.add(name, torch.randn(p.shape, generator=gen) * 0.02)
        writer.finalize()


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def tensor_bytes(path: str) -> tuple[int, int]:
    """(total tensor bytes, largest tensor bytes) of an HF checkpoint."""
    sys.path.insert(0, ROOT)
    from formats.checkpoint import open_checkpoint

    infos = open_checkpoint(path).tensors()
    return sum(i.nbytes for i in infos), max(i.nbytes for i in infos)


# ----------------------------------------------------------------------------------------------------------
# the naive converter (baseline): everything in memory at once


def naive_to_megatron(src: str, dst: str, tp: int, pp: int) -> None:
    import torch

    from formats.checkpoint import open_checkpoint
    from formats.layout import Layout
    from interop.convert_megatron import TorchTarget, extra_state_names
    from interop.convert_stream import hf_to_canonical
    from interop.families import family_for_hf

    ckpt = open_checkpoint(src)
    state = {i.name: ckpt.load(i.name).clone() for i in ckpt.tensors()}  # the whole model
    family = family_for_hf(ckpt.config)
    cfg = family.config_from_hf(ckpt.config)
    canonical = dict(hf_to_canonical(family, cfg, state.__getitem__))
    layout = Layout(tp=tp, pp=pp)
    target = TorchTarget(cfg, layout)
    ranks: dict = {}
    for name, tensor in canonical.items():
        for stored, shard, t, p, _ in target.placements(name, tensor):
            ranks.setdefault((t, p), {})[stored] = shard.clone()
    for (p, _), names in extra_state_names(cfg, layout, "mcore").items():
        for t in range(tp):
            ranks[(t, p)].update({n: None for n in names})
    os.makedirs(os.path.join(dst, "release"))
    for (t, p), model in ranks.items():
        d = os.path.join(dst, "release", f"mp_rank_{t:02d}_{p:03d}")
        os.makedirs(d)
        torch.save({"model": model, "args": None, "checkpoint_version": 3.0, "iteration": 0},
                   os.path.join(d, "model_optim_rng.pt"))
    with open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release")
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(ckpt.config, f)


def naive_to_hf(src: str, dst: str) -> None:
    import torch
    from safetensors.torch import save_file

    from formats.layout import Layout
    from interop.convert_megatron import stage_of
    from interop.convert_stream import canonical_to_hf
    from interop.families import family_for_hf

    with open(os.path.join(src, "config.json")) as f:
        hf_config = json.load(f)
    family = family_for_hf(hf_config)
    cfg = family.config_from_hf(hf_config)
    rels = sorted(os.listdir(os.path.join(src, "release")))
    ranks = {}
    for rel in rels:  # everything in memory
        t, p = (int(x) for x in rel.removeprefix("mp_rank_").split("_"))
        ranks[(t, p)] = torch.load(os.path.join(src, "release", rel, "model_optim_rng.pt"), weights_only=False)["model"]
    layout = Layout(tp=max(t for t, _ in ranks) + 1, pp=max(p for _, p in ranks) + 1)
    canonical = {}
    for name, rule in family.canonical_names(cfg):
        p, _, local = stage_of(name, cfg, layout)
        canonical[name] = rule.split.merge([ranks[(t, p)][local] for t in range(layout.tp)], cfg)
    out = {n: t.contiguous().clone() for n, t in canonical_to_hf(family, cfg, canonical.items())}
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def copy_floor(src: str, dst: str, how: str) -> None:
    """The floor of a conversion (``--floor``): the bytes of the HF checkpoint ``src`` (read through mappings)
    written by ``RangeWriter`` (O_DIRECT; no CRC) into one file per source shard: ``how`` is
    ``chunks`` (each file as it is, in 64 MiB page-aligned pieces: the writer's best case),
    ``tensors`` (tensor by tensor, as a converter writes) or ``transposed`` (tensor by tensor, GPT-2 Conv1D
    weights as transposed views: the one strided copy HF <-> Megatron must make of each)."""
    import numpy as np
    import torch

    from formats.checkpoint import open_checkpoint
    from formats.checkpoint.rangewrite import RangeWriter

    ckpt = open_checkpoint(src)
    os.makedirs(dst)
    io = RangeWriter()
    files = sorted(set(ckpt.weight_map.values()))
    for file in files:
        io.open(file, os.path.join(dst, file))
    if how == "chunks":
        for file in files:
            data = torch.from_numpy(np.memmap(os.path.join(src, file), dtype=np.uint8, mode="r"))
            for pos in range(0, data.numel(), 64 << 20):
                io.write(file, pos, data[pos:pos + (64 << 20)])
    else:
        offsets = dict.fromkeys(files, 0)
        for info in ckpt.tensors():
            file = ckpt.weight_map[info.name]
            t = ckpt.map(info.name)
            if how == "transposed" and info.name.endswith(CONV1D):
                t = t.t()
            io.write(file, offsets[file], t)
            offsets[file] += info.nbytes
    io.wait()
    io.close()


def _safetensors_layout(path: str) -> tuple[int, list[tuple[str, list[int], int, int]]]:
    """(header bytes, [(name, shape, begin, end)] by file offset) of a safetensors file, read without torch."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    entries = sorted(((k, v["shape"], *v["data_offsets"]) for k, v in header.items()), key=lambda e: e[2])
    return 8 + n, entries


def torchless_floor(src: str, dst: str, how: str) -> None:
    """The floor of a converter that does not import torch (``--floor``): the HF checkpoint's files written
    again, ``how`` = ``kernel`` (``os.copy_file_range``, the in-kernel copy ``cp`` makes: no user-space copy at
    all, but nothing can be transposed on the way) or ``transposed`` (numpy only: every GPT-2 Conv1D weight
    transposed in row blocks straight into page-aligned 32 MiB staging buffers by two threads, written with
    ``O_DIRECT`` as each fills; the other bytes copied as they are; no CRC, no zip). The second is the least a
    torch-free HF <-> Megatron converter of this model would do: it bounds what dropping ``import torch`` could
    win."""
    import mmap
    import queue
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    os.makedirs(dst)
    files = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    if how == "kernel":
        for f in files:
            with open(os.path.join(src, f), "rb") as i, open(os.path.join(dst, f), "wb") as o:
                left = os.fstat(i.fileno()).st_size
                while left:
                    left -= os.copy_file_range(i.fileno(), o.fileno(), left)
        return
    chunk = 32 << 20
    pool = ThreadPoolExecutor(2)
    free: queue.Queue = queue.Queue()  # the staging buffers not being filled or written
    for _ in range(4):
        buf = mmap.mmap(-1, chunk)
        buf.madvise(mmap.MADV_HUGEPAGE)
        free.put(buf)
    local = threading.local()

    def fill(buf, data, begin, end, pieces, fd_direct):
        """Bytes [begin, end) of the output file into ``buf``, then written."""
        out = np.frombuffer(buf, dtype=np.uint8, count=end - begin)
        if not hasattr(local, "scratch"):
            local.scratch = mmap.mmap(-1, 16 * chunk // 4)
            local.scratch.madvise(mmap.MADV_HUGEPAGE)
        for p_begin, p_end, kind, arr in pieces:
            lo, hi = max(begin, p_begin), min(end, p_end)
            if lo >= hi:
                continue
            dst_bytes = out[lo - begin:hi - begin]
            if kind == "raw":
                dst_bytes[:] = data[lo:hi]
                continue
            cols = arr.shape[0]  # output [out, in] from input [in, out]
            row_bytes = cols * 4
            r0, r1 = (lo - p_begin) // row_bytes, -(-(hi - p_begin) // row_bytes)
            if (lo - p_begin) % row_bytes == 0 and (hi - p_begin) % row_bytes == 0:
                # 16 source rows at a time into a hot scratch block (the source's 4 KiB file pages make a
                # strided read of it TLB-bound: 0.6 GB/s), then transposed from there (2.2 GB/s a thread)
                target = dst_bytes.view(np.float32).reshape(r1 - r0, cols)
                scratch = np.frombuffer(local.scratch, dtype=np.float32, count=16 * (r1 - r0)).reshape(16, -1)
                for i in range(0, cols, 16):
                    block = scratch[:min(16, cols - i)]
                    block[...] = arr[i:i + 16, r0:r1]
                    target[:, i:i + 16] = block.T
            else:  # a block straddling the chunk edge: transposed aside, then its part copied
                block = np.ascontiguousarray(arr[:, r0:r1].T).view(np.uint8).reshape(-1)
                off = p_begin + r0 * row_bytes
                dst_bytes[:] = block[lo - off:hi - off]
        n = end - begin
        aligned = -(-n // 4096) * 4096
        view = memoryview(buf)[:aligned]
        written = 0
        while written < aligned:
            written += os.pwrite(fd_direct, view[written:], begin + written)
        free.put(buf)

    for f in files:
        path = os.path.join(src, f)
        header, entries = _safetensors_layout(path)
        data = np.memmap(path, dtype=np.uint8, mode="r")
        size = data.size
        pieces = [(0, header, "raw", None)]
        for name, shape, b, e in entries:
            b, e = b + header, e + header
            if name.endswith(CONV1D):
                pieces.append((b, e, "t", data[b:e].view(np.float32).reshape(shape)))
            else:
                pieces.append((b, e, "raw", None))
        out_path = os.path.join(dst, f)
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT, 0o644)
        fd_direct = os.open(out_path, os.O_WRONLY | os.O_DIRECT)
        futures = []
        for begin in range(0, size, chunk):
            futures.append(pool.submit(fill, free.get(), data, begin, min(begin + chunk, size), pieces, fd_direct))
        for fut in futures:
            fut.result()
        os.ftruncate(fd, size)
        os.close(fd_direct)
        os.close(fd)
    pool.shutdown()


# ----------------------------------------------------------------------------------------------------------
# measuring


def settle(*sources: str, filler: str | None = None) -> None:
    """The same start for every step: no dirty pages (``sync``), the step's source files hot in the page cache;
    with ``filler``, also no free memory to speak of (see ``fill_free_memory``)."""
    os.sync()
    if filler:
        fill_free_memory(filler)
    for src in sources:
        for d, _, fs in os.walk(src):
            for f in fs:
                _read(os.path.join(d, f))


def _read(path: str) -> None:
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(_READ_BUF):
            pass


def fill_free_memory(filler: str) -> None:
    """Turn the VM's free memory into clean page cache by reading ``filler`` (a file about the size of RAM)
    afresh.

    Why (``--fill-free``): this VM reports free pages to its host, and a page-cache write that lands on such a
    page waits for the host to back it, while one that reclaims a clean cached page does not. So ``cp`` of the
    6.2 GB checkpoint takes ~3 s when free memory is near zero and 5–13 s after earlier steps deleted their
    outputs (measured). Without the fill, which case a step meets depends on what ran before it; with it, every
    step (``cp`` included) meets the fast case. ``O_DIRECT`` writes (the converter's) do not use the page cache."""
    fd = os.open(filler, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    _read(filler)


def make_filler(path: str) -> None:
    """A file of the machine's RAM size (zeros) for ``fill_free_memory``."""
    if os.path.exists(path):
        return
    size = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    block = bytes(64 << 20)
    with open(path + ".tmp", "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
    os.replace(path + ".tmp", path)


_READ_BUF = bytearray(8 << 20)


def timed(cmd: list[str], label: str, sources: tuple[str, ...] = (), settle_first: bool = True,
          filler: str | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; return wall seconds, durable seconds (+ a timed ``sync``), peak RSS."""
    if settle_first:
        settle(*sources, filler=filler)
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"})
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{label} failed ({proc.returncode})")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for k in ("User", "System"))
    t1 = time.time()
    os.sync()
    durable = wall + time.time() - t1
    print(f"  {label}: {wall:.2f} s to page cache, {durable:.2f} s durable, peak RSS {rss / 2**20:.0f} MiB, "
          f"{cpu:.2f} CPU-s, load {load:.1f}", file=sys.stderr, flush=True)
    return {"label": label, "wall_s": wall, "durable_s": durable, "rss": rss, "cpu_s": cpu, "load": load}


def compare_hf(a: str, b: str) -> int:
    """Tensors of two HF dirs must be bit-identical; returns the number compared (one tensor in memory)."""
    import torch

    from formats.checkpoint import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    names = sorted(i.name for i in ca.tensors())
    if names != sorted(i.name for i in cb.tensors()):
        raise SystemExit(f"tensor names differ between {a} and {b}")
    for n in names:
        if not torch.equal(ca.load(n), cb.load(n)):
            raise SystemExit(f"{n} differs after the round trip")
    return len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="gpt2")
    ap.add_argument("--shape", choices=sorted(set(SHAPES) | set(BERT_SHAPES)), default=None)
    ap.add_argument("--workdir", default="/tmp/bench-convert")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--formats", default="torch,torch_dist")
    ap.add_argument("--no-settle", dest="settle", action="store_false",
                    help="old measure: steps back to back, no sync / source read before each")
    ap.add_argument("--floor", action="store_true",
                    help="also time the floor steps (import torch; copy / transposing copy with our writer)")
    ap.add_argument("--fill-free", action="store_true",
                    help="before each step also turn free memory into clean page cache (cp's fast case; see "
                         "fill_free_memory)")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    py = sys.executable
    default_shape, tp, pp = FAMILIES[args.family]
    shape = args.shape or default_shape
    if shape not in (BERT_SHAPES if args.family == "bert" else SHAPES):
        raise SystemExit(f"--shape {shape} is not a {args.family} shape")
    w = os.path.join(args.workdir, shape if args.family == "gpt2" else f"{args.family}-{shape}")
    hf = os.path.join(w, "hf")
    if not os.path.isdir(hf):
        print(f"making a random {shape} {args.family} checkpoint in {hf}", file=sys.stderr, flush=True)
        make_hf(hf, shape, args.family)
    total, largest = tensor_bytes(hf)
    size = dir_bytes(hf)
    print(f"checkpoint: {total / 1e9:.2f} GB of tensors, largest tensor {largest / 2**20:.0f} MiB", file=sys.stderr)

    def clean(*names):
        for n in names:
            p = os.path.join(w, n)
            shutil.rmtree(p, ignore_errors=True)

    filler = None
    if args.fill_free:
        filler = os.path.join(args.workdir, "filler")
        make_filler(filler)
    rows = []
    step = lambda cmd, label, *sources: timed(cmd, label, sources, args.settle, filler)  # noqa: E731
    clean("cp")
    rows.append(step(["cp", "-r", hf, os.path.join(w, "cp")], "cp -r (HF dir)", hf))
    clean("cp")
    rows.append(step([py, "-c", "import torch, interop.conversion, interop.convert_megatron, formats.checkpoint"],
                     "baseline: interpreter + imports"))
    if args.floor:
        me = os.path.abspath(__file__)
        rows.append(step([py, "-c", "import torch"], "baseline: python -c 'import torch'"))
        for how in ("chunks", "tensors", "transposed"):
            clean("floor")
            rows.append(step([py, me, "--copy-floor", hf, os.path.join(w, "floor"), how],
                             f"floor: {how}, O_DIRECT writes (+ import torch)", hf))
            clean("floor")
        rows.append(step([py, "-c", "import numpy"], "baseline: python -c 'import numpy'"))
        for how in ("kernel", "transposed"):
            clean("floor")
            rows.append(step([py, me, "--torchless-floor", hf, os.path.join(w, "floor"), how],
                             f"floor without torch: {how}", hf))
            clean("floor")
    for fmt in [f for f in args.formats.split(",") if f]:
        clean("meg", "back")
        meg = os.path.join(w, "meg")
        rows.append(step([py, "-m", "interop", "convert", hf, meg, "--tp", str(tp), "--pp", str(pp),
                          "--format", fmt, "--no-progress"], f"convert HF -> Megatron {fmt} TP{tp}PP{pp}", hf))
        rows.append(step([py, "-m", "interop", "convert", meg, os.path.join(w, "back"),
                          "--no-progress"], f"convert Megatron {fmt} TP{tp}PP{pp} -> HF", meg))
        n = compare_hf(hf, os.path.join(w, "back"))
        print(f"  round trip {fmt}: {n} tensors bit-identical", file=sys.stderr)
        clean("meg", "back")
    if not args.skip_naive:
        clean("naive-meg", "naive-back")
        me = os.path.abspath(__file__)
        rows.append(step([py, me, "--naive-to-megatron", hf, os.path.join(w, "naive-meg"), str(tp), str(pp)],
                         f"naive HF -> Megatron torch TP{tp}PP{pp}", hf))
        rows.append(step([py, me, "--naive-to-hf", os.path.join(w, "naive-meg"), os.path.join(w, "naive-back")],
                         f"naive Megatron torch TP{tp}PP{pp} -> HF", os.path.join(w, "naive-meg")))
        compare_hf(hf, os.path.join(w, "naive-back"))
        clean("naive-meg", "naive-back")
    cp = rows[0]
    print(f"\nsettled steps: {args.settle}, free memory filled: {args.fill_free}")
    print("| step | to page cache s | vs cp -r | durable s | vs cp -r | CPU s | peak RSS MiB | RSS / largest tensor | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = r["label"].startswith("baseline")
        ratio = lambda k: "" if base else f"{cp[k] / r[k]:.2f}x"  # noqa: E731  (same bytes: ratio of bytes/s)
        print(f"| {r['label']} | {r['wall_s']:.2f} | {ratio('wall_s')} | {r['durable_s']:.2f} | {ratio('durable_s')} | "
              f"{r['cpu_s']:.2f} | {r['rss'] / 2**20:.0f} | {r['rss'] / largest:.1f} | {r['load']:.1f} |")
    print(f"\nmodel {total / 1e9:.2f} GB tensors ({size / 1e9:.2f} GB on disk), largest tensor "
          f"{largest / 2**20:.0f} MiB")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--naive-to-megatron":
        sys.path.insert(0, ROOT)
        naive_to_megatron(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--naive-to-hf":
        sys.path.insert(0, ROOT)
        naive_to_hf(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "--copy-floor":
        sys.path.insert(0, ROOT)
        copy_floor(sys.argv[2], sys.argv[3], sys.argv[4])
    elif len(sys.argv) == 5 and sys.argv[1] == "--torchless-floor":
        torchless_floor(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
