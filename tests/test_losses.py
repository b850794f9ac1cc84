"""DPO loss and its variants: hand-derived values, invariants, and padding through a real model.

Hand values. Take l_pol(y+) = -1, l_pol(y-) = -3, l_ref(y+) = l_ref(y-) = -2, so
h = (-1 - -3) - (-2 - -2) = 2, and with beta = 0.5, beta*h = 1:
  sigmoid        -log s(1) = log(1 + e^-1)                              = 0.3132617
  cDPO e=0.1     0.9 log(1 + e^-1) + 0.1 log(1 + e)                     = 0.4132617
  robust e=0.1   (0.9 log(1 + e^-1) - 0.1 log(1 + e)) / 0.8             = 0.1882617
  ipo            (h - 1/(2 beta))^2 = (2 - 1)^2                         = 1
  hinge          relu(1 - 1) = 0; with beta = 0.25: relu(1 - 0.5)       = 0.5
  rewards/chosen = 0.5 (-1 - -2) = 0.5, rewards/rejected = 0.5 (-3 - -2) = -0.5, margin 1.
"""
import math

import pytest
import torch

from dataset.batches import collate_pairs
from model.logprobs import model_sequence_logprobs, sequence_logprobs
from losses.preference import DPO_LOSS_TYPES, dpo_loss

PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
SP1, SPM1 = math.log(1 + math.exp(-1)), math.log(1 + math.e)  # -log s(1), -log s(-1)


@pytest.mark.parametrize("loss_type, beta, e, expected", [
    ("sigmoid", 0.5, 0.0, SP1),
    ("sigmoid", 0.5, 0.1, 0.9 * SP1 + 0.1 * SPM1),
    ("robust", 0.5, 0.1, (0.9 * SP1 - 0.1 * SPM1) / 0.8),
    ("robust", 0.5, 0.0, SP1),
    ("ipo", 0.5, 0.0, 1.0),
    ("ipo", 0.25, 0.0, (2 - 2) ** 2),
    ("hinge", 0.5, 0.0, 0.0),
    ("hinge", 0.25, 0.0, 0.5),
])
def test_hand_derived_values(loss_type, beta, e, expected):
    loss, _ = dpo_loss(PC, PR, RC, RR, beta, loss_type, e)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_hand_derived_metrics():
    _, m = dpo_loss(PC, PR, RC, RR, 0.5)
    assert {k: round(float(v), 6) for k, v in m.items()} == {
        "rewards/chosen": 0.5, "rewards/rejected": -0.5, "rewards/margins": 1.0, "rewards/accuracies": 1.0,
        "logps/chosen": -1.0, "logps/rejected": -3.0}


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
@pytest.mark.parametrize("e", [0.0, 0.2])
def test_policy_equal_to_reference_gives_log_2(loss_type, e):
    g = torch.Generator().manual_seed(0)
    chosen, rejected = -torch.rand(5, generator=g) * 3, -torch.rand(5, generator=g) * 3
    loss, m = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), 5.0, loss_type, e)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert float(m["rewards/margins"]) == 0.0


def test_policy_equal_to_reference_ipo_and_hinge():
    x = torch.tensor([-1.0, -2.0])
    assert dpo_loss(x, x - 1, x, x - 1, 2.0, "ipo")[0].item() == pytest.approx(1 / 16)
    assert dpo_loss(x, x - 1, x, x - 1, 2.0, "hinge")[0].item() == pytest.approx(1.0)


def test_gradient_raises_chosen_and_lowers_rejected():
    for loss_type in DPO_LOSS_TYPES:
        chosen, rejected = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
        loss, _ = dpo_loss(chosen, rejected, torch.tensor([-2.0]), torch.tensor([-2.0]), 1.0, loss_type, 0.0)
        loss.backward()
        assert chosen.grad.item() < 0 < rejected.grad.item(), loss_type


def test_reference_gets_no_gradient_and_batch_is_a_mean():
    ref = torch.tensor([-2.0, -1.0], requires_grad=True)
    pol_c, pol_r = torch.tensor([-1.0, -0.5]), torch.tensor([-3.0, -4.0])
    loss, _ = dpo_loss(pol_c, pol_r, ref, ref, 1.0)
    assert not loss.requires_grad
    each = [dpo_loss(pol_c[i:i + 1], pol_r[i:i + 1], ref[i:i + 1], ref[i:i + 1], 1.0)[0].item() for i in range(2)]
    assert loss.item() == pytest.approx(sum(each) / 2)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="four"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, 0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, 1.0, "robust", 0.5)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, 1.0, "kto")


def plain(batch: dict) -> dict:
    """A collate_pairs batch's tensors, without its prompt_len."""
    return {k: v for k, v in batch.items() if k != "prompt_len"}


@torch.no_grad()
def test_padding_and_batch_neighbours_change_nothing(tiny_model):
    model, tok = tiny_model
    short = ([1, 50, 60], [70, 2], [80, 81, 2])
    long = ([1, 50, 60, 61, 62, 63, 64], [70, 71, 72, 73, 74, 2], [80, 2])
    for reduce in ("mean", "sum"):
        alone = plain(collate_pairs([short], tok.pad_token_id))
        together = plain(collate_pairs([short, long], tok.pad_token_id))   # the short pair now carries padding
        a = model_sequence_logprobs(model, **alone, reduce=reduce)
        b = model_sequence_logprobs(model, **together, reduce=reduce)
        assert together["attention_mask"][:2].eq(0).any(1).all()          # on both sides of each of its rows
        torch.testing.assert_close(a, b[:2], atol=1e-5, rtol=0)
        la, _ = dpo_loss(a[:1], a[1:], a[:1] * 0.9, a[1:] * 1.1, 1.0)
        lb, _ = dpo_loss(b[:1], b[1:2], b[:1] * 0.9, b[1:2] * 1.1, 1.0)
        assert la.item() == pytest.approx(lb.item(), abs=1e-5)


@torch.no_grad()
def test_logits_only_on_response_positions_equal_the_full_forward(tiny_model):
    model, tok = tiny_model
    items = [([1, 50, 60, 61, 62], [70, 2], [80, 81, 2]), ([1, 50], [70, 71, 72, 2], [80, 2])]
    batch = plain(collate_pairs(items, tok.pad_token_id))
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for reduce in ("mean", "sum"):
        expected = sequence_logprobs(full, batch["input_ids"], batch["response_mask"], reduce)
        torch.testing.assert_close(model_sequence_logprobs(model, **batch, reduce=reduce), expected)
