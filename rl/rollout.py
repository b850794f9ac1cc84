"""Sampling responses for PPO / GPO / GRPO: one interface, one engine on the model's own forward.

Shapes: P prompts, G samples per prompt, N = P*G sequences, T tokens (prompt + response).
Samples come grouped and in order: rows g*G .. g*G+G-1 are the G samples of prompt g.

A ``Rollout`` holds each sequence as left-padded prompt + right-padded response in one (N, T)
tensor, so one training forward (with ``position_ids`` from the attention mask, as generate
uses) scores it the way it was sampled. Another engine (vLLM on a GPU box, say) only has to
implement ``RolloutEngine.generate`` and return the same ``Rollout``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from dataset.batches import pad_with_mask
from dataset.encoding import stop_ids
from model.logprobs import chunked_grouped_logprobs, position_ids_from_mask, prompt_prefill
from model.lora import adapters_merged


@dataclass
class Rollout:
    sequences: torch.Tensor        # (N, T) left-padded prompt, then the response, then padding
    attention_mask: torch.Tensor   # (N, T) 1 on prompt and response tokens
    response_mask: torch.Tensor    # (N, T) 1 on response tokens up to and including the first stop token
    ended: torch.Tensor            # (N,) bool: the response closed with a stop token
    texts: list[str]               # (N,) decoded responses, special tokens removed
    prompt_index: torch.Tensor     # (N,) which prompt of the batch each sample answers
    num_generations: int           # G
    prompt_len: int                # columns 0..prompt_len-1 hold the (left-padded) prompts
    scorer: Callable | None = field(default=None, repr=False)   # scorer(rollout) -> logps, see below
    # (N, T-1) as ``logps`` but from the sampling forward itself (merged weights, one token at a
    # time, autocast): the same numbers up to rounding. Good for a reward, not for a PPO ratio.
    sampled_logps: torch.Tensor | None = None
    _logps: torch.Tensor | None = field(default=None, repr=False)

    @property
    def logps(self) -> torch.Tensor:
        """(N, T-1) log-prob of sequences[:, t+1] under the sampling policy; 0 off the response.

        Computed by one more forward on first use, which must come before the policy's next
        update; an on-policy single update never asks (its old log-probs are its own, detached).
        """
        if self._logps is None:
            self._logps = self.scorer(self)
        return self._logps

    @property
    def response_lengths(self) -> torch.Tensor:
        """(N,) response tokens, end token included."""
        return self.response_mask.sum(-1)


def is_stop(tokens: torch.Tensor, stop) -> torch.Tensor:
    """Bool tensor like ``tokens``: which are one of ``stop`` (an id or a list of ids)."""
    return torch.isin(tokens, torch.as_tensor(stop, device=tokens.device).reshape(-1))


def response_mask_after_prompt(responses: torch.Tensor, stop) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended) for generated tokens (N, L): 1 up to and including the first stop token
    (``stop``: an id or a list of ids) of each row, 0 after it; ended says which rows contain
    one at all."""
    is_eos = is_stop(responses, stop)
    ended = is_eos.any(-1)
    # Count of end tokens strictly before each position: 0 up to and including the first one.
    before = torch.cumsum(is_eos.int(), -1) - is_eos.int()
    return (before == 0).long(), ended


def token_sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Callable:
    """pick(logits (n, V)) -> next tokens (n,): a draw from softmax(logits / temperature), kept to
    the top_k likeliest tokens (0: all) and then to the smallest set holding top_p of the
    probability (1: all), in that order, as transformers' ``generate`` applies them.

    NaN logits count as 0 and infinite ones as the largest finite value, so a diverged policy
    still samples and its step is skipped as non-finite later (training.loop.Updater.step)
    instead of crashing here. The draw inverts the cumulative distribution at one uniform number
    per row from torch's global generator (a twentieth of what torch.multinomial costs on CPU);
    the sums run in float64, so a token of probability 0 is never picked.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive for sampling, got {temperature}")
    warpers = ([TopKLogitsWarper(top_k)] if top_k > 0 else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])

    def pick(logits: torch.Tensor) -> torch.Tensor:
        scores = torch.nan_to_num(logits.float(), nan=0.0) / temperature
        for warp in warpers:
            scores = warp(None, scores)
        cdf = torch.softmax(scores, -1).cumsum(-1, dtype=torch.float64)             # (n, V)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=torch.float64) * cdf[:, -1:]
        picked = torch.searchsorted(cdf, u, right=True).squeeze(1)              # first i with cdf_i > u
        return picked.clamp_(max=cdf.shape[1] - 1)                               # u == total: rounding, 1 in 2^50
    return pick


@torch.no_grad()
def decode(model, prompts: torch.Tensor, prompt_mask: torch.Tensor, num_generations: int, max_new_tokens: int,
           stop, pad_id: int, pick: Callable, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(responses (N, L), logps (N, L)) for prompts (P, Tp) (left-padded, prompt_mask 1 on real
    tokens), G = num_generations per prompt, N = P*G, rows g*G..g*G+G-1 answering prompt g,
    L <= max_new_tokens; logps[i, j] = log softmax(logits / temperature) of responses[i, j].

    The model's own forward with a KV cache, one token per step, ``pick`` choosing it from the
    logits. Each prompt runs once and its keys and values are repeated for its G samples; a row
    that has produced a ``stop`` token (an id or a list: the turn end, eos, the model's own stop
    tokens) leaves the batch (its cache rows are dropped), so a step costs what the unfinished
    rows cost; it stops when none is left. Everything after a row's stop token is
    pad_id (and its log-prob 0). Position ids follow the real tokens (attention mask cumsum), as
    the training forward's do.
    """
    G, N = num_generations, prompts.shape[0] * num_generations
    logits, cache = prompt_prefill(model, prompts, prompt_mask, G)
    logits = logits[:, -1]                                                           # (N, V)
    mask = prompt_mask.repeat_interleave(G, 0)                                       # of the rows still going
    position = position_ids_from_mask(prompt_mask)[:, -1:].repeat_interleave(G, 0)
    rows = torch.arange(N, device=prompts.device)                                    # which rows are still going
    out = torch.full((N, max_new_tokens), pad_id, dtype=prompts.dtype, device=prompts.device)
    out_logps = torch.zeros(N, max_new_tokens, device=prompts.device)
    steps = 0
    for t in range(max_new_tokens):
        tokens = pick(logits)
        out[rows, t] = tokens
        out_logps[rows, t] = torch.log_softmax(logits.float() / temperature, -1).gather(1, tokens[:, None]).squeeze(1)
        steps = t + 1
        going = ~is_stop(tokens, stop)
        n_going = int(going.sum())                          # a step's host sync (one more when rows finish)
        if t + 1 == max_new_tokens or n_going == 0:
            break
        if n_going < len(going):
            keep = going.nonzero().squeeze(1)
            rows, tokens, mask, position = rows[keep], tokens[keep], mask[keep], position[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        position = position + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                       past_key_values=cache, use_cache=True).logits[:, -1]
    return out[:, :steps], out_logps[:, :steps]


