"""``tools/bench/profile_train_gpu.py --gaps``: GPU idle time between kernels from a profiler trace, each gap named by
the Python frames that launched the kernel ending it. Checked on a hand-written Chrome trace whose gaps are known."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench"))


def _x(cat, name, ts, dur, **extra):
    return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, **extra)


def test_gaps_are_measured_between_merged_kernels_and_named_by_the_launching_frames(tmp_path):
    import profile_train_gpu as profile

    events = [
        _x("kernel", "gemm", 0, 100, args={"correlation": 1}),
        _x("kernel", "small", 20, 10, args={"correlation": 6}),  # inside the GEMM's time on another stream
        _x("kernel", "overlapping_copy", 50, 100, args={"correlation": 2}),  # another stream: busy until 150
        _x("gpu_memset", "Memset (Device)", 160, 5, args={"correlation": 3}),  # 10 us after: below the threshold
        _x("kernel", "adam", 265, 10, args={"correlation": 4}),  # 100 us idle, launched from the optimizer
        _x("kernel", "norm_fwd", 400, 10, args={"correlation": 5}),  # 125 us idle, launch not in the trace
        _x("cuda_runtime", "cudaLaunchKernel", 260, 3, tid=7, args={"correlation": 4}),
        _x("python_function", "/site-packages/megatron/core/optimizer/optimizer.py(1307): step", 170, 100, tid=7),
        _x("python_function", "/usr/lib/torch/optim/adam.py(213): step", 200, 65, tid=7),
        _x("python_function", "/usr/lib/torch/optim/adam.py(900): _fused_adam", 255, 9, tid=7),
        _x("python_function", "/usr/lib/torch/_tensor.py(40): wrapped", 256, 5, tid=7),  # not ours: left out
        _x("python_function", "/work/trainer/loop.py(200): train_step", 100, 50, tid=7),  # ended before the launch
        _x("python_function", "/work/trainer/loop.py(280): fit", 0, 1000, tid=8),  # another thread
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    report = profile.idle_gaps(str(trace), steps=1, top=5)
    assert report["idle_ms_per_step"] == pytest.approx(0.225)
    sites = {r["site"]: r["ms_per_step"] for r in report["idle_sites"]}
    assert sites == pytest.approx({
        "megatron/core/optimizer/optimizer.py(1307): step > torch/optim/adam.py(213): step > "
        "torch/optim/adam.py(900): _fused_adam  [before adam]": 0.100,
        "?  [before norm_fwd]": 0.125,
    })
    assert [r["site"].split("  [")[1] for r in report["idle_sites"]] == ["before norm_fwd]", "before adam]"]
    halved = profile.idle_gaps(str(trace), steps=2, top=1)
    assert halved["idle_ms_per_step"] == pytest.approx(0.1125) and len(halved["idle_sites"]) == 1
