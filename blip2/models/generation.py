"""Decoding for the Q-Former's own captioning head: greedy, beam search and nucleus sampling with a KV cache.

The decoder is given as a ``step`` callable: (new token ids (N, 1), cache) -> (next-token logits (N, V), cache),
where the cache is a tuple of per-layer (keys, values) with the batch first, so beams can be reordered with
``index_select``.
"""

from __future__ import annotations

from typing import Callable

import torch

Cache = tuple[tuple[torch.Tensor, torch.Tensor], ...]
StepFn = Callable[[torch.Tensor, Cache, int], tuple[torch.Tensor, Cache]]


def _reorder(cache: Cache, index: torch.Tensor) -> Cache:
    return tuple((keys.index_select(0, index), values.index_select(0, index)) for keys, values in cache)


def _penalize(logits: torch.Tensor, sequences: torch.Tensor, repetition_penalty: float) -> torch.Tensor:
    if repetition_penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, sequences)
    seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
    return logits.scatter(1, sequences, seen)


def _block_eos(logits: torch.Tensor, length: int, min_length: int, eos_token_id: int) -> torch.Tensor:
    if length < min_length:
        logits[:, eos_token_id] = float("-inf")
    return logits


@torch.no_grad()
def sample_or_greedy(
    step: StepFn,
    cache: Cache,
    bos: torch.Tensor,
    max_length: int,
    min_length: int,
    eos_token_id: int,
    pad_token_id: int,
    do_sample: bool = False,
    top_p: float = 1.0,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
) -> torch.Tensor:
    """Decode from ``bos`` (N, 1) until eos or ``max_length`` tokens (bos included); pads finished rows."""
    sequences = bos
    finished = torch.zeros(bos.shape[0], dtype=torch.bool, device=bos.device)
    next_ids = bos
    while sequences.shape[1] < max_length:
        logits, cache = step(next_ids, cache, sequences.shape[1] - 1)
        logits = _penalize(logits.float(), sequences, repetition_penalty)
        logits = _block_eos(logits, sequences.shape[1], min_length, eos_token_id)
        if do_sample:
            probs = _top_p_filter(logits / max(temperature, 1e-5), top_p).softmax(-1)
            token = torch.multinomial(probs, 1).squeeze(1)
        else:
            token = logits.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        sequences = torch.cat((sequences, token[:, None]), dim=1)
        finished |= token == eos_token_id
        next_ids = token[:, None]
        if bool(finished.all()):
            break
    return sequences


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


@torch.no_grad()
def beam_search(
    step: StepFn,
    cache: Cache,
    bos: torch.Tensor,
    num_beams: int,
    max_length: int,
    min_length: int,
    eos_token_id: int,
    pad_token_id: int,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    num_return_sequences: int = 1,
) -> torch.Tensor:
    """Beam search. ``bos`` (B * num_beams, 1) and ``cache`` are already repeated per beam (beam-major per input).

    Finished hypotheses are scored by sum log-prob / length ** length_penalty; returns (B * num_return, T).
    """
    batch = bos.shape[0] // num_beams
    device = bos.device
    sequences = bos
    beam_scores = torch.zeros(batch, num_beams, device=device)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    beams = _Beams(num_beams, eos_token_id, pad_token_id, length_penalty, batch, beam_scores.view(-1))
    next_ids = bos
    while sequences.shape[1] < max_length and not all(beams.done):
        logits, cache = step(next_ids, cache, sequences.shape[1] - 1)
        logits = _penalize(logits.float(), sequences, repetition_penalty)
        logits = _block_eos(logits, sequences.shape[1], min_length, eos_token_id)
        log_probs = logits.log_softmax(-1) + beams.scores[:, None]  # (B*K, V)
        index, next_tokens = beams.advance(log_probs.view(batch, -1), log_probs.shape[-1], sequences)
        sequences = torch.cat((sequences.index_select(0, index), next_tokens[:, None]), 1)
        cache = _reorder(cache, index)
        next_ids = sequences[:, -1:]
    results = [hypothesis for b in range(batch) for hypothesis in beams.best(b, sequences, num_return_sequences)]
    longest = max(len(h) for h in results)
    out = torch.full((len(results), longest), pad_token_id, dtype=bos.dtype, device=device)
    for row, hypothesis in enumerate(results):
        out[row, : len(hypothesis)] = hypothesis
    return out


class _Beams:
    """The running beams' scores and each input's finished hypotheses (score / length ** length_penalty)."""

    def __init__(self, num_beams: int, eos_token_id: int, pad_token_id: int, length_penalty: float, batch: int,
                 scores: torch.Tensor) -> None:
        self.num_beams, self.eos_token_id, self.pad_token_id = num_beams, eos_token_id, pad_token_id
        self.length_penalty = length_penalty
        self.scores = scores  # (B*K,)
        self.finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
        self.done = [False] * batch

    def advance(self, log_probs: torch.Tensor, vocab: int, sequences: torch.Tensor):
        """Pick the next K beams of every input from its 2K best (beam, token) pairs; a pair ending in EOS becomes
        a finished hypothesis instead. Returns the source rows (B*K,) and their new tokens (B*K,)."""
        top_scores, top_index = log_probs.topk(2 * self.num_beams, dim=1)  # (B, 2K)
        new_length = sequences.shape[1] + 1
        next_beams, next_tokens, next_scores = [], [], []
        for b in range(log_probs.shape[0]):
            pairs = zip(top_scores[b].tolist(), (top_index[b] // vocab).tolist(), (top_index[b] % vocab).tolist())
            self._choose(b, pairs, sequences, new_length, (next_beams, next_tokens, next_scores))
            if not self.done[b] and len(self.finished[b]) >= self.num_beams:
                best_running = max(next_scores[-self.num_beams:]) / new_length**self.length_penalty
                worst_kept = sorted((s for s, _ in self.finished[b]), reverse=True)[self.num_beams - 1]
                self.done[b] = worst_kept >= best_running
        device = log_probs.device
        self.scores = torch.tensor(next_scores, device=device)
        return torch.tensor(next_beams, device=device), torch.tensor(next_tokens, device=device)

    def _choose(self, b: int, pairs, sequences: torch.Tensor, new_length: int, out: tuple[list, list, list]) -> None:
        next_beams, next_tokens, next_scores = out
        chosen = 0
        for score, beam, token in pairs:
            source = b * self.num_beams + beam
            if self.done[b]:  # keep the batch shape: pad, with only the first copy alive
                next_beams.append(source)
                next_tokens.append(self.pad_token_id)
                next_scores.append(float("-inf") if chosen else 0.0)
                chosen += 1
            elif token == self.eos_token_id:
                hypothesis = torch.cat((sequences[source], torch.tensor([token], device=sequences.device)))
                self.finished[b].append((score / new_length**self.length_penalty, hypothesis))
                continue
            else:
                next_beams.append(source)
                next_tokens.append(token)
                next_scores.append(score)
                chosen += 1
            if chosen == self.num_beams:
                break

    def best(self, b: int, sequences: torch.Tensor, count: int) -> list[torch.Tensor]:
        """Input ``b``'s ``count`` best hypotheses: the finished ones, and its running beams if it is not done."""
        hypotheses = list(self.finished[b])
        if not self.done[b]:
            for k in range(self.num_beams):
                row = b * self.num_beams + k
                score = self.scores[row].item()
                if score > float("-inf"):
                    hypotheses.append((score / sequences.shape[1] ** self.length_penalty, sequences[row]))
        hypotheses.sort(key=lambda item: item[0], reverse=True)
        return [h for _, h in hypotheses[:count]]
