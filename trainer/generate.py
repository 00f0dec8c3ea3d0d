"""Generation over a Megatron-Core GPTModel: greedy, sampling (temperature/top-k/top-p with decay), beam search.

The decode loop runs every rank of a TP x PP group in lock step: the prompt is encoded once (prefill) into
Megatron-Core's own KV cache (``StaticInferenceContext``), then one token per step is fed. Batches of
uneven prompts are left-padded; the padding is masked out of attention and position ids count real tokens
only, which is what Transformers does, so outputs can be compared token for token. Activations travel
between pipeline stages with Megatron-Core's inference p2p helpers; the last stage gathers the
vocabulary-parallel logits, chooses the tokens and broadcasts them to the other stages.

Inference needs sequence parallelism and activation recompute off (the caller builds the model so); data
parallel replicas simply generate their own prompts (see :func:`gather_across_data_parallel`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.errors import TrainConfigError
from trainer.generate_beam import BeamSearch
from trainer.generate_model import model_and_gpt
from trainer.generate_sampling import SamplingParams, choose_tokens, decayed_top_p


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that decides which tokens come out (model and prompts aside)."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    eos_token_ids: tuple[int, ...] = ()
    seed: int = 1234
    return_logprobs: bool = False
    return_logits: bool = False  # generated steps' full-vocab logits [B, new, V] (greedy/sampling)
    return_prompt_logits: bool = False  # every prompt position's logits [B, S, V] (scoring/evaluation)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise TrainConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise TrainConfigError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if self.num_beams < 1:
            raise TrainConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and (self.return_logits or self.return_prompt_logits):
            raise TrainConfigError("return_logits / return_prompt_logits are for greedy or sampling, not beam search")
        if self.num_beams > 1 and self.sampling.do_sample:
            raise TrainConfigError("beam search is deterministic: do not combine num_beams > 1 with sampling")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise TrainConfigError(
                f"num_return_sequences must be in [1, num_beams={self.num_beams}], got {self.num_return_sequences}"
            )
        if self.early_stopping not in (True, False, "never"):
            raise TrainConfigError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")


@dataclass
class GenerationOutput:
    """Generated tokens per returned sequence (prompt excluded, EOS included when it was produced).

    With beam search, sequence ``i * num_return_sequences + j`` is the j-th best beam of prompt i.
    ``logprobs``/``logits`` are filled on the last pipeline stage only (None elsewhere).
    """

    tokens: list[list[int]]
    logprobs: list[list[float]] | None = None
    logits: torch.Tensor | None = None
    beam_scores: torch.Tensor | None = None
    prompt_logits: torch.Tensor | None = None  # [B, S, V], left padding included (its rows are meaningless)


# --------------------------------------------------------------------------------------------- model step


class _Stepper:
    """One forward pass of the whole pipeline over [B, s] tokens; full-vocab logits of the last position
    (or of every position) on the last stage, None elsewhere."""

    def __init__(self, model, batch: int, max_len: int, vocab_size: int):
        from megatron.core import parallel_state
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model, self.inner = model_and_gpt(model)
        self.config = self.inner.config
        if getattr(self.config, "sequence_parallel", False):
            raise TrainConfigError("generation needs sequence_parallel off")
        self.context = StaticInferenceContext(batch, max_len)
        self.vocab_size = vocab_size
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.first = parallel_state.is_pipeline_first_stage()
        self.last = parallel_state.is_pipeline_last_stage()
        param = next(self.inner.parameters())
        self.device, self.dtype = param.device, param.dtype

    def __call__(self, tokens, positions, mask, all_positions: bool = False):
        from megatron.core.inference.communication_utils import (
            recv_from_prev_pipeline_rank_,
            send_to_next_pipeline_rank,
        )

        batch, seq = tokens.shape
        self.context.materialize_only_last_token_logits = not all_positions
        if not self.first:
            hidden = torch.empty(seq, batch, self.config.hidden_size, dtype=self.dtype, device=self.device)
            recv_from_prev_pipeline_rank_(hidden, self.pp_group)
            self.inner.set_input_tensor(hidden)
        out = self.model(
            tokens, positions, mask, inference_context=self.context, runtime_gather_output=True
        )
        self.context.increment_sequence_len_offset(seq)
        if not self.last:
            send_to_next_pipeline_rank(out.contiguous(), self.pp_group)
            return None
        return out[..., : self.vocab_size].float()

    def start_decode(self) -> None:
        """After the prompt: one token per row from now on."""
        self.context.enable_decode_mode()

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i of the cache now continues old row ``rows[i]``.

        In place and only over the filled prefix of Megatron-Core's [seq, batch, ...] buffers
        (``swap_key_value_dict`` would copy the whole preallocated length into new tensors every step).
        """
        end = self.context.sequence_len_offset
        for key, value in self.context.key_value_memory_dict.values():
            key[:end] = key[:end].index_select(1, rows)
            value[:end] = value[:end].index_select(1, rows)

    def broadcast(self, tensor: torch.Tensor | None, shape, dtype) -> torch.Tensor:
        """The last stage's ``tensor`` on every stage of this pipeline."""
        if self.pp_group.size() == 1:
            return tensor
        if tensor is None:
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
        last = torch.distributed.get_process_group_ranks(self.pp_group)[-1]
        tensor = tensor.to(dtype).contiguous()
        torch.distributed.broadcast(tensor, src=last, group=self.pp_group)
        return tensor


