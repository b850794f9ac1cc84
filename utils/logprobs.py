"""Log-probabilities of tokens and sequences: one place for shift, gather and mask.

Shapes: B batch, T tokens, V vocabulary.
"""
from __future__ import annotations

import torch

from utils.packing import group_size, pack_groups


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
                         first_needed: int = 1) -> torch.Tensor:
    """Forward ``model`` and return token_logprobs (B, T-1): entry t is log pi(input_ids[:, t+1]).

    The language-model head runs only from position ``first_needed - 1`` on
    (``logits_to_keep``); entries for tokens before ``first_needed`` are 0. The prompt
    positions before the first response token need no logits, and with a vocabulary-sized
    head they are most of the memory of the forward.
    """
    T = input_ids.shape[1]
    first_needed = max(1, min(first_needed, T - 1))
    keep = T - first_needed + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), logits_to_keep=keep).logits  # (B, keep, V)
    part = token_logprobs(logits, input_ids[:, T - keep:], temperature)                               # (B, keep-1)
    return torch.nn.functional.pad(part, (T - keep, 0))


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
    if Lr > 1:
        mask = torch.cat([prompt_mask.repeat_interleave(G, 0), response_mask], 1)[:, :-1]       # (N, Tp+Lr-1)
        rest = model(input_ids=responses[:, :-1], attention_mask=mask,
                     position_ids=position_ids_from_mask(mask)[:, Tp:], past_key_values=cache, use_cache=True)
        logits = torch.cat([logits, rest.logits], 1)                              # (N, Lr, V)
    keep = response_mask.to(torch.float32)
    logps = target_logprobs(logits, responses, temperature) * keep
    if not with_entropy:
        return logps, None
    with torch.no_grad():
        return logps, token_entropy(logits / temperature) * keep


def packed_prompt_logprobs(model, prompts: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
                           response_mask: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False):
    """shared_prompt_logprobs's (logps (N, Lr), entropy or None), in one forward: each group
    (a prompt and its G responses) packed into a row beside other groups, with a tree-shaped
    attention mask (utils.packing.pack_groups), and the output head run only on the positions
    that predict a response token. Needs an attention that takes a 4D mask (sdpa, eager)."""
    packed, lm = pack_groups(prompts, prompt_mask, responses, response_mask), _lm_module(model)
    mask = packed.attention_mask
    if lm.config._attn_implementation == "eager":                      # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    picked = packed.predictors

    def head_on_predictors(module, args):  # (R, L, H) -> (1, K, H): the head sees only the positions it is needed at
        return (args[0].flatten(0, 1)[picked].unsqueeze(0), *args[1:])
    handle = lm.get_output_embeddings().register_forward_pre_hook(head_on_predictors)
    try:
        logits = model(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                       logits_to_keep=0).logits
    finally:
        handle.remove()
    if logits.shape[:2] != (1, picked.numel()):          # a model whose head is not a module call: pick here
        logits = logits.flatten(0, 1)[picked].unsqueeze(0)
    logits = logits[0]                                                                 # (K, V)
    logps = responses.new_zeros(responses.shape, dtype=torch.float32)
    logps[packed.rows, packed.cols] = target_logprobs(logits, packed.targets, temperature)
    if not with_entropy:
        return logps, None
    with torch.no_grad():
        ent = torch.zeros_like(logps)
        ent[packed.rows, packed.cols] = token_entropy(logits / temperature)
    return logps, ent


def takes_tree_mask(model) -> bool:
    """Whether the model's attention takes a custom 4D mask (sdpa and eager do; flash-attention
    kernels take only padding masks)."""
    return _lm_module(model).config._attn_implementation in ("sdpa", "eager")


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
    keys and values (shared_prompt_logprobs). With group 1 it is the plain forward
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
    forward = packed_prompt_logprobs if (takes_tree_mask(model) if packed is None else packed) else shared_prompt_logprobs
    logps, ent = forward(model, sequences[::group, start:prompt_len], prompt_mask[:, start:],
                         sequences[:, prompt_len:end], attention_mask[:, prompt_len:end], temperature, with_entropy)
    pad = (prompt_len - 1, T - end)                                             # back to (N, T-1)
    return torch.nn.functional.pad(logps, pad), None if ent is None else torch.nn.functional.pad(ent, pad)


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
    captured = {}

    def keep_logits(module, inputs, output):  # the entropy needs the logits the log-probs come from
        captured["logits"] = output.logits
    handle = _lm_module(model).register_forward_hook(keep_logits)
    try:
        logps = model_token_logprobs(model, sequences, attention_mask, temperature, first_needed)
    finally:
        handle.remove()
    with torch.no_grad():
        ent = token_entropy(captured["logits"][:, :-1] / temperature)        # (N, keep-1)
        ent = torch.nn.functional.pad(ent, (logps.shape[1] - ent.shape[1], 0))
    return logps, ent


def _lm_module(model):
    """The transformers model under DDP / torch.compile wrappers (its forward returns .logits)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
