"""PPO's pure functions (losses/ppo.py) against hand computations, plus invariants."""
import math

import pytest
import torch

from losses.ppo import (approx_kl, clipped_value_loss, explained_variance, gae, kl_per_token, masked_whiten,
                        token_rewards)
from losses.policy import policy_loss

# One sample, L = 5 predicted tokens: a prompt position, three response tokens, a pad.
MASK = torch.tensor([[0, 1, 1, 1, 0]])
REWARDS = torch.tensor([[0.0, 0.1, -0.2, 1.0, 0.0]])
VALUES = torch.tensor([[9.0, 0.5, 0.4, 0.3, 7.0]])     # 9 and 7 sit off the response: they must not count


@pytest.mark.parametrize("gamma, lam, expected", [
    # delta_3 = 1 - 0.3 = 0.7; delta_2 = -0.2 + 0.3 - 0.4 = -0.3; delta_1 = 0.1 + 0.4 - 0.5 = 0
    (1.0, 0.95, [0.0, 0.95 * (-0.3 + 0.95 * 0.7), -0.3 + 0.95 * 0.7, 0.7, 0.0]),
    # delta_2 = -0.2 + 0.9*0.3 - 0.4 = -0.33, A_2 = -0.33 + 0.45*0.7; delta_1 = 0.1 + 0.9*0.4 - 0.5 = -0.04
    (0.9, 0.5, [0.0, -0.04 + 0.45 * (-0.33 + 0.45 * 0.7), -0.33 + 0.45 * 0.7, 0.7, 0.0]),
    (1.0, 0.0, [0.0, 0.0, -0.3, 0.7, 0.0]),                       # lambda 0: the one-step TD errors
    (1.0, 1.0, [0.0, 0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.3, 0.0]),      # lambda 1: reward-to-go minus V
    (0.0, 0.95, [0.0, 0.1 - 0.5, -0.2 - 0.4, 1.0 - 0.3, 0.0]),    # gamma 0: r_t - V_t
])
def test_gae_by_hand(gamma, lam, expected):
    adv, ret = gae(REWARDS, VALUES, MASK, gamma, lam)
    assert adv[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert ret[0].tolist() == pytest.approx([a + v * m for a, v, m in zip(expected, VALUES[0].tolist(), MASK[0].tolist())],
                                            abs=1e-6)


def brute_force_gae(r, v, mask, gamma, lam):
    """A_t = sum_k (gamma lam)^k delta_{t+k} over the response, written out directly."""
    idx = [t for t in range(len(mask)) if mask[t]]
    adv = [0.0] * len(mask)
    for i, t in enumerate(idx):
        total = 0.0
        for k, s in enumerate(idx[i:]):
            v_next = v[idx[i + k + 1]] if i + k + 1 < len(idx) else 0.0
            total += (gamma * lam) ** k * (r[s] + gamma * v_next - v[s])
        adv[t] = total
    return adv


def test_gae_matches_the_sum_formula_with_padding_on_both_sides():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0], [0] * 8, [1] * 8])
    r, v = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    adv, _ = gae(r, v, mask, 0.97, 0.9)
    for row in range(4):
        expected = brute_force_gae(r[row].tolist(), v[row].tolist(), mask[row].tolist(), 0.97, 0.9)
        assert adv[row].tolist() == pytest.approx(expected, abs=1e-5)
    assert adv[2].abs().sum() == 0                                   # no response, no advantage


def test_rewards_and_kl_land_on_the_right_tokens():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]])
    kl = torch.full((3, 4), 2.0)                                     # non-zero everywhere, also on prompt and padding
    out = token_rewards(torch.tensor([5.0, -1.0, 9.0]), kl, mask, kl_coef=0.1)
    assert out.flatten().tolist() == pytest.approx([0, -0.2, -0.2 + 5, 0, 0, 0, -0.2, -0.2 - 1, 0, 0, 0, 0])


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    assert kl_per_token(logp, ref, "k1").tolist() == pytest.approx([0.5, 0.0])
    assert kl_per_token(logp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, 0.0])
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k2")


def test_whitening_uses_the_response_tokens_only():
    x = torch.tensor([[5.0, 1.0, 2.0, 3.0, 100.0]])
    out = masked_whiten(x, MASK)
    assert out[0].tolist() == pytest.approx([0, -1, 0, 1, 0], abs=1e-6)      # mean 2, unbiased std 1
    moved = x.clone()
    moved[0, 0], moved[0, 4] = -50.0, 1e6                            # off-mask entries change nothing
    assert torch.equal(masked_whiten(moved, MASK), out)
    assert masked_whiten(x, MASK, shift_mean=False)[0].tolist() == pytest.approx([0, 1, 2, 3, 0], abs=1e-6)
    g = torch.Generator().manual_seed(1)
    big, mask = torch.randn(6, 10, generator=g) * 7 + 3, (torch.rand(6, 10, generator=g) > 0.4).long()
    w = masked_whiten(big, mask)[mask.bool()]
    assert float(w.mean()) == pytest.approx(0, abs=1e-5) and float(w.std()) == pytest.approx(1, abs=1e-4)


