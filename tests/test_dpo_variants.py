"""SimPO, APO-zero, the RPO term and the over-optimisation warning: by hand, invariants, end to end.

Hand values (losses/preference.py):
  apo_zero  l_pol(y+) = -1, l_pol(y-) = -3, l_ref = -2 both, beta = 0.5: the chosen log-ratio is 1,
            the rejected -1, loss (1 - s(0.5)) + s(-0.5) = 2 s(-0.5) = 2 / (1 + e^0.5)  = 0.7550813
  simpo     l(y+) = -1, l(y-) = -1.5 (per-token means), beta = 2, gamma = 0.5:
            2 (0.5) - 0.5 = 0.5, -log s(0.5) = log(1 + e^-0.5)                  = 0.4740770
            rewards/chosen = 2 (-1) = -2, rewards/rejected = -3, margin 1
  rpo_nll   chosen per-token means -1 and -3: NLL (1 + 3) / 2                   = 2
"""
import json
import math

import pytest
import torch

import train_dpo
from train_dpo import OveroptimisationWatch, build, main, parse_args
from test_dpo import args_for, rows, save_dir, small_pairs  # noqa: F401 (fixtures)
from core.errors import UserError
from losses.preference import dpo_loss, rpo_nll, simpo_loss

PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))


def test_apo_zero_by_hand_and_one_at_the_reference():
    loss, m = dpo_loss(PC, PR, RC, RR, 0.5, "apo_zero")
    assert loss.item() == pytest.approx(0.7550813, abs=1e-6)
    assert float(m["rewards/margins"]) == pytest.approx(1.0)
    # Invariant: policy == reference gives (1 - 1/2) + 1/2 = 1 for any beta and log-probs.
    g = torch.Generator().manual_seed(0)
    c, r = -torch.rand(6, generator=g) * 4, -torch.rand(6, generator=g) * 4
    for beta in (0.1, 5.0):
        assert dpo_loss(c, r, c.clone(), r.clone(), beta, "apo_zero")[0].item() == pytest.approx(1.0, abs=1e-6)


def test_simpo_by_hand():
    loss, m = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), 2.0, 0.5)
    assert loss.item() == pytest.approx(0.4740770, abs=1e-6)
    assert {k: round(float(v), 6) for k, v in m.items()} == {
        "rewards/chosen": -2.0, "rewards/rejected": -3.0, "rewards/margins": 1.0, "rewards/accuracies": 1.0,
        "logps/chosen": -1.0, "logps/rejected": -1.5}


def test_simpo_invariants():
    """Only the margin counts (a shift of both sides changes nothing), and with gamma 0 SimPO is
    DPO's sigmoid loss against a reference that gives both responses the same log-prob."""
    g = torch.Generator().manual_seed(1)
    c, r = -torch.rand(5, generator=g) * 3, -torch.rand(5, generator=g) * 3
    base = simpo_loss(c, r, 2.5, 0.7)[0].item()
    assert simpo_loss(c - 1.3, r - 1.3, 2.5, 0.7)[0].item() == pytest.approx(base, abs=1e-6)
    zeros = torch.zeros(5)
    assert simpo_loss(c, r, 2.5, 0.0)[0].item() == pytest.approx(dpo_loss(c, r, zeros, zeros, 2.5)[0].item(), abs=1e-6)
    with pytest.raises(ValueError, match="two \\(B,\\) tensors"):
        simpo_loss(c, r[:2], 2.0)


def test_rpo_nll_by_hand_and_its_gradient():
    means = torch.tensor([-1.0, -3.0], requires_grad=True)
    nll = rpo_nll(means)
    assert nll.item() == pytest.approx(2.0)
    nll.backward()
    assert means.grad.tolist() == [-0.5, -0.5]  # minimising it raises every chosen log-prob


