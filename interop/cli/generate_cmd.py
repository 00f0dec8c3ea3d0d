"""``interop generate``: complete prompts with any HF or Megatron checkpoint through Megatron-Core.

The engine lives in ``trainer.generate*``; this module only parses options (imports stay lazy so that
``interop --help`` does not pay for torch).
"""
from __future__ import annotations

import json

import click

from interop.cli.options import parallel_option


def _read_prompts(prompts: tuple[str, ...], prompts_file: str | None) -> list[str]:
    from formats.errors import InteropError

    out = list(prompts)
    if prompts_file:
        try:
            with open(prompts_file, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise InteropError(f"cannot read prompts: {exc.strerror}", path=prompts_file) from None
        if prompts_file.endswith(".jsonl"):
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    out.append(item["prompt"] if isinstance(item, dict) else str(item))
                except (ValueError, KeyError):
                    raise InteropError(f"line {n}: expected a JSON string or {{\"prompt\": ...}}",
                                       path=prompts_file) from None
        else:
            out.extend(line for line in text.splitlines() if line.strip())
    if not out:
        raise click.UsageError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    return out


def _early_stopping(value: str):
    return {"true": True, "false": False, "never": "never"}[value]


@click.command("generate")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts-file", type=click.Path(dir_okay=False), help="One prompt per line, or JSONL with \"prompt\".")
@click.option("--tokenizer", default=None, help="tokenizer.json or a directory holding it (default: the checkpoint's).")
@click.option("--max-new-tokens", type=int, default=None,
              help="Most tokens to generate per prompt [default: 32, the library's GenerationConfig default].")
@click.option("--min-new-tokens", type=int, default=0, show_default=True, help="Fewest tokens before EOS may stop.")
@click.option("--greedy", "mode", flag_value="greedy", default=True, help="Greedy decoding (default).")
@click.option("--sample", "mode", flag_value="sample", help="Sample (with --temperature/--top-k/--top-p).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0: off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1.0: off.")
@click.option("--top-p-decay", type=float, default=1.0, show_default=True,
              help="Multiply top-p by this after every generated token (old Megatron-LM).")
@click.option("--top-p-bound", type=float, default=0.0, show_default=True, help="Floor of the decayed top-p.")
@click.option("--num-beams", type=int, default=1, show_default=True, help="> 1: beam search.")
@click.option("--length-penalty", type=float, default=1.0, show_default=True)
@click.option("--early-stopping", type=click.Choice(["true", "false", "never"]), default="false", show_default=True)
@click.option("--num-return-sequences", type=int, default=1, show_default=True)
@click.option("--eos-id", "eos_ids", type=int, multiple=True, help="Stop token id(s) (default: the checkpoint's EOS).")
@click.option("--add-bos", is_flag=True, help="Prepend the checkpoint's BOS token to every prompt.")
@click.option("--seed", type=int, default=1234, show_default=True)
@parallel_option("tp", default=1, show_default=True, help="Tensor-parallel size, in ranks.")
@parallel_option("pp", default=1, show_default=True, help="Pipeline-parallel size, in stages.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@click.option("--logprobs", is_flag=True, help="Include per-token log-probabilities in --json output.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per completion (JSONL).")
def generate_command(checkpoint, prompts, prompts_file, tokenizer, max_new_tokens, min_new_tokens, mode,
                     temperature, top_k, top_p, top_p_decay, top_p_bound, num_beams, length_penalty,
                     early_stopping, num_return_sequences, eos_ids, add_bos, seed, tp, pp, dtype, logprobs,
                     as_json) -> None:
    """Complete prompts with CHECKPOINT (HF or Megatron, any format): greedy, sampling with temperature /
    top-k / top-p (+ decay), or beam search. TP x PP > 1 on CPU launches its own gloo ranks."""
    from formats.layout import Layout
    from interop.checkpoints import require_capability
    from trainer.generate import GenerationConfig
    from trainer.generate_sampling import SamplingParams
    from trainer.generate_text import TextRequest, generate_text

    require_capability(checkpoint, "generate")  # an encoder (BERT) is a one-line error, before any rank starts
    sampling = SamplingParams(mode == "sample", temperature, top_k, top_p, top_p_decay, top_p_bound)
    limit = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}  # one default: the library's
    config = GenerationConfig(
        **limit, min_new_tokens=min_new_tokens, sampling=sampling, num_beams=num_beams,
        length_penalty=length_penalty, early_stopping=_early_stopping(early_stopping),
        num_return_sequences=num_return_sequences, seed=seed, return_logprobs=logprobs,
    )
    request = TextRequest(
        checkpoint, _read_prompts(prompts, prompts_file), config, Layout(tp=tp, pp=pp), tokenizer, dtype,
        add_bos, tuple(eos_ids) or None,
    )
    for completion in generate_text(request):
        if as_json:
            item = {"prompt": completion.prompt, "completion": completion.text, "tokens": completion.tokens}
            if completion.score is not None:
                item["score"] = completion.score
            if completion.logprobs is not None:
                item["logprobs"] = completion.logprobs
            click.echo(json.dumps(item))
        else:
            click.echo(f"{completion.prompt}{completion.text}")
            click.echo("-" * 40)
