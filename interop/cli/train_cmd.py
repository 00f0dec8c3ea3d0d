"""``interop train CONFIG [--flag ...]``: Megatron-Core training (TP/PP/VPP/SP/DP, distributed optimizer).

CONFIG is a YAML/JSON file of :class:`trainer.config.TrainConfig` fields (Accelerate Megatron-LM names);
flags override it, ``--set field=value`` reaches every field (``--set arch.hidden_size=128``). On CPU the
command spawns the gloo ranks itself; under ``torchrun`` each process is one rank (NCCL on GPUs).
The trainer is imported inside the command (``interop --help`` stays fast).
"""
from __future__ import annotations

import os

import click

from interop.cli.options import PARALLEL_FLAGS

# (flag or flags, TrainConfig field, click type, help); boolean fields are in _FLAGS. A value left out comes from
# CONFIG, else TrainConfig's default.
_OPTIONS: list[tuple[str | tuple[str, ...], str, object, str]] = [
    ("--model", "model", str, "HF or Megatron checkpoint to start from (else random init from arch)."),
    ("--data-path", "data_path", str, "Megatron indexed dataset prefix(es) or 'w1 p1 w2 p2' blend."),
    ("--split", "split", str, "Train/valid/test split of the indexed data, e.g. 969,30,1."),
    ("--text-path", "text_path", str, "JSONL ({\"text\": ...}) or plain text, tokenized on the fly."),
    ("--tokenizer", "tokenizer", str, "tokenizer.json or an HF tokenizer directory (for --text-path / EOD)."),
    (PARALLEL_FLAGS["tp"], "tp_degree", int, "Tensor-parallel size, in ranks."),
    (PARALLEL_FLAGS["pp"], "pp_degree", int, "Pipeline-parallel size, in stages."),
    (PARALLEL_FLAGS["vpp"], "vpp_degree", int, "Virtual pipeline chunks per stage (interleaved 1F1B)."),
    ("--num-micro-batches", "num_micro_batches", int, "Micro-batches per step per DP rank."),
    ("--micro-batch-size", "micro_batch_size", int, "Samples per micro-batch."),
    ("--global-batch-size", "global_batch_size", int, "Samples per optimizer step (all DP ranks)."),
    ("--seq-length", "seq_length", int, "Tokens per sample."),
    ("--recompute-activations", "recompute_activations", click.Choice(["none", "selective", "full"]), "Activation recompute."),
    ("--attention-backend", "attention_backend", click.Choice(["sdpa", "local"]),
     "Core attention: PyTorch SDPA (fused, default) or Megatron-Core's unfused local one."),
    ("--mixed-precision", "mixed_precision", click.Choice(["no", "bf16", "fp16"]), "Mixed precision."),
    ("--train-iters", "train_iters", int, "Optimizer steps to reach."),
    ("--lr", "lr", float, "Peak learning rate (AdamW)."),
    ("--min-lr", "min_lr", float, "Final learning rate."),
    ("--lr-warmup-iters", "lr_warmup_iters", int, "Linear warm-up steps."),
    ("--lr-decay-style", "lr_decay_style", click.Choice(["constant", "linear", "cosine"]), "LR decay."),
    ("--gradient-clipping", "gradient_clipping", float, "Clip the global grad norm to this."),
    ("--eval-interval", "eval_interval", int, "Evaluate every N steps (0: never)."),
    ("--eval-iters", "eval_iters", int, "Global batches per evaluation."),
    ("--log-interval", "log_interval", int, "Log metrics every N steps."),
    ("--save", "save", str, "Checkpoint directory."),
    ("--save-interval", "save_interval", int, "Save every N steps (always at the end when --save)."),
    ("--load", "load", str, "Resume from this checkpoint directory (its tracker's iteration)."),
    ("--ckpt-format", "ckpt_format", click.Choice(["torch_dist", "torch"]), "Checkpoint format."),
    ("--log-dir", "log_dir", str, "Where metrics.jsonl and loss.png go (default: --save)."),
    ("--tensorboard-dir", "tensorboard_dir", str, "Also write TensorBoard events here."),
    ("--seed", "seed", int, "Random seed."),
    ("--world-size", "world_size", int, "CPU: ranks to spawn (default tp*pp)."),
]
_FLAGS = [
    ("sequence_parallelism", "Sequence parallelism (needs TP >= 2)."),
    ("use_distributed_optimizer", "Shard optimizer state over DP ranks."),
    ("synthetic_data", "Random tokens instead of a dataset (benchmarks)."),
    ("force", "Overwrite an existing checkpoint iteration."),
]


