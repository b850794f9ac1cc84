"""The --loss_type menu (losses.policy.policy_loss) by hand, and its exactness under accumulation and ranks.

Hand setup: two responses, mask [[1, 1, 1], [1, 0, 0]], advantages A = [1, -2], logps = old
(ratio 1), so each PPO-clip token loss is -A: three tokens of -1, one of +2.
  dapo / bnpo   (-3 + 2) / 4 tokens                       = -0.25
  grpo          (mean(-1,-1,-1) + mean(2)) / 2 responses   = 0.5
  dr_grpo       (-3 + 2) / (2 responses x max_gen_len 3)  = -1/6
  seed_sum      one group of G=2: (-3 + 2) / 1 = -1; with per-response means (-1 + 2) / 1 = 1
  cispo         -sg(min(1, 5)) A logp with logp = ln 0.5: tokens ln2, ln2, ln2, -2 ln2 -> ln2 / 4
"""
import math

import pytest
import torch

from losses.policy import (AGGREGATION_TYPES, LOSS_TYPES, group_loss_mask, loss_normaliser, overlong_penalty,
                           policy_loss, step_normalisers, zero_std_groups)

MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
ADV = torch.tensor([1.0, -2.0])


def hand_loss(loss_type, **kw):
    logps = torch.full((2, 3), math.log(0.5))
    loss, _ = policy_loss(logps, logps.clone(), ADV, MASK, loss_type=loss_type, G=2, max_gen_len=3, **kw)
    return float(loss)


@pytest.mark.parametrize("loss_type, expected", [
    ("dapo", -0.25), ("bnpo", -0.25), ("grpo", 0.5), ("dr_grpo", -1 / 6), ("seed_sum", -1.0),
    ("cispo", math.log(2) / 4)])
def test_each_loss_type_by_hand(loss_type, expected):
    assert hand_loss(loss_type) == pytest.approx(expected, abs=1e-6)


def test_seed_sum_with_per_response_means_and_the_normalisers_by_hand():
    assert hand_loss("seed_sum", seq_reduce="mean") == pytest.approx(1.0, abs=1e-6)
    counts = {t: float(loss_normaliser(MASK, t, G=2, max_gen_len=3)) for t in LOSS_TYPES}
    assert counts == {"dapo": 4, "cispo": 4, "bnpo": 4, "grpo": 2, "dr_grpo": 6, "seed_sum": 1}
    with pytest.raises(ValueError, match="max_gen_len"):
        loss_normaliser(MASK, "dr_grpo")


def test_cispo_caps_the_ratio_but_never_stops_the_gradient():
    """At ratio 8 > epsilon_high 5, PPO-clip gives no gradient for A > 0; CISPO's is -5 A (the
    capped, detached ratio times d logp / d logp), and -2 A at ratio 2 below the cap."""
    for ratio, grad in ((8.0, -5.0), (2.0, -2.0)):
        logps = torch.tensor([[math.log(0.5)]], requires_grad=True)
        old = logps.detach() - math.log(ratio)
        loss, m = policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 1), 0.2, 5.0, loss_type="cispo")
        loss.backward()
        assert logps.grad.item() == pytest.approx(grad)
        assert m["clip_ratio"].item() == (1.0 if ratio > 5 else 0.0)
        clip = torch.tensor([[math.log(0.5)]], requires_grad=True)
        policy_loss(clip, old, torch.tensor([1.0]), torch.ones(1, 1), 0.2, loss_type="dapo")[0].backward()
        assert (clip.grad.item() == 0) == (ratio > 1.2)


