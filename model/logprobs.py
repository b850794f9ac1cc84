"""Log-probabilities of tokens and sequences: one place for shift, gather and mask.

Shapes: B batch, T tokens, V vocabulary.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from dataset.batches import pair_rows
from model.packing import group_size, pack_groups

# Logits (positions x vocabulary) the output head computes at once when it scores responses
# (32 MiB in fp32; a chunk's softmax and gradient hold two more such blocks): a 151,936-token
# vocabulary runs 55 positions a chunk, the demo's 1,116 about 7,500. 0: the model's own forward
# computes the whole (positions x vocabulary) block.
HEAD_CHUNK_LOGITS = 1 << 23


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(x_t | x_<t) for t = 1..T-1.

    logits: (B, T, V) from a forward over input_ids (B, T). Returns (B, T-1): entry t is the
    log-prob of input_ids[:, t+1] given the tokens before it. Computed as gather minus
    logsumexp, in fp32, which avoids materialising a (B, T, V) log-softmax.
    """
    return target_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at ``targets``: logits (B, L, V), targets (B, L) -> (B, L),
    as gather minus logsumexp in fp32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def masked_reduce(values: torch.Tensor, mask: torch.Tensor, reduce: str) -> torch.Tensor:
    """Sum or mean of values (B, L) over mask (B, L) per row -> (B,). A row with an empty
    mask has mean 0."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum(-1)
    if reduce == "sum":
        return total
    if reduce == "mean":
        return total / mask.sum(-1).clamp(min=1)
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each row, whatever the padding side."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(-1).long().argmax(-1)


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) each row's value (B, T) at its last real token: a reward model's score of it."""
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                      reduce: str = "mean", temperature: float = 1.0) -> torch.Tensor:
    """l(y) = sum (or mean) over response tokens of log pi(y_t | x, y_<t).

    logits (B, T, V), input_ids (B, T), response_mask (B, T) with 1 on response tokens of
    input_ids (prompt and padding 0). Returns (B,). Padding anywhere (left or right) changes
    nothing as long as the forward was given the matching attention mask.
    """
    per_token = token_logprobs(logits, input_ids, temperature)      # (B, T-1)
    return masked_reduce(per_token, response_mask[:, 1:], reduce)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted over real tokens only, as transformers' generate counts them,
    so a left-padded prompt is scored at the positions it was sampled at."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def model_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0,
                         first_needed: int = 1, with_entropy: bool = False):
    """Forward ``model`` and return token_logprobs (B, T-1): entry t is log pi(input_ids[:, t+1]);
    with ``with_entropy``, (logps, entropy (B, T-1)) of the same next-token distributions.

    The language-model head runs only from position ``first_needed - 1`` on
    (``logits_to_keep``), in chunks (``head_logprobs``); entries for tokens before
    ``first_needed`` are 0. The prompt positions before the first response token need no
    logits, and with a vocabulary-sized head they are most of the memory of the forward.
    """
    T = input_ids.shape[1]
    first_needed = max(1, min(first_needed, T - 1))
    keep = T - first_needed + 1
    logps, ent = forward_head_logprobs(
        model, dict(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), logits_to_keep=keep),
        input_ids[:, T - keep + 1:], lambda x: x[:, :-1], temperature, with_entropy)       # (B, keep-1)
    pad = (T - keep, 0)
    logps = torch.nn.functional.pad(logps, pad)
    if not with_entropy:
        return logps
    return logps, torch.nn.functional.pad(ent, pad)


def model_sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            response_mask: torch.Tensor, reduce: str = "mean",
                            temperature: float = 1.0) -> torch.Tensor:
    """Forward ``model`` and return sequence_logprobs (B,) of the response tokens (the head
    runs only from the earliest response token of the batch on)."""
    has_response = response_mask.any(-1)
    starts = response_mask.int().argmax(-1)[has_response]                       # first response index per row
    first = int(starts.min()) if starts.numel() else 1
    per_token = model_token_logprobs(model, input_ids, attention_mask, temperature, first_needed=first)
    return masked_reduce(per_token, response_mask[:, 1:], reduce)