# ------------------------------------------------------------------------------------------- the loop


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, S] tokens and attention mask (1 = real) for prompts of uneven length, padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TrainConfigError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


class _Masks:
    """Attention masks (True = masked, Megatron-Core's convention) and position ids for left padding."""

    def __init__(self, attention_mask: torch.Tensor, total: int):
        batch, prompt = attention_mask.shape
        self.key_pad = torch.zeros((batch, total), dtype=torch.bool, device=attention_mask.device)
        self.key_pad[:, :prompt] = attention_mask == 0
        self.lengths = attention_mask.sum(dim=1)  # real prompt tokens per row
        self.prompt = prompt

    def prefill(self):
        causal = torch.ones(self.prompt, self.prompt, dtype=torch.bool, device=self.key_pad.device).triu(1)
        mask = causal[None, None] | self.key_pad[:, None, None, : self.prompt]
        positions = (~self.key_pad[:, : self.prompt]).long().cumsum(-1) - 1
        return mask, positions.clamp(min=0)

    def decode(self, step: int):
        end = self.prompt + step + 1
        mask = self.key_pad[:, None, None, :end]
        positions = (self.lengths + step).view(-1, 1)
        return mask, positions

    def reorder(self, rows: torch.Tensor) -> None:
        self.key_pad, self.lengths = self.key_pad[rows], self.lengths[rows]


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    config: GenerationConfig,
    vocab_size: int,
    progress: bool = False,
    engine: str = "auto",
) -> GenerationOutput:
    """Generate continuations of left-padded ``input_ids`` [B, S] with a Megatron-Core GPTModel.

    Call on every rank of the model-parallel group with the same prompts. ``vocab_size`` is the true
    vocabulary (logits of padded vocabulary rows are dropped). Returns the same tokens on every rank.
    ``engine``: "auto" runs :mod:`trainer.generate_fast` (static-shape decode, one CUDA graph replay per token
    on GPU, eager on CPU) when the model is TP=1/PP=1 and of a supported architecture, else Megatron-Core's
    own modules and inference context; "megatron" forces the latter, "fast" the former (error if unsupported),
    "fast-eager" the fast engine without CUDA graphs (for checking the graph).
    """
    from tqdm import tqdm

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    model_ref, inner = model_and_gpt(model)
    was_training = inner.training
    model_ref.eval()
    device = next(inner.parameters()).device
    beams = config.num_beams
    input_ids = input_ids.to(device).repeat_interleave(beams, dim=0)
    attention_mask = attention_mask.to(device).repeat_interleave(beams, dim=0)
    rows, prompt = input_ids.shape
    stepper = _make_stepper(engine, model, inner, rows, prompt + config.max_new_tokens, vocab_size)
    masks = _Masks(attention_mask, prompt + config.max_new_tokens)
    eos = torch.tensor(list(config.eos_token_ids), dtype=torch.long, device=device)
    bar = tqdm(total=config.max_new_tokens, desc="generate", unit="tok", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            if beams > 1:
                return beam_loop(stepper, masks, input_ids, config, eos, device, bar)
            return sample_loop(stepper, masks, input_ids, config, eos, device, bar)
    finally:
        bar.close()
        if was_training:
            model_ref.train()


ENGINES = ("auto", "megatron", "fast", "fast-eager")


def _make_stepper(engine: str, model, inner, rows: int, max_len: int, vocab_size: int):
    if engine not in ENGINES:
        raise TrainConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "megatron":
        from trainer.generate_fast import FastStepper, unsupported_reason

        reason = unsupported_reason(inner)
        if reason is None:
            return FastStepper(model, inner, rows, max_len, vocab_size, use_graph=engine != "fast-eager")
        if engine != "auto":
            raise TrainConfigError(f"the fast generation engine does not support this model: {reason}")
    return _Stepper(model, rows, max_len, vocab_size)


def _forbid_eos(logits: torch.Tensor, eos: torch.Tensor, step: int, config: GenerationConfig) -> torch.Tensor:
    """``min_new_tokens``: EOS is impossible before that many tokens (Transformers' MinNewTokens rule)."""
    if step < config.min_new_tokens and eos.numel():
        # index_fill, not ``logits[:, eos] = ...``: index_put with a device index synchronises with the host,
        # which would stop the loop from queueing the next step while the device runs this one
        logits = logits.index_fill(1, eos, -float("inf"))
    return logits


def sample_loop(stepper, masks, input_ids, config, eos, device, bar) -> GenerationOutput:
    rows = input_ids.size(0)
    sampling = config.sampling
    generator = torch.Generator(device=device).manual_seed(config.seed)
    top_p = sampling.top_p
    out_tokens = torch.zeros((rows, config.max_new_tokens), dtype=torch.long, device=device)
    lengths = torch.full((rows,), config.max_new_tokens, dtype=torch.long, device=device)
    logprobs, step_logits = [], []
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    mask, positions = masks.prefill()
    tokens = input_ids
    prompt_logits = None
    for step in range(config.max_new_tokens):
        logits = stepper(tokens, positions, mask, all_positions=step == 0 and config.return_prompt_logits)
        chosen = None
        if logits is not None:
            if step == 0 and config.return_prompt_logits:
                prompt_logits = logits
            logits = _forbid_eos(logits[:, -1], eos, step, config)
            chosen = choose_tokens(logits, sampling, top_p, generator)
            if config.return_logprobs:
                logprobs.append(torch.log_softmax(logits, -1).gather(-1, chosen[:, None])[:, 0])
            if config.return_logits:
                step_logits.append(logits)
        chosen = stepper.broadcast(chosen, (rows,), torch.long)
        chosen = torch.where(done, out_tokens[:, max(step - 1, 0)], chosen)
        out_tokens[:, step] = chosen
        finished_now = ~done & torch.isin(chosen, eos) if eos.numel() else torch.zeros_like(done)
        lengths = torch.where(finished_now, step + 1, lengths)
        done = done | finished_now
        bar.update(1)
        top_p = decayed_top_p(top_p, sampling.top_p_decay, sampling.top_p_bound)
        # no row can finish while EOS is forbidden (step < min_new_tokens) or absent: skip the stop check's
        # device->host sync there, so the host queues the next step while the device still runs this one
        can_stop = eos.numel() > 0 and step >= config.min_new_tokens
        if step + 1 == config.max_new_tokens or (can_stop and bool(done.all())):
            break
        stepper.start_decode()
        tokens = chosen.view(-1, 1)
        mask, positions = masks.decode(step)
    tokens_out = [out_tokens[i, : int(lengths[i])].tolist() for i in range(rows)]
    result = GenerationOutput(tokens_out)
    if stepper.last and config.return_logprobs:
        lp = torch.stack(logprobs, dim=1)
        result.logprobs = [lp[i, : int(lengths[i])].tolist() for i in range(rows)]
    if stepper.last and config.return_logits:
        result.logits = torch.stack(step_logits, dim=1)
    result.prompt_logits = prompt_logits
    return result


def beam_loop(stepper, masks, input_ids, config, eos, device, bar) -> GenerationOutput:
    beams = config.num_beams
    batch = input_ids.size(0) // beams
    search = BeamSearch(
        batch, beams, config.max_new_tokens, eos.tolist(), config.length_penalty, config.early_stopping, device
    )
    mask, positions = masks.prefill()
    tokens = input_ids
    for step in range(config.max_new_tokens):
        logits = stepper(tokens, positions, mask)
        packed = None
        if logits is not None:
            log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1)
            log_probs = _forbid_eos(log_probs, eos, step, config)
            result = search.step(log_probs)
            packed = torch.cat((result.next_tokens, result.source_rows, result.done.view(1).long()))
        packed = stepper.broadcast(packed, (2 * batch * beams + 1,), torch.long)
        bar.update(1)
        if bool(packed[-1]):  # the step's device -> host sync
            break
        next_tokens, source_rows = packed[: batch * beams], packed[batch * beams: -1]
        stepper.reorder(source_rows)
        masks.reorder(source_rows)
        stepper.start_decode()
        tokens = next_tokens.view(-1, 1)
        mask, positions = masks.decode(step)
    if stepper.last:
        best, scores = search.best(config.num_return_sequences)
        flat = [seq for per_prompt in best for seq in per_prompt]
    else:
        flat, scores = None, None
    flat = _broadcast_object(stepper, flat)
    return GenerationOutput(flat, beam_scores=scores)


def _broadcast_object(stepper: _Stepper, value):
    if stepper.pp_group.size() == 1:
        return value
    holder = [value]
    last = torch.distributed.get_process_group_ranks(stepper.pp_group)[-1]
    torch.distributed.broadcast_object_list(holder, src=last, group=stepper.pp_group)
    return holder[0]


# ------------------------------------------------------------------------------------ data parallel


def gather_across_data_parallel(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate each data-parallel replica's ``tensor`` along ``dim`` (sizes along ``dim`` may differ).

    For evaluation: every DP replica generates (or scores) its own prompts; this gives every replica the
    logits of all of them, in DP-rank order.
    """
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    world = torch.distributed.get_world_size(group)
    if world == 1:
        return tensor
    size = torch.tensor([tensor.size(dim)], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    pad_shape = list(tensor.shape)
    pad_shape[dim] = longest - tensor.size(dim)
    padded = torch.cat((tensor, tensor.new_zeros(pad_shape)), dim=dim).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded, group=group)
    return torch.cat([p.narrow(dim, 0, int(s.item())) for p, s in zip(parts, sizes)], dim=dim)