def test_sequence_level_ratio_is_gspos():
    """log ratios [0.3, 0.3, -0.3]: s = e^0.1, inside [0.8, 1.2]; loss -A s over 3 tokens / 3, each
    token's gradient -A s / 3. Log ratios [0.9, 0, 0]: s = e^0.3 = 1.35 > 1.2 with A > 0: the
    whole response is clipped, though two of its tokens have ratio 1 (token level: they learn)."""
    mask = torch.ones(1, 3)
    logps = torch.tensor([[0.3, 0.3, -0.3]], requires_grad=True)
    loss, m = policy_loss(logps, torch.zeros(1, 3), torch.tensor([1.0]), mask, importance_sampling_level="sequence")
    loss.backward()
    s = math.exp(0.1)
    assert float(loss.detach()) == pytest.approx(-s)
    torch.testing.assert_close(logps.grad, torch.full((1, 3), -s / 3))
    assert float(m["clip_ratio"]) == 0
    far = torch.tensor([[0.9, 0.0, 0.0]], requires_grad=True)
    loss, m = policy_loss(far, torch.zeros(1, 3), torch.tensor([1.0]), mask, importance_sampling_level="sequence")
    loss.backward()
    assert far.grad.abs().max() == 0 and float(m["clip_ratio"]) == 1
    tok = torch.tensor([[0.9, 0.0, 0.0]], requires_grad=True)
    policy_loss(tok, torch.zeros(1, 3), torch.tensor([1.0]), mask)[0].backward()
    torch.testing.assert_close(tok.grad, torch.tensor([[0.0, -1 / 3, -1 / 3]]))


def test_token_mean_is_exact_under_accumulation():
    """Lengths 1, 1, 10, 10, A = 1, ratio 1: without accumulation each token's gradient is -1/22;
    with accumulation 2 (micro-batches {1, 1} and {10, 10}) it must stay -1/22, not -1/4 (each
    micro-batch averaged on its own, then weighted by its sample count). bnpo is that local mean
    by definition: -1/(2 tokens x 2 micro-batches)."""
    lengths = [1, 1, 10, 10]
    mask = (torch.arange(10)[None] < torch.tensor(lengths)[:, None]).long()
    adv = torch.ones(4)

    def grads(loss_type, parts):
        logps = torch.zeros(4, 10, requires_grad=True)
        norms = step_normalisers([mask[p] for p in parts], loss_type, max_gen_len=10)
        for p, norm in zip(parts, norms):
            policy_loss(logps[p], logps[p].detach(), adv[p], mask[p], loss_type=loss_type, normaliser=norm)[0].backward()
        return logps.grad
    whole = grads("dapo", [torch.arange(4)])
    split = grads("dapo", [torch.tensor([0, 1]), torch.tensor([2, 3])])
    assert whole[0, 0].item() == pytest.approx(-1 / 22) and split[0, 0].item() == pytest.approx(-1 / 22)
    assert grads("bnpo", [torch.tensor([0, 1]), torch.tensor([2, 3])])[0, 0].item() == pytest.approx(-1 / 4)


def batch(seed=0, N=8, L=7, G=2):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (N,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    old = -torch.rand(N, L, generator=g) * 2
    logps = old + torch.randn(N, L, generator=g) * 0.3            # ratios on both sides of the clip
    ref = old + torch.randn(N, L, generator=g) * 0.2
    adv = torch.randn(N, generator=g)
    return logps, old, ref, adv, mask


def gradient(loss_type, level, ranks: int, accumulation: int, seed=0):
    """d loss / d logps for 8 samples split over ``ranks`` simulated processes (contiguous rows, as
    DataOrder's), each cutting its share into ``accumulation`` micro-batches: each rank's normaliser
    comes from step_normalisers with an all_sum over every rank's counts, each rank's gradient is
    the sum of its micro-batches', and DDP's is the mean of the ranks'."""
    logps, old, ref, adv, mask = batch(seed)
    leaf = logps.clone().requires_grad_(True)
    rows = torch.arange(8).chunk(ranks)
    parts = [list(r.chunk(accumulation)) for r in rows]
    local = [torch.stack([loss_normaliser(mask[p], loss_type, 2, 7) for p in ps]).sum() for ps in parts]
    total = torch.zeros_like(leaf)
    for r, ps in enumerate(parts):
        others = sum(local[j] for j in range(ranks) if j != r)
        norms = step_normalisers([mask[p] for p in ps], loss_type, 2, 7, all_sum=lambda t, o=others: t + o,
                                 world_size=ranks)
        for p, norm in zip(ps, norms):
            loss, _ = policy_loss(leaf[p], old[p], adv[p], mask[p], 0.2, 0.28 if loss_type != "cispo" else 5.0,
                                  ref[p], 0.04, loss_type, 2, importance_sampling_level=level, normaliser=norm,
                                  max_gen_len=7)
            g, = torch.autograd.grad(loss, leaf)
            total += g / ranks
    return total


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "bnpo"])
def test_accumulation_and_ranks_give_the_same_gradient(loss_type, level):
    one = gradient(loss_type, level, ranks=1, accumulation=1)
    assert one.abs().max() > 1e-3
    for ranks, accumulation in ((1, 2), (2, 1), (2, 2)):
        torch.testing.assert_close(gradient(loss_type, level, ranks, accumulation), one, atol=1e-6, rtol=0)
    logps, old, ref, adv, mask = batch()                         # one call on the whole batch, its own count
    leaf = logps.clone().requires_grad_(True)
    loss, _ = policy_loss(leaf, old, adv, mask, 0.2, 0.28 if loss_type != "cispo" else 5.0, ref, 0.04, loss_type, 2,
                          importance_sampling_level=level, max_gen_len=7)
    torch.testing.assert_close(torch.autograd.grad(loss, leaf)[0], one, atol=1e-6, rtol=0)


