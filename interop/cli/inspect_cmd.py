"""``interop inspect PATH [--json] [--tensors]``: what a checkpoint is, without loading its tensors."""
from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("path", type=click.Path(exists=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--tensors", is_flag=True, help="Also list every tensor: name, shape, dtype, file/shard.")
def inspect_command(path: str, as_json: bool, tensors: bool) -> None:
    """Show kind, format, family guess, layout, iteration, dtypes, parameter count, vocab size (true, padded and
    where the true size comes from), the flags Megatron-LM needs with --use-checkpoint-args, and an args summary
    of a Hugging Face or Megatron checkpoint (legacy or Megatron-Core keys,
    per-rank torch or torch_dist). Only headers and pickles are read (tensors are memory-mapped, not loaded).

    Megatron pickles are unpickled with an allow-list (argparse.Namespace, numpy RNG state; Megatron enums
    become placeholders); anything else is refused. Still, only inspect files you trust.
    """
    from formats.checkpoint import open_checkpoint
    from interop.checkpoint_summary import summarize
    from formats.errors import InteropError

    ckpt = open_checkpoint(path)
    info = summarize(ckpt)
    if ckpt.kind == "megatron":
        _add_megatron_lm_facts(ckpt, info)
    try:  # the family layer names the model's kind and heads (a checkpoint it cannot read still lists)
        from interop.checkpoints import model_summary

        info.update(model_summary(ckpt))
    except InteropError:
        pass
    if ckpt.kind == "megatron":
        from interop.optimizer_state import describe

        info["optimizer_state"] = describe(ckpt) or "none (weights only)"
    listing = [t.to_json() for t in ckpt.tensors()] if tensors else None
    if as_json:
        if listing is not None:
            info["tensors"] = listing
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        if key == "args":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None)
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        click.echo(f"{key:<19}{value}")
    if info.get("args"):
        click.echo("args")
        for k, v in info["args"].items():
            click.echo(f"  {k:<36}{v}")
    if listing is not None:
        click.echo("tensors")
        width = max((len(t["name"]) for t in listing), default=0)
        for t in listing:
            where = t["location"] + (f" [{t['shard']}]" if t.get("shard") else "")
            click.echo(f"  {t['name']:<{width}}  {str(tuple(t['shape'])):<18} {t['dtype']:<9} {where}")


def _add_megatron_lm_facts(ckpt, info: dict) -> None:
    """The true vocabulary (and its source), what ``pretrain_{gpt,bert,t5}.py --use-checkpoint-args`` needs
    besides the checkpoint, and what it cannot build at all (interop.megatron_args)."""
    from interop.megatron_args import megatron_lm_flags, megatron_lm_limits, moved_tokenizer_hint
    from interop.vocab import infer_vocab

    info["vocab_size"] = infer_vocab(ckpt, padded=info["vocab_size"]["padded"]).to_json()
    if ckpt.args is not None:
        info["megatron_lm_flags"] = " ".join(["--use-checkpoint-args", *megatron_lm_flags(ckpt.args)])
        limits = megatron_lm_limits(ckpt.args)
        if limits:  # what no flag fixes: Megatron-LM would build another model
            info["megatron_lm_cannot"] = limits
        hint = moved_tokenizer_hint(ckpt.args, ckpt.path.parent)
        if hint:
            info["tokenizer_moved"] = hint
