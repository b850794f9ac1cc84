"""Each prompt run once for its group, packed with a tree-shaped mask (model.packing,
model.logprobs.packed_prompt_logprobs) or run first for its responses to attend to
(shared_prompt_logprobs), against the straightforward forward over every concatenated row: the
same log-probs, entropies, losses and gradients, for rollouts (G samples of a prompt) and DPO
pairs (chosen and rejected), with sdpa and eager attention."""
import copy

import pytest
import torch

from dataset.batches import collate_pairs, pad_with_mask
from model.lora import apply_lora
from model.logprobs import (grouped_token_logprobs, model_sequence_logprobs, model_token_logprobs,
                            packed_prompt_logprobs, pair_logprobs, policy_forward, shared_prompt_logprobs,
                            takes_tree_mask)
from losses.preference import dpo_loss
from model.packing import first_fit, pack_groups
from losses.policy import policy_loss
from rl.step import shuffled_rows

WAYS = ["packed", "cached", "packed-eager"]      # how the grouped forward runs


def set_way(model, way: str, monkeypatch) -> bool:
    """Sets the model's attention for ``way`` (and what the default picks); returns
    grouped_token_logprobs's ``packed``."""
    model.set_attn_implementation("eager" if way.endswith("eager") else "sdpa")
    packed = way.startswith("packed")
    monkeypatch.setattr("model.logprobs.takes_tree_mask", lambda model: packed)
    return packed


@pytest.fixture
def adapted(tiny_model):
    """The tiny model with LoRA adapters moved away from zero, so they matter."""
    model = apply_lora(copy.deepcopy(tiny_model[0]), rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train(), tiny_model[1]


def rollout_rows(G: int, pad: int):
    """A rollout's layout: 3 prompts of different lengths, left-padded; G responses each of
    different lengths, right-padded; rows grouped by prompt."""
    prompts = [[1, 50, 60, 61, 62], [1, 51], [1, 52, 63]]
    responses = [[70 + i, 80 + j, 90, 2][: 1 + (i + j) % 4] for i in range(len(prompts)) for j in range(G)]
    p, pm = (t.repeat_interleave(G, 0) for t in pad_with_mask(prompts, pad, side="left"))
    r, rm = pad_with_mask(responses, pad)
    seqs, am = torch.cat([p, r], 1), torch.cat([pm, rm], 1)
    return seqs, am, torch.cat([torch.zeros_like(pm), rm], 1), p.shape[1]


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_group_logprobs_entropy_and_gradients_equal_the_full_forward(adapted, G, temperature, way, monkeypatch):
    model, tok = adapted
    packed = set_way(model, way, monkeypatch)
    seqs, am, resp, first = rollout_rows(G, tok.pad_token_id)
    mask = resp[:, 1:].bool()
    shared, ent = grouped_token_logprobs(model, seqs, am, first, G, temperature, with_entropy=True, packed=packed)
    plain, plain_ent = policy_forward(model, seqs, am, temperature, first, with_entropy=True)
    assert shared.shape == plain.shape == (seqs.shape[0], seqs.shape[1] - 1)
    torch.testing.assert_close(shared[mask], plain[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[mask], plain_ent[mask], atol=1e-5, rtol=0)
    assert (shared[~mask] == 0).all()
    g_shared = grads(model, (shared * mask).sum())
    g_plain = grads(model, (plain * mask).sum())
    assert g_shared.keys() == g_plain.keys() and len(g_shared) > 0
    for name in g_plain:
        torch.testing.assert_close(g_shared[name], g_plain[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("way", WAYS[:2])
def test_group_loss_equals_the_straightforward_loss(adapted, way, monkeypatch):
    """The GPO/GRPO loss from the shared-prompt forward, with old log-probs taken from the forward
    itself (one on-policy update), equals the loss from a separate sampling-time forward and
    the plain training forward, value and gradient."""
    model, tok = adapted
    packed = set_way(model, way, monkeypatch)
    G = 3
    seqs, am, resp, first = rollout_rows(G, tok.pad_token_id)
    mask = resp[:, 1:]
    adv = torch.linspace(-1, 1, seqs.shape[0])
    with torch.no_grad():
        ref = model_token_logprobs(model, seqs, am, 1.0, first) * mask + 0.1 * mask
        model.eval()
        sampled = model_token_logprobs(model, seqs, am, 1.0, first) * mask
        model.train()
    shared, _ = grouped_token_logprobs(model, seqs, am, first, G, packed=packed)
    fast, m_fast = policy_loss(shared, shared.detach(), adv, mask, 0.2, None, ref, 0.04, "dapo", G)
    plain = model_token_logprobs(model, seqs, am, 1.0, first)
    slow, m_slow = policy_loss(plain, sampled, adv, mask, 0.2, None, ref, 0.04, "dapo", G)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    torch.testing.assert_close(m_fast["kl"], m_slow["kl"], atol=1e-6, rtol=0)
    g_fast, g_slow = grads(model, fast), grads(model, slow)
    for name in g_slow:
        torch.testing.assert_close(g_fast[name], g_slow[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_dpo_pairs_equal_the_concatenated_forward(adapted, reduce, way, monkeypatch):
    """train_dpo's pair log-probs (the default way for the model's attention) against the plain
    rows: values, loss and gradients."""
    model, tok = adapted
    set_way(model, way, monkeypatch)
    items = [([1, 50, 60, 61, 62], [70, 2], [80, 81, 82, 2]), ([1, 50], [70, 71, 72, 73, 2], [80, 2]),
             ([1, 55, 56], [74], [75, 76])]
    grouped = collate_pairs(items, tok.pad_token_id)
    chosen, rejected = pair_logprobs(model, grouped, reduce)
    # the plain rows: each whole sequence, chosen rows then rejected, right-padded, one forward
    seqs = [p + c for p, c, _ in items] + [p + r for p, _, r in items]
    ids, am = pad_with_mask(seqs, tok.pad_token_id)
    responses = pad_with_mask([[0] * len(p) + [1] * len(c) for p, c, _ in items] +
                              [[0] * len(p) + [1] * len(r) for p, _, r in items], 0)[0]
    plain = model_sequence_logprobs(model, ids, am, responses, reduce)
    torch.testing.assert_close(torch.cat([chosen, rejected]), plain, atol=1e-5, rtol=0)
    ref_c, ref_r = plain[:3].detach() - 0.2, plain[3:].detach() + 0.1
    fast, _ = dpo_loss(chosen, rejected, ref_c, ref_r, 0.5)
    slow, _ = dpo_loss(plain[:3], plain[3:], ref_c, ref_r, 0.5)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    g_fast, g_slow = grads(model, fast), grads(model, slow)
    for name in g_slow:
        torch.testing.assert_close(g_fast[name], g_slow[name], atol=1e-6, rtol=1e-4)


def test_pack_groups_layout_by_hand():
    """Two prompts (left-padded), two responses each (right-padded, one empty); rows of 8 tokens,
    so group 0 (3 + 2 + 1 = 6 tokens) and group 1 (1 + 0 + 3 = 4) take a row each."""
    prompts, pm = torch.tensor([[0, 11, 12, 13], [0, 0, 0, 21]]), torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])
    responses = torch.tensor([[31, 32, 0], [33, 0, 0], [0, 0, 0], [41, 42, 43]])
    rm = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]])
    p = pack_groups(prompts, pm, responses, rm, row_tokens=8)
    assert p.input_ids.tolist() == [[11, 12, 13, 31, 32, 33], [21, 41, 42, 43, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 0, 0]]
    # targets 31, 32 (response 0), 33 (response 1, predicted by the prompt's last token), 41, 42, 43
    assert p.targets.tolist() == [31, 32, 33, 41, 42, 43]
    assert p.predictors.tolist() == [2, 3, 2, 6, 7, 8]
    assert p.rows.tolist() == [0, 0, 1, 3, 3, 3] and p.cols.tolist() == [0, 1, 0, 0, 1, 2]
    see = p.attention_mask[:, 0].int().tolist()
    assert see[0] == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                      [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1]]    # 33 sees the prompt, not 31 32
    assert see[1] == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                      [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]    # padding sees itself only
    together = pack_groups(prompts, pm, responses, rm, row_tokens=16)              # both groups in one row
    assert together.input_ids.tolist() == [[11, 12, 13, 31, 32, 33, 21, 41, 42, 43]]
    assert not together.attention_mask[0, 0, 6:, :6].any()                       # groups do not see each other
    with pytest.raises(ValueError, match="at least one token"):
        pack_groups(prompts, torch.zeros_like(pm), responses, rm)