def prompt_prefill(model, prompts: torch.Tensor, prompt_mask: torch.Tensor, G: int):
    """(logits (P*G, 1, V), cache): each prompt (P, Tp, left-padded) run once, the logits of the
    token after it and its keys and values repeated G times, in order (rows g*G..g*G+G-1 for
    prompt g), for G continuations to attend to."""
    head = model(input_ids=prompts, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                 use_cache=True, logits_to_keep=1)
    cache = head.past_key_values
    cache.batch_repeat_interleave(G)
    return head.logits.repeat_interleave(G, 0), cache


def shared_prompt_logprobs(model, prompts: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
                           response_mask: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False):
    """(logps (N, Lr), entropy (N, Lr) or None) of response tokens, each prompt run once for all
    its continuations.

    prompts (P, Tp) left-padded, prompt_mask (P, Tp); responses (N, Lr) right-padded with
    response_mask (N, Lr) 1 on real tokens, N = P*G, rows g*G..g*G+G-1 continuing prompt g
    (the G samples of a prompt; DPO's chosen and rejected, G = 2). Entry j is
    log pi(responses[:, j] | prompt, responses[:, :j]); entries off response_mask are 0.

    The prompt forward (P rows) keeps its keys and values; they are repeated G times and the
    responses attend to them in a second forward, so the prompt costs 1/G of what it costs in
    model_token_logprobs over the N concatenated rows, whose values this equals up to rounding.
    Gradients flow through both forwards. Needs a model that takes ``past_key_values`` (every
    transformers causal LM does).
    """
    Tp, Lr = prompts.shape[1], responses.shape[1]
    G = group_size(prompts.shape[0], responses.shape[0])
    logits, cache = prompt_prefill(model, prompts, prompt_mask, G)               # (N, 1, V): first response token
    logps = target_logprobs(logits, responses[:, :1], temperature)                # (N, 1)
    with torch.no_grad():
        ent = token_entropy(logits / temperature) if with_entropy else None
    if Lr > 1:
        mask = torch.cat([prompt_mask.repeat_interleave(G, 0), response_mask], 1)[:, :-1]       # (N, Tp+Lr-1)
        rest, rest_ent = forward_head_logprobs(
            model, dict(input_ids=responses[:, :-1], attention_mask=mask, position_ids=position_ids_from_mask(mask)[:, Tp:],
                        past_key_values=cache, use_cache=True), responses[:, 1:], None, temperature, with_entropy)
        logps = torch.cat([logps, rest], 1)                                       # (N, Lr)
        ent = torch.cat([ent, rest_ent], 1) if with_entropy else None
    keep = response_mask.to(torch.float32)
    return logps * keep, None if ent is None else ent * keep


def packed_prompt_logprobs(model, prompts: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
                           response_mask: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False,
                           layout=None):
    """shared_prompt_logprobs's (logps (N, Lr), entropy or None), in one forward: each group
    (a prompt and its G responses) packed into a row beside other groups, with a tree-shaped
    attention mask (model.packing.pack_groups; ``layout``: that packing, if already made), and
    the output head run only on the positions that predict a response token. Needs an
    attention that takes a 4D mask (sdpa, eager) and no attention window shorter than the
    packed rows (see grouped_token_logprobs)."""
    packed, lm = layout or pack_groups(prompts, prompt_mask, responses, response_mask), _lm_module(model)
    mask = packed.attention_mask
    if lm.config._attn_implementation == "eager":                      # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    picked = packed.predictors
    # (R, L, X) -> (K, X): the head is needed only at the positions that predict a response token
    lp, ent = forward_head_logprobs(model, dict(input_ids=packed.input_ids, attention_mask=mask,
                                                position_ids=packed.position_ids, logits_to_keep=0),
                                    packed.targets, lambda x: x.flatten(0, 1)[picked], temperature, with_entropy)
    logps = responses.new_zeros(responses.shape, dtype=torch.float32)
    logps[packed.rows, packed.cols] = lp
    if not with_entropy:
        return logps, None
    entropy = torch.zeros_like(logps)
    entropy[packed.rows, packed.cols] = ent
    return logps, entropy


