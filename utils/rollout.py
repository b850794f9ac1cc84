"""Sampling responses for PPO / GPO / GRPO: one interface, one engine on transformers' generate.

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

from dataset.data import pad_batch
from model.lora import adapters_merged
from utils.logprobs import chunked_grouped_logprobs


@dataclass
class Rollout:
    sequences: torch.Tensor        # (N, T) left-padded prompt, then the response, then padding
    attention_mask: torch.Tensor   # (N, T) 1 on prompt and response tokens
    response_mask: torch.Tensor    # (N, T) 1 on response tokens up to and including the first end token
    ended: torch.Tensor            # (N,) bool: the response closed with the end token
    texts: list[str]               # (N,) decoded responses, special tokens removed
    prompt_index: torch.Tensor     # (N,) which prompt of the batch each sample answers
    num_generations: int           # G
    prompt_len: int                # columns 0..prompt_len-1 hold the (left-padded) prompts
    scorer: Callable | None = field(default=None, repr=False)   # scorer(rollout) -> logps, see below
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


def response_mask_after_prompt(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended) for generated tokens (N, L): 1 up to and including the first ``eos_id``
    of each row, 0 after it; ended says which rows contain ``eos_id`` at all."""
    is_eos = responses == eos_id
    ended = is_eos.any(-1)
    # Count of end tokens strictly before each position: 0 up to and including the first one.
    before = torch.cumsum(is_eos.int(), -1) - is_eos.int()
    return (before == 0).long(), ended


class RolloutEngine:
    """Samples G responses per prompt. Implementations return a ``Rollout``."""

    def generate(self, prompt_ids: list[list[int]], num_generations: int) -> Rollout:
        raise NotImplementedError


class HFRolloutEngine(RolloutEngine):
    """transformers ``generate`` with a KV cache, prompts left-padded, G samples per prompt.

    ``model`` is the unwrapped module (not the DDP wrapper: sampling feeds no gradient); under
    torchrun each rank calls ``generate`` with its own prompts. With ``merge`` the LoRA adapters
    are folded into a temporary copy of the weights while sampling (model.lora.adapters_merged).
    The sampling-time log-probs (``Rollout.logps``, computed when first asked for) come from a
    second forward over the finished sequences with the same function, temperature and position
    ids the training forward uses, so the PPO ratio starts at exactly 1 (generate's own scores
    are after top-k/top-p filtering).
    """

    def __init__(self, model, tokenizer, max_gen_len: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, autocast=contextlib.nullcontext, logprob_batch_size: int = 64, merge: bool = True):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive for sampling, got {temperature}")
        self.model, self.tokenizer = model, tokenizer
        self.max_gen_len, self.temperature, self.top_p, self.top_k = max_gen_len, temperature, top_p, top_k
        self.autocast, self.logprob_batch_size, self.merge = autocast, logprob_batch_size, merge
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_generations: int) -> Rollout:
        device = next(self.model.parameters()).device
        G = num_generations
        prompts = pad_batch(prompt_ids, self.pad_id, side="left").to(device)                   # (P, Tp)
        prompt_mask = pad_batch([[1] * len(p) for p in prompt_ids], 0, side="left").to(device)
        was_training = self.model.training
        self.model.eval()
        try:
            with adapters_merged(self.model) if self.merge else contextlib.nullcontext(), self.autocast():
                # num_return_sequences expands each prompt G times inside generate (grouped, in order).
                out = self.model.generate(
                    input_ids=prompts, attention_mask=prompt_mask, do_sample=True, temperature=self.temperature,
                    top_p=self.top_p, top_k=self.top_k, max_new_tokens=self.max_gen_len,
                    num_return_sequences=G, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                    # a diverged policy (nan/inf logits) still samples, so its step is skipped as
                    # non-finite (utils.train.step_optimizers) instead of crashing inside sampling
                    remove_invalid_values=True)
        finally:
            self.model.train(was_training)
        Tp = prompts.shape[1]
        responses = out[:, Tp:]                                                              # (N, L)
        mask, ended = response_mask_after_prompt(responses, self.eos_id)
        responses = responses.masked_fill(mask == 0, self.pad_id)
        prompt_mask = prompt_mask.repeat_interleave(G, 0)
        sequences = torch.cat([prompts.repeat_interleave(G, 0), responses], 1)              # (N, T)
        attention_mask = torch.cat([prompt_mask, mask], 1)
        response_mask = torch.cat([torch.zeros_like(prompt_mask), mask], 1)
        texts = [self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                 for r, m in zip(responses, mask)]
        return Rollout(sequences=sequences, attention_mask=attention_mask, response_mask=response_mask,
                       ended=ended, texts=texts,
                       prompt_index=torch.arange(len(prompt_ids), device=device).repeat_interleave(G),
                       num_generations=G, prompt_len=Tp, scorer=self.sampling_logprobs)

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