def test_first_fit():
    assert first_fit([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert first_fit([9, 1], 4) == [[0], [1]]                                     # too long: a bin of its own
    bins = first_fit([3] * 7, 10)
    assert sorted(i for b in bins for i in b) == list(range(7)) and [len(b) for b in bins] == [3, 3, 1]


def test_collate_pairs_layout():
    out = collate_pairs([([1, 5], [7, 2], [8, 9, 2]), ([1, 5, 6], [3], [4, 2])], pad_id=0)
    assert out["prompt_len"] == 3
    assert out["input_ids"].tolist() == [[0, 1, 5, 7, 2, 0], [0, 1, 5, 8, 9, 2], [1, 5, 6, 3, 0, 0], [1, 5, 6, 4, 2, 0]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert out["response_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0]]


def test_one_token_responses_and_bad_groups(adapted):
    model, tok = adapted
    prompts, pm = torch.tensor([[1, 50, 60]]), torch.ones(1, 3, dtype=torch.long)
    r, rm = torch.tensor([[70], [71]]), torch.ones(2, 1, dtype=torch.long)
    logps, _ = shared_prompt_logprobs(model, prompts, pm, r, rm)
    assert takes_tree_mask(model)                            # sdpa: the packed forward is the default
    packed, _ = packed_prompt_logprobs(model, prompts, pm, r, rm)
    torch.testing.assert_close(packed, logps, atol=1e-5, rtol=0)
    plain = model_token_logprobs(model, torch.cat([prompts.repeat(2, 1), r], 1), torch.ones(2, 4, dtype=torch.long))
    torch.testing.assert_close(logps[:, 0], plain[:, -1], atol=1e-5, rtol=0)
    for forward in (shared_prompt_logprobs, packed_prompt_logprobs):
        with pytest.raises(ValueError, match="whole number"):
            forward(model, prompts.repeat(2, 1), pm.repeat(2, 1), r[:1].repeat(3, 1), rm[:1].repeat(3, 1))
    seqs, am, _, first = rollout_rows(2, tok.pad_token_id)
    with pytest.raises(ValueError, match="share"):            # rows 1 and 2 answer different prompts
        grouped_token_logprobs(model, seqs[1:5], am[1:5], first, 2)


def test_shuffled_rows_keep_groups_together():
    torch.manual_seed(0)
    order = shuffled_rows(12, 3)
    assert sorted(order.tolist()) == list(range(12))
    assert (order[::3] % 3 == 0).all() and (order.view(4, 3) - order[::3, None] == torch.arange(3)).all()
    assert sorted(shuffled_rows(5).tolist()) == list(range(5))