def takes_tree_mask(model) -> bool:
    """Whether the model's attention takes a custom 4D mask (sdpa and eager do; flash-attention
    kernels take only padding masks)."""
    return _lm_module(model).config._attn_implementation in ("sdpa", "eager")


def attention_window(config) -> int | None:
    """The sliding-window length of any layer of a transformers config (Mistral, Gemma 2/3,
    Phi-3, Qwen2/3 with ``use_sliding_window``), or None when every layer sees the whole
    sequence. A query sees the ``window`` keys up to and including itself."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if any("sliding" in t for t in layer_types) else None
    return None if getattr(config, "use_sliding_window", True) is False else window


def grouped_token_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                           group: int = 1, temperature: float = 1.0, with_entropy: bool = False,
                           packed: bool | None = None):
    """(logps (N, T-1), entropy (N, T-1) or None) in model_token_logprobs's layout, for rows that
    hold a left-padded prompt in columns < prompt_len and a right-padded response after it,
    ``group`` consecutive rows sharing one prompt (a rollout's G samples, DPO's pair).

    With group > 1 each prompt is run once, columns that are padding in every row are cut off
    first, and entries off the attention mask are 0: packed into rows with a tree-shaped mask
    (packed_prompt_logprobs, one forward) where the attention takes one (``packed`` None: ask
    the model; True or False to choose), else the prompt first and the responses against its
    keys and values (shared_prompt_logprobs). The packed rows are used only where no attention
    window is shorter than them (``attention_window``), since a sliding window counts
    positions of the plain sequence, not of the tree. With group 1 it is the plain forward
    (policy_forward), whose padding entries are not zeroed. Either way entries before the
    response are 0 and callers mask by the response.
    """
    N, T = sequences.shape
    if group <= 1:
        return policy_forward(model, sequences, attention_mask, temperature, prompt_len, with_entropy)
    if N % group:
        raise ValueError(f"{N} rows are not whole groups of {group}")
    prompts = sequences[:, :prompt_len].view(N // group, group, prompt_len)
    if not bool((prompts == prompts[:, :1]).all()):
        raise ValueError(f"rows of a group of {group} must share their first {prompt_len} tokens")
    prompt_mask = attention_mask[::group, :prompt_len]
    start = int(prompt_mask.any(0).int().argmax())                              # left padding every prompt has
    filled = attention_mask[:, prompt_len:].any(0).nonzero()
    end = prompt_len + (int(filled.max()) + 1 if filled.numel() else 1)       # right padding every response has
    args = (model, sequences[::group, start:prompt_len], prompt_mask[:, start:], sequences[:, prompt_len:end],
            attention_mask[:, prompt_len:end], temperature, with_entropy)
    layout = None
    if takes_tree_mask(model) if packed is None else packed:
        layout = pack_groups(*args[1:5])
        window = attention_window(_lm_module(model).config)
        if packed is None and window is not None and layout.input_ids.shape[1] > window:
            layout = None   # a window would cut into packed rows this long (and the mask does not carry it)
    if layout is not None:
        logps, ent = packed_prompt_logprobs(*args, layout=layout)
    else:
        logps, ent = shared_prompt_logprobs(*args)
    pad = (prompt_len - 1, T - end)                                             # back to (N, T-1)
    return torch.nn.functional.pad(logps, pad), None if ent is None else torch.nn.functional.pad(ent, pad)


def pair_logprobs(model, batch: dict, reduce: str, chosen_token_mean: bool = False):
    """(chosen, rejected) sequence log-probs (``reduce``: the sum or the mean per token of each
    response), each (B,), of a dataset.batches.collate_pairs batch: each pair runs as its prompt,
    then its two responses, the prompt once (grouped_token_logprobs). With ``chosen_token_mean``,
    a third (B,): the chosen responses' mean log-prob per token."""
    per_token, _ = grouped_token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"], 2)
    mask = batch["response_mask"][:, 1:]
    logps = masked_reduce(per_token, mask, reduce)
    if not chosen_token_mean:
        return pair_rows(logps)
    means = logps if reduce == "mean" else masked_reduce(per_token, mask, "mean")
    return (*pair_rows(logps), pair_rows(means)[0])


