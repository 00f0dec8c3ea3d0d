"""Where one training step's time goes: ``trainer.run.rank_main`` (the ``interop train`` code path) under
``torch.profiler`` for a few steps after warm-up, then the top CUDA kernels by total time, kernel categories
(GEMM, attention, NCCL, …), the CPU side (top ops by self time, kernel launches per step) and the step time.

Why: throughput benches (``bench_train_gpu.py``, ``bench_train_encoders_gpu.py``) say *how fast*; this says *why*.
A step whose kernels add up to much less than its wall time is bound by the host (Python, launches, syncs); one
whose non-GEMM kernels (softmax, casts, copies, elementwise) rival the GEMMs has unfused work to remove.

Shapes are the benches' own (imported, not copied): ``gpt2`` / ``llama`` = ``bench_train_gpu.PRESETS`` (1.3B /
1.2B, seq 2048), ``bert`` / ``t5`` = ``bench_train_encoders_gpu.SHAPES`` (BERT-large, T5-base); ``--tiny`` takes
the benches' tiny shapes in fp32 on the CPU (a smoke test; the table then lists CPU ops). ``--layers``,
``--hidden``, ``--heads``, ``--seq``, ``--micro-batch``, ``--num-micro`` override a shape (e.g. a small BERT on
the CPU). bf16 on a GPU, fp32 on the CPU; synthetic data; one rank. About a minute on an H100.

    python tools/bench/profile_train_gpu.py --arch bert                      # BERT-large, bf16, 1 GPU
    python tools/bench/profile_train_gpu.py --arch gpt2 --json gpt2.json
    python tools/bench/profile_train_gpu.py --arch bert --attention local     # before issue 19's SDPA core
    python tools/bench/profile_train_gpu.py --arch bert --enable compiled_layer
    python tools/bench/profile_train_gpu.py --arch llama --steps 1 --gaps 15  # where the GPU waits for the host
    python tools/bench/profile_train_gpu.py --arch bert --tiny               # CPU smoke test
    python tools/bench/profile_train_gpu.py --arch bert --layers 4 --hidden 256 --seq 512 --micro-batch 4   # CPU
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train_encoders_gpu as encoders  # noqa: E402 - after the path set-up
import bench_train_gpu as decoders  # noqa: E402

ARCHS = {"gpt2": "gpt2-1.3b", "llama": "llama-1.2b", "bert": "bert", "t5": "t5"}
#: kernel name patterns of each category, first match wins
CATEGORIES = (
    ("nccl", r"nccl"),
    ("attention", r"flash|fmha|attention|attn|sdpa|cudnn"),
    ("gemm", r"gemm|cutlass|xmma|cublas|nvjet|sm\d+_.*(tn|nt|nn|tt)|ampere_|hopper_"),
    ("softmax", r"softmax"),
    ("norm", r"layer_?norm|rms_?norm|welford"),
    ("reduction", r"reduce|sum_|max_|argmax"),
    ("copy / cast", r"copy|memcpy|memset|cat_|to_copy|convert|cast"),
    ("optimizer", r"adam|multi_tensor|foreach"),
)


LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
#: host-side calls that wait for the GPU (a pageable cudaMemcpyAsync does too)
SYNCS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "aten::item",
         "aten::_local_scalar_dense")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="bert")
    p.add_argument("--warmup", type=int, default=4, help="unprofiled steps first (the first one is excluded)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--top", type=int, default=25)
    for flag in ("layers", "hidden", "heads", "seq", "micro-batch", "num-micro"):
        p.add_argument(f"--{flag}", type=int, default=None, help="override the shape's value")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--enable", action="append", default=[], metavar="KERNEL",
                   help="switch on one of trainer.kernels.CANDIDATES (repeatable), e.g. compiled_layer")
    p.add_argument("--disable", action="append", default=[], metavar="KERNEL",
                   help="switch off one of trainer.kernels.KERNELS (repeatable)")
    p.add_argument("--attention", choices=["sdpa", "local"], default="sdpa",
                   help="core attention: SDPA (default) or Megatron-Core's unfused local one (a before/after)")
    p.add_argument("--no-bda-fusion", action="store_true",
                   help="unfused bias + dropout + residual add (eager adds instead of the torch.compile'd kernel)")
    p.add_argument("--shapes", action="store_true", help="record input shapes: CPU ops listed per input shape")
    p.add_argument("--gaps", type=int, default=0, metavar="N",
                   help="also list the N largest places where the GPU waits for the host, with the Python frames "
                        "that launched the kernel after each wait (records Python stacks: slower host)")
    p.add_argument("--tiny", action="store_true", help="the benches' tiny shapes, fp32, CPU-friendly (smoke test)")
    p.add_argument("--json", default=None, help="also write the report here")
    return p.parse_args(argv)


def train_config(args, cuda: bool, log_dir: str):
    """The benches' own TrainConfig for ``args.arch`` (with the overrides), ``warmup + steps`` iterations."""
    iters = args.warmup + args.steps
    if args.arch in ("bert", "t5"):
        shape = dict((encoders.TINY if args.tiny else encoders.SHAPES)[args.arch])
        for key, name in (("layers", "layers"), ("hidden", "hidden"), ("heads", "heads"), ("seq", "seq"),
                          ("micro", "micro_batch"), ("num_micro", "num_micro")):
            shape[key] = getattr(args, name) or shape[key]
        if args.hidden and not args.tiny:
            shape.update(ffn=4 * args.hidden, kv=args.hidden // shape["heads"])
        if args.arch == "t5" and args.layers:
            shape["dec_layers"] = args.layers
        bench = argparse.Namespace(steps=iters, peak_tflops=args.peak_tflops)
        return encoders.ours_config(args.arch, shape, bench, cuda, log_dir), shape
    argv = ["--family", args.arch] + (["--tiny"] if args.tiny else ["--preset", ARCHS[args.arch]])
    bench = decoders.parse_args(argv)
    for name in ("layers", "hidden", "heads", "seq", "micro_batch", "num_micro"):
        if getattr(args, name):
            setattr(bench, name, getattr(args, name))
    bench.steps, bench.peak_tflops = iters, args.peak_tflops
    return decoders.ours_config(bench, 1, cuda, log_dir), vars(bench)


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, low)), "other")