def _with_options(fn):
    for flags, dest, kind, text in reversed(_OPTIONS):
        flags = (flags,) if isinstance(flags, str) else flags
        fn = click.option(*flags, dest, type=kind, default=None, help=text)(fn)
    for dest, text in reversed(_FLAGS):
        name = dest.replace("_", "-")
        fn = click.option(f"--{name}/--no-{name}", dest, default=None, help=text)(fn)
    return fn


@click.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@_with_options
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE", help="Override any config field (repeatable).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_command(config: str, sets: tuple[str, ...], no_progress: bool, **flags) -> None:
    """Train a model with Megatron-Core as CONFIG (YAML/JSON) describes. A flag left out keeps CONFIG's value,
    else TrainConfig's default (trainer/config.py); --tp/--tp-degree, --pp/--pp-degree, --vpp/--vpp-degree are
    the same option."""
    from trainer.config import TrainConfig
    from trainer.errors import TrainConfigError

    cfg = TrainConfig.load_file(config)
    overrides = {k: v for k, v in flags.items() if v is not None}
    if isinstance(overrides.get("data_path"), str):
        overrides["data_path"] = overrides["data_path"].split()
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[key.strip()] = value
    if no_progress:
        overrides["progress"] = False
    cfg = cfg.override(overrides)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    note = _check_before_start(cfg)
    if note and main_rank:
        click.echo(f"note: {note}", err=True)

    from trainer.run import train

    try:
        result = train(cfg)
    except BaseException:
        _sweep_save(cfg)
        raise
    if main_rank:  # under torchrun every process returns; one report is enough
        _report(result)


def _check_before_start(cfg) -> str | None:
    """Values, ``save`` and ``load`` checked before any model, dataset or rank is built
    (:mod:`trainer.config_values`, :mod:`trainer.resume_checks`); returns a note for a fresh start."""
    from trainer.config import env_world_size
    from trainer.data import parse_blend
    from trainer.resume_checks import check_load, check_save

    world = env_world_size() or cfg.resolved_world_size()
    cfg.validate(world)
    prefixes = parse_blend(cfg.data_path)[0] if cfg.data_path and not cfg.synthetic_data else []
    check_save(cfg, [p + ext for p in prefixes for ext in (".bin", ".idx")])
    return check_load(cfg, world)


def _sweep_save(cfg) -> None:
    """After a failed or interrupted run (its ranks have exited): remove the temporaries they left in ``save``."""
    if cfg.save and os.path.isdir(cfg.save):
        import re

        from formats import staging
        from formats.checkpoint.tracker import TRACKER

        staging.sweep_matching(cfg.save, r"iter_\d{7,}|" + re.escape(TRACKER))


def _report(result) -> None:
    if result.losses:
        click.echo(f"trained to iteration {result.iteration}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
                   f" ({result.tokens_per_s:.0f} tokens/s)")
    for ev in result.evals[-1:]:
        accuracy = "".join(f", {label} {100 * ev[key]:.1f}%" for key, label in
                           (("acc", "masked-token accuracy"), ("sop_acc", "NSP/SOP accuracy")) if key in ev)
        click.echo(f"eval at {ev['iteration']}: loss {ev['loss']:.4f}, perplexity {ev['ppl']:.2f}{accuracy}")
    if result.tflops_per_gpu:
        click.echo(f"{result.tflops_per_gpu:.1f} TFLOP/s per GPU, MFU {100 * result.mfu:.1f}%, "
                   f"peak memory {result.peak_memory_gb:.2f} GB")
    if result.checkpoint:
        click.echo(f"checkpoint: {result.checkpoint}")