@torch.no_grad()
def chunked_grouped_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                             group: int = 1, temperature: float = 1.0, rows: int = 64) -> torch.Tensor:
    """grouped_token_logprobs's (N, T-1) log-probs, under no_grad, about ``rows`` rows (whole
    groups) per forward, so scoring a large batch holds one chunk's activations at a time."""
    rows = max(group, rows - rows % group)
    return torch.cat([grouped_token_logprobs(model, sequences[i:i + rows], attention_mask[i:i + rows], prompt_len,
                                             group, temperature)[0] for i in range(0, sequences.shape[0], rows)])


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, T) entropy of the next-token distributions of logits (B, T, V), in nats."""
    logits = logits.float()
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def policy_forward(model, sequences: torch.Tensor, attention_mask: torch.Tensor, temperature: float,
                   first_needed: int, with_entropy: bool = False):
    """(logps (N, L), entropy (N, L) or None) of the sampled tokens under ``model``: the training
    forward that matches the rollout engine's log-probs."""
    if not with_entropy:
        return model_token_logprobs(model, sequences, attention_mask, temperature, first_needed), None
    return model_token_logprobs(model, sequences, attention_mask, temperature, first_needed, with_entropy=True)


# ----------------------------------------------------------------------------- the output head, in chunks
def forward_head_logprobs(model, inputs: dict, targets: torch.Tensor, select, temperature: float = 1.0,
                          with_entropy: bool = False):
    """(logps, entropy or None), each shaped as ``targets``: ``model(**inputs)`` run with its
    output head replaced by ``head_logprobs`` (chunks, never the whole positions x vocabulary
    block), scoring ``targets`` from the head's input hidden states, after ``select`` (a
    position indexing, (..., H) -> targets.shape + (H,); None: all of them).

    The model's own head still runs on one position, and the first time a model comes through
    here its logits there are compared with ``head_logits`` (which must reproduce what the model
    does after its head, e.g. Gemma's soft-capping); where they differ, or where
    HEAD_CHUNK_LOGITS is 0, or where the head is not a module call, the model's own logits are
    used as they are.
    """
    select = select or (lambda x: x)
    lm = _lm_module(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if HEAD_CHUNK_LOGITS <= 0 or head is None or getattr(lm, "_chunked_head_ok", True) is False:
        return _logits_logprobs(select(model(**inputs).logits), targets, temperature, with_entropy)
    seen = {}

    def capture(module, args):  # keep the head's input; let the head itself run on one position only
        seen["hidden"] = hidden = select(args[0])
        return (hidden.reshape(-1, hidden.shape[-1])[:1].unsqueeze(0), *args[1:])
    handle = head.register_forward_pre_hook(capture)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    if "hidden" not in seen or logits.shape[:2] != (1, 1):
        return _logits_logprobs(select(logits), targets, temperature, with_entropy)
    hidden = seen["hidden"]
    if not hasattr(lm, "_chunked_head_ok"):
        with torch.no_grad():
            ours = head_logits(lm, hidden.reshape(-1, hidden.shape[-1])[:1]).float()
        lm._chunked_head_ok = bool(torch.allclose(ours, logits[0].float(), rtol=1e-3, atol=1e-3))
        if not lm._chunked_head_ok:
            print(f"note: {type(lm).__name__}'s logits are not its output head's alone; scoring with the whole "
                  f"(positions x vocabulary) block from now on", flush=True)
            return forward_head_logprobs(model, inputs, targets, select, temperature, with_entropy)
    flat_logps, flat_ent = head_logprobs(lm, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1),
                                         temperature, with_entropy)
    return flat_logps.view(targets.shape), None if flat_ent is None else flat_ent.view(targets.shape)


def _logits_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    logps = target_logprobs(logits, targets, temperature)
    if not with_entropy:
        return logps, None
    with torch.no_grad():
        return logps, token_entropy(logits / temperature)