def test_watch_warns_once_when_chosen_falls_while_margin_grows(capsys):
    watch = OveroptimisationWatch(window=2)
    calls = [(-1.0, 0.0), (-1.0, 0.0),      # the start
             (-0.9, 1.0), (-0.9, 2.0),      # chosen up, margin up: fine
             (-1.2, 3.0),                   # last two: chosen -1.05, below its start, margin up: warn
             (-1.3, 4.0), (-1.5, 5.0)]      # once only
    fired = [watch.update(lp, m) for lp, m in calls]
    assert fired == [False, False, False, False, True, False, False]
    out = capsys.readouterr().out
    assert out.count("warning: the chosen answers' log-prob per token fell from -1.000 to -1.050") == 1
    quiet = OveroptimisationWatch(window=2)    # chosen falls but the margin shrinks too: no warning
    assert not any(quiet.update(lp, m) for lp, m in [(-1, 1), (-1, 1), (-2, 0), (-2, 0), (-3, -1)])


def test_rpo_alpha_adds_the_chosen_nll_at_step_one(tmp_path, small_pairs, save_dir):
    out = main(args_for(tmp_path, small_pairs, save_dir, "--max_steps", "1", "--rpo_alpha", "0.5"))
    first = rows(out + "_metrics.jsonl")[0]
    # Step 1: policy == reference, so the DPO part is log 2; the NLL is -logps/chosen (per-token means).
    assert first["nll_loss"] == pytest.approx(-first["logps/chosen"], abs=1e-5)
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["nll_loss"], abs=1e-5)
    assert json.load(open(out + "/minialign.json"))["rpo_alpha"] == 0.5


def test_rpo_alpha_0_is_the_seeds_plain_dpo(tmp_path, small_pairs, save_dir):
    out = main(args_for(tmp_path, small_pairs, save_dir, "--max_steps", "1", "--rpo_alpha", "0"))
    first = rows(out + "_metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and "nll_loss" not in first
    assert json.load(open(out + "/minialign.json"))["rpo_alpha"] == 0


def test_rpo_alpha_is_exact_under_accumulation(tmp_path, small_pairs, save_dir):
    """One batch of 4 and two micro-batches of 2 (the same pairs) give the same step-1 loss and NLL."""
    one = rows(main(args_for(tmp_path / "a", small_pairs, save_dir, "--max_steps", "1", "--rpo_alpha", "1"))
               + "_metrics.jsonl")[0]
    two = rows(main(args_for(tmp_path / "b", small_pairs, save_dir, "--max_steps", "1", "--rpo_alpha", "1",
                             "--batch_size", "2", "--accumulation_steps", "2")) + "_metrics.jsonl")[0]
    for key in ("loss", "nll_loss", "logps/chosen"):
        assert two[key] == pytest.approx(one[key], abs=1e-5), key


def test_simpo_builds_no_reference_and_its_rewards_are_the_policys(tmp_path, small_pairs, save_dir, monkeypatch):
    def no_reference(*a, **k):
        raise AssertionError("SimPO computed reference log-probs")
    monkeypatch.setattr(train_dpo, "precompute_reference", no_reference)
    args = args_for(tmp_path, small_pairs, save_dir, "--loss_type", "simpo", "--max_steps", "2", "--epochs", "3")
    assert (args.beta, args.ref_model, args.precompute_ref, args.simpo_gamma) == (2.0, None, 0, 0.5)
    job = build(args)
    assert job.run.reference is None and job.run.ref_model is None
    out = job()
    for r in rows(out + "_metrics.jsonl"):
        assert r["rewards/chosen"] == pytest.approx(2.0 * r["logps/chosen"], abs=1e-5)
        assert r["rewards/rejected"] == pytest.approx(2.0 * r["logps/rejected"], abs=1e-5)


def test_bad_variant_flags_are_refused_before_training(tmp_path, small_pairs, save_dir):
    with pytest.raises(UserError, match="--rpo_alpha must be >= 0"):
        main(args_for(tmp_path, small_pairs, save_dir, "--rpo_alpha", "-1"))
    with pytest.raises(UserError, match="needs --logp_reduce mean.*uses no reference model"):
        main(args_for(tmp_path, small_pairs, save_dir, "--loss_type", "simpo", "--logp_reduce", "sum",
                      "--ref_model", "copy"))
    assert not (tmp_path / "out").exists()


def test_help_says_what_simpo_rewards_are(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "no reference model; rewards/* are then beta times the policy's own per-token mean log-probs" in text
    assert "--rpo_alpha" in text and "--simpo_gamma" in text
