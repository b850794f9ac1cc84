"""Group advantages, the clipped policy loss, k3 KL, and the GRPO gradient against the chapter's formula.

Hand values for rewards r = [1, 0, 0, 1 | 2, 2, 2, 2], G = 4:
  mean baseline          group means 0.5 and 2            -> [.5, -.5, -.5, .5 | 0, 0, 0, 0]
  loo baseline           r_i - mean of the other three    -> [2/3, -2/3, -2/3, 2/3 | 0 ...]
  scale group            unbiased std of [1,0,0,1] = sqrt(1/3); of [2,2,2,2] = 0 -> 0, not NaN
  scale batch            unbiased std of all eight = sqrt(5.5/7)
  level group (seed A_g) means [0.5, 2], centred [-.75, .75], std sqrt(1.125) -> +-0.75/1.06066
"""
import math

import pytest
import torch

from model.logprobs import masked_reduce, model_token_logprobs
from losses.policy import group_advantages, k3_kl, policy_loss

R = torch.tensor([1.0, 0, 0, 1, 2, 2, 2, 2])
EPS = 1e-4


def close(a, b):
    torch.testing.assert_close(a, torch.tensor(b, dtype=torch.float32), atol=1e-5, rtol=0)


def test_group_advantages_hand_values():
    close(group_advantages(R, 4, "mean", "none"), [.5, -.5, -.5, .5, 0, 0, 0, 0])
    close(group_advantages(R, 4, "loo", "none"), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    s = math.sqrt(1 / 3) + EPS
    close(group_advantages(R, 4, "mean", "group"), [.5 / s, -.5 / s, -.5 / s, .5 / s, 0, 0, 0, 0])
    b = math.sqrt(5.5 / 7) + EPS
    close(group_advantages(R, 4, "mean", "batch"), [.5 / b, -.5 / b, -.5 / b, .5 / b, 0, 0, 0, 0])
    g = 0.75 / (math.sqrt(1.125) + EPS)
    close(group_advantages(R, 4, level="group"), [-g] * 4 + [g] * 4)
    close(group_advantages(R, 4, level="group", scale="none"), [-.75] * 4 + [.75] * 4)


def test_group_advantage_invariants():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(6 * 5, generator=g)
    for baseline in ("mean", "loo"):
        for scale in ("group", "batch", "none"):
            a = group_advantages(r, 5, baseline, scale)
            assert a.view(6, 5).sum(1).abs().max() < 1e-5           # zero mean in every group
            assert torch.isfinite(a).all()
    ties = group_advantages(torch.ones(8), 4, "mean", "group")
    assert torch.equal(ties, torch.zeros(8))                        # std 0 gives 0, not NaN
    assert group_advantages(torch.tensor([3.0, 3.0]), 2, level="group").tolist() == [0.0, 0.0]  # one group
    shifted = group_advantages(r + 7, 5, "mean", "group")
    torch.testing.assert_close(shifted, group_advantages(r, 5, "mean", "group"), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="multiple of G"):
        group_advantages(torch.ones(7), 4)


def test_k3_is_zero_at_the_reference_and_positive_elsewhere():
    g = torch.Generator().manual_seed(1)
    logps = -torch.rand(4, 6, generator=g) * 3
    assert torch.equal(k3_kl(logps, logps), torch.zeros(4, 6))
    other = logps + torch.randn(4, 6, generator=g) * 0.5
    assert (k3_kl(logps, other) > 0).all()
    # hand value: ref - logp = 1 -> e - 1 - 1
    assert k3_kl(torch.tensor([0.0]), torch.tensor([1.0])).item() == pytest.approx(math.e - 2)


@pytest.mark.parametrize("ratio, adv, eps_high, clipped", [
    (1.5, +1.0, None, True),    # above 1 + eps, pushed further up: the clip stops it
    (1.5, -1.0, None, False),   # above, pushed back down: gradient flows
    (0.5, +1.0, None, False),   # below 1 - eps, pushed back up: gradient flows
    (0.5, -1.0, None, True),    # below, pushed further down: the clip stops it
    (1.25, +1.0, 0.28, False),  # inside the wider upper range of clip-higher
    (1.25, +1.0, None, True),   # ... but outside the symmetric one
    (1.1, +1.0, None, False),   # inside: never clipped
])
def test_clipping_bites_only_outside_the_range_in_the_advantages_direction(ratio, adv, eps_high, clipped):
    logps = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, m = policy_loss(logps, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1), 0.2, eps_high)
    loss.backward()
    assert (logps.grad.abs().item() == 0) == clipped
    assert m["clip_ratio"].item() == (1.0 if clipped else 0.0)
    if not clipped:  # d/dlogp of -A ratio = -A ratio
        assert logps.grad.item() == pytest.approx(-adv * ratio)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_grpo_gradient_equals_the_chapters_formula(tiny_model, reduce):
    """At one update per rollout (ratio 1), the PPO-clip form's gradient is the chapter's
    grad of -E_x[sum_i A_i log pi(y_i|x)], with A_i = r_i - mean_j r_j and r_i = log pi(y_i|x) held fixed."""
    model, _ = tiny_model
    model.train()
    G, P = 3, 2
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 900, (P * G, 4), generator=g)
    resp = torch.randint(3, 900, (P * G, 5), generator=g)
    ids = torch.cat([prompt, resp], 1)
    am = torch.ones_like(ids)
    am[0, -2:] = 0                                   # a shorter response, right-padded
    response_mask = torch.cat([torch.zeros_like(prompt), am[:, 4:]], 1)
    params = [p for p in model.parameters()]

    logps = model_token_logprobs(model, ids, am, first_needed=4)                   # (N, L)
    with torch.no_grad():
        rewards = masked_reduce(logps, response_mask[:, 1:], reduce)
        advantages = group_advantages(rewards, G, "mean", "none")
    ours, _ = policy_loss(logps, logps.detach(), advantages, response_mask[:, 1:], loss_type="seed_sum", G=G,
                          seq_reduce=reduce)
    grads_ours = torch.autograd.grad(ours, params, allow_unused=True)

    logps2 = model_token_logprobs(model, ids, am, first_needed=4)
    chapter = -(advantages * masked_reduce(logps2, response_mask[:, 1:], reduce)).view(P, G).sum(1).mean()
    grads_chapter = torch.autograd.grad(chapter, params, allow_unused=True)
    checked = 0
    for a, b in zip(grads_ours, grads_chapter):
        if a is None and b is None:
            continue
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        checked += 1
    assert checked > 0 and any(a is not None and a.abs().max() > 0 for a in grads_ours)
    # (The values differ: the PPO form is -sum A_i ratio = 0 here; only the gradients agree.)
