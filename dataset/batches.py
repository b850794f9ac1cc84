"""Padding and batches: token id lists into padded tensors with their masks.
"""
from __future__ import annotations

import torch


def pad_batch(seqs: list[list[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """(B, T) tensor of the sequences padded to the longest one."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
    return out


def pad_with_mask(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T)): the sequences padded to the longest one, and 1 on their real tokens."""
    return pad_batch(seqs, pad_id, side), pad_batch([[1] * len(s) for s in seqs], 0, side)


def collate_sft(batch, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids (B, T), attention_mask (B, T) and loss_mask (B, T)."""
    input_ids, attention_mask = pad_with_mask([b[0] for b in batch], pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": pad_batch([b[1] for b in batch], 0),
    }


def collate_pairs(items, pad_id: int) -> dict:
    """Preference pairs as one batch, each pair's chosen and rejected side by side, sharing one
    prompt computation.

    items: (prompt_ids, chosen_ids, rejected_ids) from dataset.encoding.encode_pairs. Returns
    input_ids, attention_mask and response_mask, each (2B, Tp + Lr): row 2i is pair i's chosen
    sequence, row 2i+1 its rejected one (``pair_rows`` splits them); each row is the prompt
    left-padded to Tp, then the response right-padded to Lr. ``prompt_len`` is Tp. The rows of a
    pair share columns 0..Tp-1, which model.logprobs.grouped_token_logprobs runs once per pair;
    a plain forward (position ids from the attention mask) scores them as unpadded sequences.
    """
    prompts = [p for p, _, _ in items for _ in range(2)]
    responses = [r for _, c, rj in items for r in (c, rj)]
    prompt_ids, prompt_mask = pad_with_mask(prompts, pad_id, side="left")
    response_ids, response_mask = pad_with_mask(responses, pad_id)
    return {
        "input_ids": torch.cat([prompt_ids, response_ids], 1),
        "attention_mask": torch.cat([prompt_mask, response_mask], 1),
        "response_mask": torch.cat([torch.zeros_like(prompt_mask), response_mask], 1),
        "prompt_len": prompt_ids.shape[1],
    }


def pair_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (B, ...), rejected (B, ...)) of one value per row (2B, ...) of a collate_pairs batch."""
    return values[0::2], values[1::2]
