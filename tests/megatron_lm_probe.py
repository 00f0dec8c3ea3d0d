"""Load one of our checkpoints with Megatron-LM's OWN code (a core_v0.16.1 checkout at $MEGATRON_LM_DIR, outside
this repository) the way ``pretrain_gpt.py --load DST --use-checkpoint-args`` does, offline, on CPU ranks.

Per rank: ``megatron.training.arguments.parse_args`` -> ``checkpointing.load_args_from_checkpoint`` ->
``validate_args(args, {'tokenizer_type': 'GPT2BPETokenizer'})`` (pretrain_gpt.py's defaults) ->
``global_vars.set_global_variables`` (builds Megatron-LM's tokenizer from the args) -> the process group and
Megatron-Core parallel state at the args' TP/PP (our ``interop.runtime``: Megatron-LM's ``_initialize_distributed``
needs CUDA) -> ``gpt_builders.gpt_builder`` (Megatron-LM's model construction, from the args alone) ->
``checkpointing.load_checkpoint`` (Megatron-LM's loader, ``strict=True``) -> logits on a fixed batch, compared with
Transformers' logits of the HF source (saved by the caller).

Not a test by itself: ``tests/test_megatron_args_mlm.py`` runs it when ``MEGATRON_LM_DIR`` is set. Stand-ins
needed on a CPU machine without Triton: the import of Megatron-LM's batch-invariant Triton kernels (unused
here), ``validate_args``' query of the CUDA architecture when TP > 1, and the CPU runtime. ``six`` must be importable (Megatron-LM's BERT tokenizer imports it).
Usage: python -m tests.megatron_lm_probe OUT.json DST HF_LOGITS.pt WORLD [megatron-lm flags...]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

# flags a CPU run needs that have nothing to do with the checkpoint (no CUDA fusions, CPU init)
CPU_FLAGS = ["--use-cpu-initialization", "--no-masked-softmax-fusion", "--no-bias-dropout-fusion",
             "--no-gradient-accumulation-fusion", "--no-rope-fusion", "--micro-batch-size", "1"]


def launch(out: str, dst: str, hf_logits: str, world: int, flags: list[str], timeout: int = 600) -> dict:
    """Run :func:`rank_main` on ``world`` processes; return rank 0's report (``{"error": ...}`` on failure)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, log_files = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   CUDA_DEVICE_MAX_CONNECTIONS="1")
        log_files.append(open(f"{out}.rank{rank}.log", "w+"))  # files, not pipes: a full pipe would block a rank
        procs.append(subprocess.Popen([sys.executable, "-W", "ignore", "-m", "tests.megatron_lm_probe", out, dst,
                                       hf_logits, str(world), *flags], env=env, stdout=log_files[-1],
                                      stderr=subprocess.STDOUT, text=True))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = []
    for f in log_files:
        f.seek(0)
        logs.append(f.read())
        f.close()
    if os.path.exists(out):
        with open(out) as f:
            report = json.load(f)
    else:
        report = {"error": next((log[-3000:] for p, log in zip(procs, logs) if p.returncode), logs[0][-3000:])}
    report["log"] = "\n".join(line for line in logs[0].splitlines() if line.startswith(("> building", " > padded")))
    return report


def rank_main(out: str, dst: str, hf_logits: str, world: int, flags: list[str]) -> None:
    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    stub.enable_batch_invariant_mode = lambda *a, **k: None  # Triton kernels: not installed, never called here
    sys.modules[stub.__name__] = stub
    import torch

    sys.argv = ["pretrain_gpt.py", "--load", dst, "--use-checkpoint-args", *CPU_FLAGS, *flags]
    import megatron.training.arguments as mlm_arguments
    from megatron.training.arguments import parse_args, validate_args

    # validate_args asks the CUDA device's architecture when TP > 1 (only to pick a CUDA_DEVICE_MAX_CONNECTIONS
    # warning); on a CPU machine that raises, so answer "Hopper" as the GPU machines this targets would
    mlm_arguments.get_device_arch_version = lambda: 9
    from megatron.training.checkpointing import load_args_from_checkpoint, load_checkpoint
    from megatron.training.global_vars import get_tokenizer, set_global_variables

    args = parse_args()
    load_args_from_checkpoint(args)
    validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    set_global_variables(args, build_tokenizer=True)
    tokenizer = get_tokenizer()

    from megatron.core import parallel_state as ps

    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed

    layout = Layout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size)
    with distributed(RuntimeConfig(layout=layout)):
        from gpt_builders import gpt_builder

        model = gpt_builder(args, ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
        load_checkpoint([model], None, None, strict=True)
        want = torch.load(hf_logits)
        from interop.convert_megatron import megatron_config
        from interop.conversion import open_source
        from interop.megatron_model import forward_logits

        cfg = megatron_config(open_source(dst))
        got = forward_logits([model], want["tokens"], cfg)
        if got is not None and ps.get_tensor_model_parallel_rank() == 0:
            diff = (got.float() - want["logits"]).abs().max().item()
            report = {"tokenizer": type(tokenizer).__name__, "tokenizer_vocab_size": tokenizer.vocab_size,
                      "padded_vocab_size": args.padded_vocab_size, "tp": layout.tp, "pp": layout.pp,
                      "transformer_impl": args.transformer_impl, "max_abs_diff": diff,
                      "max_abs_logit": want["logits"].abs().max().item()}
            with open(out + ".tmp", "w") as f:
                json.dump(report, f)
            os.replace(out + ".tmp", out)


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
