"""Groups of sequences that share a prompt (a pair's chosen and rejected, a prompt's G samples),
packed into a few rows for one forward: each group is laid out as its prompt followed by each
response in turn, several groups to a row, and a tree-shaped attention mask lets a response
token see its own prompt and the earlier tokens of its own response, nothing else.

Beside the plain layout (every response repeats its prompt, all rows padded to the longest)
this runs each prompt once and leaves almost no padding; beside running the prompt first and
the responses against its cached keys and values, it is one forward instead of two. Shapes:
P prompts, G responses each, N = P*G, R packed rows of L tokens, K response tokens in all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_TOKENS = 128      # a packed row holds groups up to this many tokens (or the longest group, if longer)


@dataclass
class PackedGroups:
    input_ids: torch.Tensor       # (R, L) the packed tokens, 0 in the padding
    position_ids: torch.Tensor    # (R, L) each token's position in its own prompt + response
    attention_mask: torch.Tensor  # (R, 1, L, L) bool, True where a query (dim 2) may see a key (dim 3)
    predictors: torch.Tensor      # (K,) index into the flattened (R*L) rows of the token that predicts each target
    targets: torch.Tensor         # (K,) the response tokens
    rows: torch.Tensor            # (K,) each target's row in the (N, Lr) responses ...
    cols: torch.Tensor            # (K,) ... and its column there


def group_size(prompts: int, responses: int) -> int:
    """G for ``responses`` rows continuing ``prompts`` prompts, G each."""
    if prompts == 0 or responses % prompts:
        raise ValueError(f"{responses} responses are not a whole number of continuations of {prompts} prompts")
    return responses // prompts


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` put into bins of ``capacity`` (first fit, longest first); an item
    longer than the capacity gets a bin of its own."""
    bins, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if free >= lengths[i]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_groups(prompts: torch.Tensor, prompt_mask: torch.Tensor, responses: torch.Tensor,
                response_mask: torch.Tensor, row_tokens: int = ROW_TOKENS) -> PackedGroups:
    """The packed layout of prompts (P, Tp) with prompt_mask, and responses (N, Lr) with
    response_mask, rows g*G..g*G+G-1 continuing prompt g. A prompt's tokens are the ones its
    mask marks, in order (left padding or none), and so are a response's; position ids count
    them from 0 over prompt then response, as ``position_ids_from_mask`` counts the plain rows.
    Needs every prompt to have at least one token; responses may be empty."""
    P, G = prompts.shape[0], group_size(prompts.shape[0], responses.shape[0])
    device = prompts.device
    pm, rm = prompt_mask.bool().cpu(), response_mask.bool().cpu()
    plen, rlen = pm.sum(1), rm.sum(1).view(P, G)
    if bool((plen == 0).any()):
        raise ValueError("every prompt needs at least one token")
    glen = plen + rlen.sum(1)                                                     # (P,) tokens per group
    bins = first_fit(glen.tolist(), max(row_tokens, int(glen.max())))
    R, L = len(bins), max(int(glen[b].sum()) for b in bins)
    start = torch.empty(P, dtype=torch.long)                                      # group g starts at flat start[g]
    for r, members in enumerate(bins):
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), glen[members].cumsum(0)[:-1]])
        start[members] = r * L + offsets

    pg, pc = pm.nonzero(as_tuple=True)                                           # prompt tokens: group, column
    p_rank = pm.long().cumsum(1)[pg, pc] - 1
    rr, rc = rm.nonzero(as_tuple=True)                                           # response tokens: row, column
    r_rank = rm.long().cumsum(1)[rr, rc] - 1
    rg, rk = rr // G, rr % G
    before = torch.cat([torch.zeros(P, 1, dtype=torch.long), rlen.cumsum(1)[:, :-1]], 1)    # earlier siblings' tokens
    p_at = start[pg] + p_rank
    r_at = start[rg] + plen[rg] + before[rg, rk] + r_rank

    position = torch.zeros(R * L, dtype=torch.long)
    position[p_at], position[r_at] = p_rank, plen[rg] + r_rank
    group = -1 - torch.arange(R * L)                          # padding: a group of its own, seeing only itself
    group[p_at], group[r_at] = pg, rg
    branch = torch.zeros(R * L, dtype=torch.long)             # 0 the prompt, k+1 the k-th response
    branch[r_at] = rk + 1
    predictors = torch.where(r_rank == 0, start[rg] + plen[rg] - 1, r_at - 1)    # the previous token of the branch

    group, branch = group.view(R, L).to(device), branch.view(R, L).to(device)
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    sees = causal & (group[:, :, None] == group[:, None, :]) & \
        ((branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :]))
    rr, rc, p_at, r_at = rr.to(device), rc.to(device), p_at.to(device), r_at.to(device)
    ids = torch.zeros(R * L, dtype=prompts.dtype, device=device)
    ids[p_at] = prompts[pg.to(device), pc.to(device)]
    targets = responses[rr, rc]
    ids[r_at] = targets
    return PackedGroups(ids.view(R, L), position.view(R, L).to(device), sees[:, None], predictors.to(device), targets,
                        rr, rc)
