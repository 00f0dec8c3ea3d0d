"""Load one of our checkpoints with Megatron-LM's OWN code (a core_v0.16.1 checkout at $MEGATRON_LM_DIR, outside
this repository) the way ``pretrain_{gpt,bert,t5}.py --load DST --use-checkpoint-args`` does, offline, on CPU ranks.

Per rank: ``megatron.training.arguments.parse_args`` -> ``checkpointing.load_args_from_checkpoint`` ->
``validate_args(args, defaults)`` with the script's own ``args_defaults`` -> ``global_vars.set_global_variables``
(builds Megatron-LM's tokenizer from the args; for BERT and T5 also the ``megatron.core.tokenizers`` one that their
dataset providers build) -> the process group and Megatron-Core parallel state at the args' TP/PP (our
``interop.runtime``: Megatron-LM's ``_initialize_distributed`` needs CUDA) -> the script's model construction from
the args alone (``gpt_builders.gpt_builder``; ``pretrain_bert.model_provider``; ``pretrain_t5.model_provider``) ->
``checkpointing.load_checkpoint`` (Megatron-LM's loader, ``strict=True``; its silent non-strict retry is caught
from its ``load_return:`` line) -> the outputs on the caller's batch, compared with Transformers' (saved by the
caller). T5: Megatron-LM builds the relative-position T5 only with Transformer Engine, which a CPU machine does not
have, so the T5 probe stops after the args, the tokenizers and ``core_transformer_config_from_args``, reports
the model builder's error as it is, and lists the keys of the same script's local-spec T5 (learned positions) for
the caller to compare with the keys we write.

Not a test by itself: ``tests/test_megatron_args_mlm.py`` runs it when ``MEGATRON_LM_DIR`` is set (the checkout
must hold ``pretrain_bert.py``/``pretrain_t5.py`` for those families). Stand-ins needed on a CPU machine without
Triton and Transformer Engine: the import of Megatron-LM's batch-invariant Triton kernels (unused here), the
Transformer-Engine BERT layer spec that ``pretrain_bert.py`` imports at module level (``ImportError`` without TE;
never selected when ``args.spec == ['local']``), ``validate_args``' query of the CUDA architecture when TP > 1, and
the CPU runtime. ``six`` must be importable (Megatron-LM's BERT tokenizer imports it).
Usage: python -m tests.megatron_lm_probe OUT.json DST REFERENCE.pt WORLD [megatron-lm flags...]
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
# family -> (Megatron-LM script, its args_defaults for validate_args)
SCRIPTS = {"gpt": ("pretrain_gpt.py", {"tokenizer_type": "GPT2BPETokenizer"}),
           "bert": ("pretrain_bert.py", {"tokenizer_type": "BertWordPieceLowerCase"}),
           "t5": ("pretrain_t5.py", {"tokenizer_type": "BertWordPieceLowerCase"})}


def script_of(family: str) -> str:
    return {"bert": "bert", "t5": "t5"}.get(family, "gpt")


def launch(out: str, dst: str, reference: str, world: int, flags: list[str], timeout: int = 600) -> dict:
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
                                       reference, str(world), *flags], env=env, stdout=log_files[-1],
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
    # load_checkpoint(strict=True) retries with strict=False on any mismatch and prints what it ignored
    report["strict_fallback"] = [line for log in logs for line in log.splitlines() if line.startswith("load_return:")]
    report["log"] = "\n".join(line for line in logs[0].splitlines() if line.startswith(("> building", " > padded")))
    return report


def _stand_ins() -> None:
    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    stub.enable_batch_invariant_mode = lambda *a, **k: None  # Triton kernels: not installed, never called here
    sys.modules[stub.__name__] = stub
    import megatron.core.models.bert.bert_layer_specs as bert_specs

    # pretrain_bert.py imports the TE layer spec by name at module level: without TE that raises ImportError
    bert_specs.bert_layer_with_transformer_engine_spec = None
    import megatron.training.arguments as mlm_arguments

    # validate_args asks the CUDA device's architecture when TP > 1 (only to pick a CUDA_DEVICE_MAX_CONNECTIONS
    # warning); on a CPU machine that raises, so answer "Hopper" as the GPU machines this targets would
    mlm_arguments.get_device_arch_version = lambda: 9


def _tokenizer_facts(tokenizer, core) -> dict:
    facts = {"tokenizer": type(tokenizer).__name__, "tokenizer_vocab_size": tokenizer.vocab_size}
    if core is not None:  # what BERTMaskedWordPieceDataset / T5MaskedWordPieceDataset read
        facts["core_tokenizer"] = {"vocab_size": core.vocab_size}
        for name in ("cls", "sep", "mask", "pad", "bos", "eos", "additional_special_tokens_ids"):
            try:
                facts["core_tokenizer"][name] = getattr(core, name)
            except Exception as e:  # noqa: BLE001 - what Megatron-LM's dataset would hit, reported as is
                facts["core_tokenizer"][name] = f"error: {type(e).__name__}"
    return facts


def _write(out: str, report: dict) -> None:
    with open(out + ".tmp", "w") as f:
        json.dump(report, f, default=str)
    os.replace(out + ".tmp", out)


def rank_main(out: str, dst: str, reference: str, world: int, flags: list[str]) -> None:
    _stand_ins()
    import torch

    from interop.conversion import open_source

    family = getattr(open_source(dst).args, "interop_family", "gpt2")
    script, defaults = SCRIPTS[script_of(family)]
    sys.argv = [script, "--load", dst, "--use-checkpoint-args", *CPU_FLAGS, *flags]
    from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args
    from megatron.training.checkpointing import load_args_from_checkpoint, load_checkpoint
    from megatron.training.global_vars import get_tokenizer, set_global_variables

    args = parse_args()
    load_args_from_checkpoint(args)
    validate_args(args, defaults)
    set_global_variables(args, build_tokenizer=True)
    core = None
    if script != "pretrain_gpt.py":  # the dataset providers' tokenizer (unless --legacy-tokenizer)
        from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer

        core = build_tokenizer(args)
    report = {**_tokenizer_facts(get_tokenizer(), core), "padded_vocab_size": args.padded_vocab_size,
              "tp": args.tensor_model_parallel_size, "pp": args.pipeline_model_parallel_size,
              "transformer_impl": args.transformer_impl, "spec": args.spec}

    from megatron.core import parallel_state as ps

    from formats.layout import Layout
    from interop.runtime import RuntimeConfig, distributed

    layout = Layout(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size)
    with distributed(RuntimeConfig(layout=layout)):
        pre, post = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        if script == "pretrain_t5.py":
            config = core_transformer_config_from_args(args)
            report["config"] = {k: getattr(config, k) for k in (
                "num_layers", "hidden_size", "num_attention_heads", "kv_channels", "ffn_hidden_size",
                "normalization", "layernorm_epsilon", "add_bias_linear", "gated_linear_unit", "activation_func")}
            report["config"]["activation_func"] = getattr(config.activation_func, "__name__", str(config.activation_func))
            report["args"] = {k: getattr(args, k, None) for k in (
                "encoder_num_layers", "decoder_num_layers", "num_layers", "position_embedding_type",
                "relative_attention_num_buckets", "relative_attention_max_distance", "vocab_extra_ids",
                "encoder_seq_length", "decoder_seq_length", "untie_embeddings_and_output_weights")}
            from pretrain_t5 import model_provider

            try:
                model_provider(pre, post)
                report["model_built"] = True
            except Exception as e:  # noqa: BLE001 - reported: the T5 TE spec needs Transformer Engine
                report["model_built"] = False
                report["model_error"] = f"{type(e).__name__}: {e}"
            # the same script's local-spec T5 (learned positions: validate_args refuses relative ones with it):
            # its key names are the TE spec's where the two specs share modules (sharded_state_dict_keys_map)
            args.transformer_impl, args.position_embedding_type = "local", "learned_absolute"
            local = model_provider(pre, post)
            report["local_spec_keys"] = {
                "torch_dist": sorted({sh.key for sh in local.sharded_state_dict().values()  # storage keys
                                      if hasattr(sh, "key") and not sh.key.endswith("_extra_state")}),
                "torch": sorted(k for k in local.state_dict() if not k.endswith("_extra_state"))}
            if ps.get_tensor_model_parallel_rank() == 0:
                _write(out, report)
            return
        if script == "pretrain_bert.py":
            from pretrain_bert import model_provider

            model = model_provider(pre, post)
        else:
            from gpt_builders import gpt_builder

            model = gpt_builder(args, pre, post)
        load_checkpoint([model], None, None, strict=True)
        want = torch.load(reference)
        from interop.convert_megatron import megatron_config
        from interop.megatron_model import forward_outputs

        cfg = megatron_config(open_source(dst))
        got = forward_outputs([model], want["batch"], cfg)
        if got is not None and ps.get_tensor_model_parallel_rank() == 0:
            keep = want["batch"].get("attention_mask", torch.ones_like(want["batch"]["tokens"])).bool()
            diffs = {}
            for name, ref in want["outputs"].items():
                mine = got[name].float()
                diffs[name] = ((mine[keep] - ref[keep]) if ref.dim() == 3 else (mine - ref)).abs().max().item()
            report.update(outputs=sorted(got), max_abs_diff=max(diffs.values()), diffs=diffs,
                          max_abs_logit=want["outputs"]["logits"].abs().max().item())
            _write(out, report)


if __name__ == "__main__":
    rank_main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:])
