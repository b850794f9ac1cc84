"""The supervised fine-tuning loss. Tensors in, ``(loss, metrics)`` out.

Shapes: B batch, T tokens, V vocabulary.
"""
from __future__ import annotations

import torch

from model.logprobs import token_logprobs


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """Mean negative log-likelihood over the loss_mask tokens of the batch.

    logits (B, T, V) from a forward over input_ids (B, T); loss_mask (B, T) with 1 on the tokens
    to predict (each assistant response and its end-of-turn token), 0 on the context and padding.

        loss = -sum_t m_t log pi(x_t | x_<t) / sum_t m_t      over t >= 1 (x_0 has no prediction)

    Returns (loss, {}): SFT logs its loss alone.
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape or loss_mask.shape != input_ids.shape:
        raise ValueError(f"sft_loss expects logits (B, T, V) with input_ids and loss_mask (B, T), got "
                         f"{tuple(logits.shape)}, {tuple(input_ids.shape)} and {tuple(loss_mask.shape)}")
    logps = token_logprobs(logits, input_ids)                # (B, T-1)
    mask = loss_mask[:, 1:].to(logps.dtype)
    return -(logps * mask).sum() / mask.sum().clamp(min=1), {}