def head_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """The logits ``lm`` computes from its head's input ``hidden`` (K, H): the head, then what
    transformers' causal LMs apply after it (final soft-capping: Gemma 2/3; a logit scale:
    Cohere; a logit divisor: Granite)."""
    logits = lm.get_output_embeddings()(hidden)
    config = lm.config
    if getattr(config, "logit_scale", None) not in (None, 1.0):
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) not in (None, 1.0):
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def head_logprobs(lm, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  with_entropy: bool = False, chunk_logits: int | None = None):
    """(logps (K,), entropy (K,) or None): log softmax(head_logits(hidden) / temperature) at
    ``targets`` (K,), from hidden (K, H), about ``chunk_logits`` logits (default
    HEAD_CHUNK_LOGITS) at a time, so the (K, V) block is never held whole, forward or backward.

    With a frozen head (LoRA) each chunk's gradient with respect to its hidden states is taken
    in the forward itself (d logp_k / d h_k, one (H,) row per position, since position k's
    log-prob depends on h_k alone) and the backward only scales it: the head costs one matrix
    product forward and one backward, as without chunks. With a trained head (--use_lora 0)
    each chunk is recomputed in the backward (activation checkpointing). Values and gradients
    equal the unchunked computation up to rounding.
    """
    V = lm.get_output_embeddings().weight.shape[0]
    chunk = max(1, (chunk_logits or HEAD_CHUNK_LOGITS) // V)
    if not (torch.is_grad_enabled() and hidden.requires_grad):
        with torch.no_grad():
            return _head_chunks(lm, hidden, targets, temperature, with_entropy, chunk)
    if any(p.requires_grad for p in lm.get_output_embeddings().parameters()):
        parts = [checkpoint(_head_chunks, lm, hidden[i:i + chunk], targets[i:i + chunk], temperature, with_entropy,
                            chunk, use_reentrant=False) for i in range(0, hidden.shape[0], chunk)]
        logps = torch.cat([p[0] for p in parts])
        return logps, torch.cat([p[1] for p in parts]) if with_entropy else None
    return _FrozenHeadLogprobs.apply(hidden, targets, lm, temperature, with_entropy, chunk)


def _head_chunks(lm, hidden, targets, temperature, with_entropy, chunk, grads: list | None = None):
    """(logps, entropy or None) chunk by chunk; with ``grads`` (a list), also d logp_k / d h_k of
    every chunk appended to it."""
    logps, ents = [], []
    for i in range(0, hidden.shape[0], chunk):
        h = hidden[i:i + chunk]
        if grads is not None:
            h = h.detach().requires_grad_(True)
        with torch.enable_grad() if grads is not None else contextlib.nullcontext():
            logits = head_logits(lm, h).float() / temperature                    # (k, V): one chunk
            lp = logits.gather(-1, targets[i:i + chunk, None]).squeeze(-1) - torch.logsumexp(logits, -1)
            if grads is not None:
                grads.append(torch.autograd.grad(lp.sum(), h)[0])
                lp = lp.detach()
        logps.append(lp)
        if with_entropy:
            with torch.no_grad():
                ents.append(token_entropy(logits.detach()))
        del logits
    return torch.cat(logps), torch.cat(ents) if with_entropy else None


class _FrozenHeadLogprobs(torch.autograd.Function):
    """head_logprobs with a frozen head: the per-position gradients come from the forward."""

    @staticmethod
    def forward(ctx, hidden, targets, lm, temperature, with_entropy, chunk):
        grads = []
        logps, ent = _head_chunks(lm, hidden, targets, temperature, with_entropy, chunk, grads)
        ctx.save_for_backward(torch.cat(grads))
        ctx.mark_non_differentiable(*([ent] if ent is not None else []))
        return logps, ent

    @staticmethod
    def backward(ctx, grad_logps, grad_ent):
        (dlogp_dh,) = ctx.saved_tensors                                          # (K, H)
        return grad_logps[:, None].to(dlogp_dh.dtype) * dlogp_dh, None, None, None, None, None


def _lm_module(model):
    """The transformers model under DDP / torch.compile wrappers (its forward returns .logits)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