def event_time_us(evt, kind: str) -> float:
    """``device_time_total`` / ``self_cpu_time_total`` across torch versions (µs)."""
    if kind == "device":
        return float(getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0) or 0.0)
    return float(evt.self_cpu_time_total)


def summarize(prof, steps: int, step_s: float, top: int, cuda: bool, shapes: bool = False) -> dict:
    """Kernel and CPU-op tables from a finished profile of ``steps`` steps of ``step_s`` seconds each."""
    from torch.autograd import DeviceType

    averages = prof.key_averages()
    by_shape = prof.key_averages(group_by_input_shape=True) if shapes else averages
    step_ms = 1e3 * step_s
    # a record_function range (e.g. torch's "Optimizer.step#AdamW.step") also shows on the GPU timeline, spanning
    # kernels listed on their own: counting it would count those kernels twice
    kernels = [e for e in averages if getattr(e, "device_type", None) == DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
    kernels.sort(key=lambda e: event_time_us(e, "device"), reverse=True)
    gpu_ms = sum(event_time_us(e, "device") for e in kernels) / 1e3 / steps
    by_category: dict[str, float] = {}
    for e in kernels:
        cat = category(e.key)
        by_category[cat] = by_category.get(cat, 0.0) + event_time_us(e, "device") / 1e3 / steps
    cpu_ops = sorted((e for e in by_shape if getattr(e, "device_type", None) != DeviceType.CUDA),
                     key=lambda e: event_time_us(e, "cpu"), reverse=True)
    counts = {e.key: e.count / steps for e in averages if getattr(e, "device_type", None) != DeviceType.CUDA}
    launches = sum(counts.get(k, 0.0) for k in LAUNCHES)
    syncs = {k: counts[k] for k in SYNCS if k in counts}

    def row(e, kind):
        ms = event_time_us(e, kind) / 1e3 / steps
        name = e.key if not shapes or kind == "device" else f"{e.key} {e.input_shapes}"
        out = {"name": name[:160], "calls_per_step": e.count / steps, "ms_per_step": ms,
               "pct_of_step": 100.0 * ms / step_ms if step_ms else 0.0}
        if kind == "device":
            out["category"] = category(e.key)
        return out

    return {
        "step_ms": step_ms,
        "gpu_kernel_ms_per_step": gpu_ms,
        "gpu_busy_pct": 100.0 * gpu_ms / step_ms if cuda and step_ms else None,
        "kernel_launches_per_step": launches,
        "host_syncs_per_step": syncs,
        "aten_ops_per_step": sum(e.count for e in averages if e.key.startswith("aten::")) / steps,
        "cpu_self_ms_per_step": sum(event_time_us(e, "cpu") for e in cpu_ops) / 1e3 / steps,
        "categories_ms_per_step": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels": [row(e, "device") for e in kernels[:top]],
        "top_cpu_ops": [row(e, "cpu") for e in cpu_ops[:top]],
    }


#: the path of a Python frame that says where in a step a launch came from (the rest is torch / library plumbing);
#: a frame is named from that path on
OUR_FRAMES = re.compile(r"(megatron/core/|/trainer/|/interop/|liger_kernel/|torch/optim/|tools/bench/)")


def idle_gaps(trace_path: str, steps: int, top: int, min_us: float = 20.0) -> dict:
    """GPU idle time of a profiled window from its Chrome trace: the gaps between kernels of at least ``min_us``,
    each attributed to the Python frames (ours, Megatron-Core's, torch.optim's) that launched the kernel ending it.

    Why: a GPU-bound step still loses time wherever the host drains the GPU (``.item()``, a synchronize) and then
    spends a while in Python before the next launch; the kernel tables cannot show where that happens."""
    with open(trace_path) as fh:
        events = [e for e in json.load(fh)["traceEvents"] if e.get("ph") == "X"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    frames: dict = {}  # tid -> our frames by start time
    for e in sorted((e for e in events if e.get("cat") == "python_function" and OUR_FRAMES.search(e["name"])),
                    key=lambda e: e["ts"]):
        frames.setdefault(e["tid"], []).append(e)
    starts = {tid: [f["ts"] for f in fs] for tid, fs in frames.items()}

    def frames_at(ts: float, tid) -> str:
        """The three innermost of our frames running at ``ts`` (walking back from the last one started)."""
        inner, fs = [], frames.get(tid, [])
        for i in range(bisect.bisect_right(starts.get(tid, []), ts) - 1, -1, -1):
            if fs[i]["ts"] + fs[i]["dur"] >= ts:
                inner.insert(0, fs[i])
                if len(inner) == 3:
                    break
        return " > ".join(f["name"][OUR_FRAMES.search(f["name"]).start():].lstrip("/") for f in inner) or "?"

    by_site: dict[str, list[float]] = {}
    end = kernels[0]["ts"] + kernels[0]["dur"] if kernels else 0.0
    total = 0.0
    for k in kernels[1:]:
        gap = k["ts"] - end
        if gap >= min_us:
            launch = launches.get(k.get("args", {}).get("correlation"))
            site = frames_at(launch["ts"], launch["tid"]) if launch else "?"
            by_site.setdefault(f"{site}  [before {k['name'][:60]}]", []).append(gap)
            total += gap
        end = max(end, k["ts"] + k["dur"])
    rows = sorted(by_site.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"idle_ms_per_step": total / 1e3 / steps,
            "idle_sites": [{"ms_per_step": sum(g) / 1e3 / steps, "gaps_per_step": len(g) / steps, "site": site}
                           for site, g in rows]}


def profile(args) -> dict:
    """Run the trainer with the profiler active for the last ``args.steps`` steps; return the report."""
    import torch
    from torch.profiler import ProfilerActivity

    import trainer.kernels
    import trainer.loop
    from trainer.run import rank_main

    trainer.kernels.enabled.update(args.enable)
    trainer.kernels.disabled.update(args.disable)
    cuda = torch.cuda.is_available()
    cfg, shape = train_config(args, cuda, tempfile.mkdtemp(prefix="profile-train-"))
    cfg.attention_backend = args.attention
    if args.no_bda_fusion:
        decoders.unfuse_bias_dropout_add()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = torch.profiler.profile(activities=activities, record_shapes=args.shapes, with_stack=bool(args.gaps))
    warm_times, prof_times = [], []
    plain_step = trainer.loop.Trainer.train_step

    def timed_step(self):
        """One step, synchronized and timed; the profiler runs around the last ``args.steps`` of them."""
        done = len(warm_times) + len(prof_times)
        if done == args.warmup:
            prof.start()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = plain_step(self)
        if cuda:
            torch.cuda.synchronize()
        (warm_times if done < args.warmup else prof_times).append(time.perf_counter() - t0)
        if done + 1 == args.warmup + args.steps:
            prof.stop()
        return out

    trainer.loop.Trainer.train_step = timed_step
    try:
        result = rank_main(cfg)
    finally:
        trainer.loop.Trainer.train_step = plain_step
    step_s = statistics.median(warm_times[1:] or warm_times)
    tokens = cfg.global_batch(1) * (cfg.seq_length + (cfg.decoder_seq_length if args.arch == "t5" else 0))
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": "bf16" if cuda else "fp32", "arch": args.arch, "shape": shape, "attention": args.attention,
        "enabled": args.enable, "disabled": args.disable,
        "warmup_steps": args.warmup, "profiled_steps": args.steps,
        "step_ms_unprofiled": 1e3 * step_s, "step_ms_unprofiled_min": 1e3 * min(warm_times[1:] or warm_times),
        "step_ms_profiled": 1e3 * statistics.mean(prof_times),
        "tokens_per_s_unprofiled": tokens / step_s, "final_loss": result.losses[-1],
        "peak_memory_gb": result.peak_memory_gb,
    }
    report.update(summarize(prof, args.steps, statistics.mean(prof_times), args.top, cuda, args.shapes))
    if args.gaps:
        trace = os.path.join(tempfile.mkdtemp(prefix="profile-trace-"), "trace.json")
        prof.export_chrome_trace(trace)
        report.update(idle_gaps(trace, args.steps, args.gaps))
    return report


def table(report: dict) -> str:
    lines = [f"{report['date']}, {report['device']}, {report['precision']}, {report['arch']}: step "
             f"{report['step_ms_unprofiled']:.1f} ms unprofiled (median; min {report['step_ms_unprofiled_min']:.1f}; "
             f"{report['tokens_per_s_unprofiled']:,.0f} tok/s), "
             f"{report['step_ms_profiled']:.1f} ms profiled; peak {report['peak_memory_gb']:.2f} GiB"]
    if report["gpu_busy_pct"] is not None:
        lines.append(f"GPU kernels {report['gpu_kernel_ms_per_step']:.1f} ms/step = {report['gpu_busy_pct']:.0f} % "
                     f"of the step; {report['kernel_launches_per_step']:.0f} launches/step; host syncs/step "
                     f"{json.dumps({k: round(v, 1) for k, v in report['host_syncs_per_step'].items()})}")
        lines.append("categories (ms/step): " + ", ".join(
            f"{k} {v:.1f}" for k, v in report["categories_ms_per_step"].items()))
    lines.append(f"CPU self time {report['cpu_self_ms_per_step']:.1f} ms/step; {report['aten_ops_per_step']:.0f} aten "
                 "ops/step (with nesting)")
    if "idle_sites" in report:
        lines.append(f"\nGPU idle between kernels (gaps >= 20 us): {report['idle_ms_per_step']:.1f} ms/step; "
                     "largest, by the Python frames that launched the kernel after the gap (stacks recorded: the host "
                     "is slower):")
        lines.append(f"{'gaps':>7} {'ms':>9}  site")
        for r in report["idle_sites"]:
            lines.append(f"{r['gaps_per_step']:>7.1f} {r['ms_per_step']:>9.3f}  {r['site']}")
    for title, key in (("CUDA kernels", "top_kernels"), ("CPU ops (self time)", "top_cpu_ops")):
        rows = report[key]
        if not rows:
            continue
        lines.append(f"\ntop {len(rows)} {title} by total time per step:")
        lines.append(f"{'calls':>7} {'ms':>9} {'% step':>7}  name")
        for r in rows:
            cat = f"[{r['category']}] " if "category" in r else ""
            lines.append(f"{r['calls_per_step']:>7.0f} {r['ms_per_step']:>9.3f} {r['pct_of_step']:>6.1f}%  {cat}{r['name']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tiny:
        args.warmup, args.steps = min(args.warmup, 2), min(args.steps, 2)
    report = profile(args)
    print(table(report), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