class RolloutEngine:
    """Samples G responses per prompt. Implementations return a ``Rollout``."""

    def generate(self, prompt_ids: list[list[int]], num_generations: int) -> Rollout:
        raise NotImplementedError


class HFRolloutEngine(RolloutEngine):
    """The transformers model's own forward and KV cache in this process (``decode``), prompts
    left-padded, G samples per prompt, each prompt computed once, finished rows leaving the batch.

    ``model`` is the unwrapped module (not the DDP wrapper: sampling feeds no gradient); under
    torchrun each rank calls ``generate`` with its own prompts. With ``merge`` the LoRA adapters
    are folded into a temporary copy of the weights while sampling (model.lora.adapters_merged).
    The sampling-time log-probs (``Rollout.logps``, computed when first asked for) come from a
    second forward over the finished sequences with the same function, temperature and position
    ids the training forward uses, so the PPO ratio starts at exactly 1 (the decoding forward's
    own scores are after top-k/top-p filtering, and rounded differently).
    """

    def __init__(self, model, tokenizer, max_gen_len: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, autocast=contextlib.nullcontext, logprob_batch_size: int = 64, merge: bool = True):
        self.pick = token_sampler(temperature, top_k, top_p)
        self.model, self.tokenizer = model, tokenizer
        self.max_gen_len, self.temperature, self.top_p, self.top_k = max_gen_len, temperature, top_p, top_k
        self.autocast, self.logprob_batch_size, self.merge = autocast, logprob_batch_size, merge
        self.stop_ids, self.pad_id = stop_ids(tokenizer), tokenizer.pad_token_id   # turn end, eos, the model's own

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_generations: int) -> Rollout:
        device = next(self.model.parameters()).device
        G = num_generations
        prompts, prompt_mask = (t.to(device) for t in pad_with_mask(prompt_ids, self.pad_id, side="left"))  # (P, Tp)
        was_training = self.model.training
        self.model.eval()
        try:
            with adapters_merged(self.model) if self.merge else contextlib.nullcontext(), self.autocast():
                responses, logps = decode(self.model, prompts, prompt_mask, G, self.max_gen_len, self.stop_ids,
                                          self.pad_id, self.pick, self.temperature)       # (N, L) each
        finally:
            self.model.train(was_training)
        Tp = prompts.shape[1]
        mask, ended = response_mask_after_prompt(responses, self.stop_ids)            # decode padded after the end
        prompt_mask = prompt_mask.repeat_interleave(G, 0)
        sequences = torch.cat([prompts.repeat_interleave(G, 0), responses], 1)              # (N, T)
        attention_mask = torch.cat([prompt_mask, mask], 1)
        response_mask = torch.cat([torch.zeros_like(prompt_mask), mask], 1)
        # entry t of the (N, T-1) layout scores sequences[:, t+1]: the first response token is at Tp-1
        sampled_logps = torch.cat([logps.new_zeros(len(logps), Tp - 1), logps], 1)
        texts = [self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                 for r, m in zip(responses, mask)]
        return Rollout(sequences=sequences, attention_mask=attention_mask, response_mask=response_mask,
                       ended=ended, texts=texts,
                       prompt_index=torch.arange(len(prompt_ids), device=device).repeat_interleave(G),
                       num_generations=G, prompt_len=Tp, scorer=self.sampling_logprobs, sampled_logps=sampled_logps)

    @torch.no_grad()
    def sampling_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """(N, T-1) log-probs of a rollout's tokens under the model as it is now, in eval mode,
        about logprob_batch_size rows (whole groups) at a time; 0 off the response."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.autocast():
                logps = chunked_grouped_logprobs(self.model, rollout.sequences, rollout.attention_mask,
                                                 rollout.prompt_len, rollout.num_generations, self.temperature,
                                                 self.logprob_batch_size)
        finally:
            self.model.train(was_training)
        return logps * rollout.response_mask[:, 1:]