def test_whitening_with_an_all_sum_sees_the_whole_batch():
    """Each half of a batch, whitened with sums over both halves (as all_reduce gives every
    rank), equals its rows of the whole batch whitened at once."""
    g = torch.Generator().manual_seed(2)
    x, mask = torch.randn(4, 6, generator=g), (torch.rand(4, 6, generator=g) > 0.3).long()
    whole = masked_whiten(x, mask)
    mean = (x * mask).sum() / mask.sum()
    for mine, other in ((slice(0, 2), slice(2, 4)), (slice(2, 4), slice(0, 2))):
        y, m = x[other], mask[other]

        def all_sum(t, y=y, m=m):   # this rank's sums plus the other rank's
            if t.dim() == 1:
                return t + torch.stack([m.sum(), (y * m).sum()]).to(t.dtype)
            return t + ((y - mean) ** 2 * m).sum()
        assert torch.allclose(masked_whiten(x[mine], mask[mine], all_sum=all_sum), whole[mine], atol=1e-6)


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.5]], requires_grad=True)
    old, returns, mask = torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([[1.0, 1.0, 0.0]]), torch.ones(1, 3)
    # clipped values 0.7, 0.3, 0.5; squared errors unclipped 0, 1, 0.25 and clipped 0.09, 0.49, 0.25
    loss, metrics = clipped_value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.09 + 1 + 0.25) / 3)
    assert float(metrics["value_clip_ratio"]) == pytest.approx(1 / 3)
    loss.backward()
    # token 0: the clipped term wins and is flat in V (no gradient); tokens 1, 2: (V - R) / 3
    assert values.grad[0].tolist() == pytest.approx([0.0, -1 / 3, 0.5 / 3])
    plain, none = clipped_value_loss(values.detach(), old, returns, mask, clip=0)
    assert float(plain) == pytest.approx(0.5 * (0 + 1 + 0.25) / 3) and float(none["value_clip_ratio"]) == 0


def test_value_loss_ignores_tokens_off_the_mask():
    values, old, returns = torch.tensor([[0.3, 50.0]]), torch.tensor([[0.3, -9.0]]), torch.tensor([[0.5, 3.0]])
    loss, _ = clipped_value_loss(values, old, returns, torch.tensor([[1, 0]]), clip=0.2)
    assert float(loss) == pytest.approx(0.5 * 0.2 ** 2)


def test_per_token_advantages_in_the_clipped_loss():
    logps = torch.log(torch.tensor([[0.5, 0.6, 0.9]]))
    old = torch.log(torch.tensor([[0.5, 0.4, 0.5]]))                 # ratios 1, 1.5, 1.8
    adv = torch.tensor([[9.0, 2.0, -1.0]])
    mask = torch.tensor([[0, 1, 1]])
    loss, m = policy_loss(logps, old, adv, mask, epsilon=0.2)
    # token 1: -min(1.5*2, 1.2*2) = -2.4 (clipped); token 2: -min(-1.8, -1.2) = 1.8 (unclipped)
    assert float(loss) == pytest.approx((-2.4 + 1.8) / 2)
    assert float(m["clip_ratio"]) == pytest.approx(0.5)
    per_sample, _ = policy_loss(logps, old, torch.tensor([2.0]), mask, epsilon=0.2)
    shared, _ = policy_loss(logps, old, torch.tensor([[2.0, 2.0, 2.0]]), mask, epsilon=0.2)
    assert float(per_sample) == float(shared)                        # (N,) is (N, L) with one value per row


def test_approx_kl_and_explained_variance():
    mask = torch.tensor([[1, 1, 0]])
    same = torch.tensor([[-1.0, -2.0, -3.0]])
    assert float(approx_kl(same, same, mask)) == 0
    moved = same + torch.tensor([[math.log(2), 0.0, 5.0]])          # ratio 2 on token 0, the pad moved a lot
    assert float(approx_kl(moved, same, mask)) == pytest.approx((1 - math.log(2)) / 2)
    returns = torch.tensor([[1.0, 3.0, 0.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, mask) == pytest.approx(0.0)
    assert explained_variance(returns, torch.ones(1, 3), mask) == 0.0          # returns that do not vary