def test_bnpo_is_local():
    """bnpo depends on the cut: each micro-batch's token mean, then the mean of those."""
    assert (gradient("bnpo", "token", 1, 2) - gradient("bnpo", "token", 1, 1)).abs().max() > 1e-4
    assert set(AGGREGATION_TYPES) < set(LOSS_TYPES)


def test_overlong_penalty_and_zero_std_groups_by_hand():
    """max_gen_len 10, cache 4: no penalty up to 6 tokens, then (6 - |y|) / 4: 7 -> -0.25, 10 -> -1."""
    torch.testing.assert_close(overlong_penalty(torch.tensor([1, 6, 7, 8, 10]), 10, 4),
                               torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), 10, 11)
    assert zero_std_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 3.0, 3.0]), 2).tolist() == [True, True, False, False,
                                                                                         True, True]


def test_truncated_and_zero_std_rows_leave_the_loss_and_its_count():
    """Rows: 0 ended, 1 truncated, 2-3 a zero-std group. dapo over all four: tokens 3+1+2+2 = 8;
    without the truncated row 7; without the zero-std group 4; without both 3 (row 0 alone)."""
    resp = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    ended = torch.tensor([True, False, True, True])
    zero = torch.tensor([False, False, True, True])
    counts = [float(loss_normaliser(group_loss_mask(resp, ended, zero, t, z), "dapo"))
              for t, z in ((0, 0), (1, 0), (0, 1), (1, 1))]
    assert counts == [8, 7, 4, 3]
    both = group_loss_mask(resp, ended, zero, True, True)
    assert float(loss_normaliser(both, "grpo")) == 1 and both[0].tolist() == [1, 1, 1]
    logps = torch.zeros(4, 3, requires_grad=True)
    policy_loss(logps, logps.detach(), torch.ones(4), both)[0].backward()
    assert logps.grad[1:].abs().max() == 0 and logps.grad[0].tolist() == pytest.approx([-1 / 3] * 3)


def test_two_real_processes_give_one_process_gradient(tmp_path):
    """The same comparison over two gloo processes, with every normaliser through a real
    all_reduce (tests/helpers/loss_ranks.py), accumulation 1 and 2."""
    import torch.multiprocessing as mp
    from helpers.loss_ranks import worker
    for accumulation in (1, 2):
        out = tmp_path / f"grads{accumulation}.pt"
        mp.spawn(worker, args=(2, str(tmp_path / f"init{accumulation}"), str(out), accumulation), nprocs=2)
        grads = torch.load(out, weights_only=True)
        assert len(grads) == 2 * (len(LOSS_TYPES) - 1)
        for key, got in grads.items():
            loss_type, level = key.split("/")
            torch.testing.assert_close(got, gradient(loss_type, level, ranks=1, accumulation=1), atol=1e-6, rtol=0)
