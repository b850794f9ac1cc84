"""Each prompt run once for its group (utils.logprobs.shared_prompt_logprobs) against the
straightforward forward over every concatenated row: the same log-probs, entropies, losses and
gradients, for rollouts (G samples of a prompt) and DPO pairs (chosen and rejected)."""
import copy

import pytest
import torch

from dataset.data import collate_pair_groups, collate_pairs, pad_with_mask
from model.lora import apply_lora
from utils.logprobs import (grouped_token_logprobs, model_sequence_logprobs, model_token_logprobs, policy_forward,
                            shared_prompt_logprobs)
from utils.losses import dpo_loss
from utils.rl import clipped_policy_loss, shuffled_rows


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


@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_group_logprobs_entropy_and_gradients_equal_the_full_forward(adapted, G, temperature):
    model, tok = adapted
    seqs, am, resp, first = rollout_rows(G, tok.pad_token_id)
    mask = resp[:, 1:].bool()
    shared, ent = grouped_token_logprobs(model, seqs, am, first, G, temperature, with_entropy=True)
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


def test_group_loss_equals_the_straightforward_loss(adapted):
    """The GPO/GRPO loss from the shared-prompt forward, with old log-probs taken from the forward
    itself (one on-policy update), equals the loss from a separate sampling-time forward and
    the plain training forward, value and gradient."""
    model, tok = adapted
    G = 3
    seqs, am, resp, first = rollout_rows(G, tok.pad_token_id)
    mask = resp[:, 1:]
    adv = torch.linspace(-1, 1, seqs.shape[0])
    with torch.no_grad():
        ref = model_token_logprobs(model, seqs, am, 1.0, first) * mask + 0.1 * mask
        model.eval()
        sampled = model_token_logprobs(model, seqs, am, 1.0, first) * mask
        model.train()
    shared, _ = grouped_token_logprobs(model, seqs, am, first, G)
    fast, m_fast = clipped_policy_loss(shared, shared.detach(), adv, mask, 0.2, None, ref, 0.04, "token_mean", G)
    plain = model_token_logprobs(model, seqs, am, 1.0, first)
    slow, m_slow = clipped_policy_loss(plain, sampled, adv, mask, 0.2, None, ref, 0.04, "token_mean", G)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    torch.testing.assert_close(m_fast["kl"], m_slow["kl"], atol=1e-6, rtol=0)
    g_fast, g_slow = grads(model, fast), grads(model, slow)
    for name in g_slow:
        torch.testing.assert_close(g_fast[name], g_slow[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_dpo_pairs_equal_the_concatenated_forward(adapted, reduce):
    model, tok = adapted
    items = [([1, 50, 60, 61, 62], [70, 2], [80, 81, 82, 2]), ([1, 50], [70, 71, 72, 73, 2], [80, 2]),
             ([1, 55, 56], [74], [75, 76])]
    grouped = collate_pair_groups(items, tok.pad_token_id)
    import train_dpo
    chosen, rejected = train_dpo.pair_logprobs(model, grouped, reduce)
    rows = collate_pairs(items, tok.pad_token_id)           # chosen rows, then rejected, right-padded
    plain = model_sequence_logprobs(model, rows["input_ids"], rows["attention_mask"], rows["response_mask"], reduce)
    torch.testing.assert_close(torch.cat([chosen, rejected]), plain, atol=1e-5, rtol=0)
    ref_c, ref_r = plain[:3].detach() - 0.2, plain[3:].detach() + 0.1
    fast, _ = dpo_loss(chosen, rejected, ref_c, ref_r, 0.5)
    slow, _ = dpo_loss(plain[:3], plain[3:], ref_c, ref_r, 0.5)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    g_fast, g_slow = grads(model, fast), grads(model, slow)
    for name in g_slow:
        torch.testing.assert_close(g_fast[name], g_slow[name], atol=1e-6, rtol=1e-4)


def test_collate_pair_groups_layout():
    out = collate_pair_groups([([1, 5], [7, 2], [8, 9, 2]), ([1, 5, 6], [3], [4, 2])], pad_id=0)
    assert out["prompt_len"] == 3
    assert out["input_ids"].tolist() == [[0, 1, 5, 7, 2, 0], [0, 1, 5, 8, 9, 2], [1, 5, 6, 3, 0, 0], [1, 5, 6, 4, 2, 0]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert out["response_mask"].tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0]]


def test_one_token_responses_and_bad_groups(adapted):
    model, tok = adapted
    prompts, pm = torch.tensor([[1, 50, 60]]), torch.ones(1, 3, dtype=torch.long)
    r, rm = torch.tensor([[70], [71]]), torch.ones(2, 1, dtype=torch.long)
    logps, _ = shared_prompt_logprobs(model, prompts, pm, r, rm)
    plain = model_token_logprobs(model, torch.cat([prompts.repeat(2, 1), r], 1), torch.ones(2, 4, dtype=torch.long))
    torch.testing.assert_close(logps[:, 0], plain[:, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="whole number"):
        shared_prompt_logprobs(model, prompts.repeat(2, 1), pm.repeat(2, 1), r[:1].repeat(3, 1), rm[:1].repeat(3, 1))
    seqs, am, _, first = rollout_rows(2, tok.pad_token_id)
    with pytest.raises(ValueError, match="share"):            # rows 1 and 2 answer different prompts
        grouped_token_logprobs(model, seqs[1:5], am[1:5], first, 2)


def test_shuffled_rows_keep_groups_together():
    torch.manual_seed(0)
    order = shuffled_rows(12, 3)
    assert sorted(order.tolist()) == list(range(12))
    assert (order[::3] % 3 == 0).all() and (order.view(4, 3) - order[::3, None] == torch.arange(3)).all()
    assert sorted(shuffled_rows(5).tolist()) == list(range(5))
