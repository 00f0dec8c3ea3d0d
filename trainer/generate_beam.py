"""Batched beam search bookkeeping with Transformers' length-penalty and early-stopping semantics.

Megatron-Core 0.16 has no beam search. Users compare our output with Transformers', so this follows the
rules of ``GenerationMixin._beam_search`` (Transformers >= 4.50) exactly, including its float arithmetic:

* every step keeps the ``K = max(2, 1 + #eos) * num_beams`` best continuations over all beams of a prompt;
* a continuation that ends in EOS or reaches ``max_new_tokens`` is a *finished hypothesis* candidate, but
  only if it is among the first ``num_beams`` of the K; its score is ``sum logprob / new_len **
  length_penalty`` where ``new_len`` counts generated tokens, EOS included;
* the ``num_beams`` best finished hypotheses are kept; with ``early_stopping=True`` none is added once all
  ``num_beams`` slots are finished; otherwise a heuristic stops adding once the best running beam,
  divided by ``(generated so far) ** length_penalty`` (or by ``max_new_tokens ** length_penalty`` for
  ``early_stopping="never"`` and a positive penalty), cannot beat the worst finished one;
* the search ends when no prompt can improve, or (early stopping) all slots are finished everywhere, or
  every continuation hit a stopping condition.

The model side (forward passes, KV cache reordering) lives in :mod:`trainer.generate`; this class only
sees log-probabilities and answers which beams continue with which tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_NEG = -1.0e9  # Transformers' "impossible" score; kept identical so that ties resolve identically


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[b, index[b, j], ...]`` for a [B, N, ...] tensor and a [B, M] index."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


@dataclass
class BeamStep:
    """What the decode loop needs after one step: the tokens to feed and where each beam came from."""

    next_tokens: torch.Tensor  # [B * num_beams]
    source_rows: torch.Tensor  # [B * num_beams] rows of the previous step's batch (KV-cache reorder)
    done: torch.Tensor  # 0-dim bool on the search's device: the caller syncs once per step, not this class


class BeamSearch:
    """State of a batched beam search over ``batch`` prompts with ``num_beams`` beams each."""

    def __init__(
        self,
        batch: int,
        num_beams: int,
        max_new_tokens: int,
        eos_token_ids: list[int],
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        device: torch.device | str = "cpu",
    ):
        self.batch, self.num_beams, self.max_new = batch, num_beams, max_new_tokens
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
        self.keep = max(2, 1 + len(self.eos)) * num_beams
        self.top_beams = torch.arange(self.keep, device=device) < num_beams
        shape = (batch, num_beams)
        self.running_tokens = torch.zeros(shape + (max_new_tokens,), dtype=torch.long, device=device)
        self.running_scores = torch.zeros(shape, dtype=torch.float32, device=device)
        self.running_scores[:, 1:] = _NEG  # only beam 0 may expand at the first step
        self.finished_tokens = self.running_tokens.clone()
        self.finished_scores = torch.full(shape, _NEG, dtype=torch.float32, device=device)
        self.finished_lengths = torch.zeros(shape, dtype=torch.long, device=device)
        self.finished = torch.zeros(shape, dtype=torch.bool, device=device)
        self.improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
        self.step_index = 0
        self._row_offset = (torch.arange(batch, device=device) * num_beams).view(-1, 1)

    def step(self, log_probs: torch.Tensor) -> BeamStep:
        """Advance by one token given this step's (processed) log-probabilities [B * num_beams, V]."""
        B, n, t = self.batch, self.num_beams, self.step_index
        vocab = log_probs.size(-1)
        scores = log_probs.float().view(B, n, vocab) + self.running_scores[:, :, None]
        top_scores, top_index = torch.topk(scores.view(B, n * vocab), k=self.keep)
        source_beam = top_index // vocab
        tokens = top_index % vocab
        candidates = _gather(self.running_tokens, source_beam)
        candidates[:, :, t] = tokens
        hits = torch.isin(tokens, self.eos) | (t + 1 >= self.max_new)

        # the best num_beams continuations that did not stop keep running
        running_scores = top_scores + hits.to(torch.float32) * _NEG
        chosen = torch.topk(running_scores, k=n).indices
        self.running_tokens = _gather(candidates, chosen)
        self.running_scores = _gather(running_scores, chosen)
        source_rows = (_gather(source_beam, chosen) + self._row_offset).reshape(-1)

        self._update_finished(candidates, top_scores, hits, t)
        self.step_index = t = t + 1
        self._update_improvable(t)
        open_beam = ~(self.finished.all() & (self.early_stopping is True))
        done = ~(self.improvable.any() & open_beam & ~hits.all())
        return BeamStep(self.running_tokens[:, :, t - 1].reshape(-1), source_rows, done)

    def _update_finished(self, candidates, top_scores, hits, t) -> None:
        just_finished = hits & self.top_beams[None, :]
        scores = top_scores / ((t + 1) ** self.length_penalty)
        full = self.finished.all(dim=-1, keepdim=True) & (self.early_stopping is True)
        scores += full.to(torch.float32) * _NEG
        scores += (~self.improvable).to(torch.float32) * _NEG
        scores += (~just_finished) * _NEG
        merged_scores = torch.cat((self.finished_scores, scores), dim=1)
        best = torch.topk(merged_scores, k=self.num_beams).indices
        lengths = torch.full_like(just_finished, t + 1, dtype=torch.long)
        self.finished_tokens = _gather(torch.cat((self.finished_tokens, candidates), dim=1), best)
        self.finished_scores = _gather(merged_scores, best)
        self.finished_lengths = _gather(torch.cat((self.finished_lengths, lengths), dim=1), best)
        self.finished = _gather(torch.cat((self.finished, just_finished), dim=1), best)

    def _update_improvable(self, generated: int) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_new
        else:
            best_length = generated
        best_possible = self.running_scores[:, :1] / (best_length ** self.length_penalty)
        worst_finished = torch.where(
            self.finished, torch.min(self.finished_scores, dim=1, keepdim=True)[0], _NEG
        )
        self.improvable = self.improvable & torch.any(best_possible > worst_finished, dim=-1, keepdim=True)

    def best(self, num_return_sequences: int = 1) -> tuple[list[list[list[int]]], torch.Tensor]:
        """Per prompt, the ``num_return_sequences`` best hypotheses (token lists) and their scores."""
        out = []
        for b in range(self.batch):
            out.append([
                self.finished_tokens[b, j, : int(self.finished_lengths[b, j])].tolist()
                for j in range(num_return_sequences)
            ])
        return out, self.finished_scores[:, :num_return_sequences].clone()
