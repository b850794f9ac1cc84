"""sequence_logprobs: against a hand computation; padding changes nothing."""
import copy
import math

import pytest
import torch

from model.logprobs import head_logprobs, masked_reduce, model_token_logprobs, sequence_logprobs, token_logprobs
from conftest import sample_ids


def test_hand_computed_values():
    # One sequence, vocab 2, logits chosen so the probabilities are easy:
    # position 0 logits (0, 0)   -> p = 1/2 each
    # position 1 logits (ln 3, 0) -> p(0) = 3/4, p(1) = 1/4
    # position 2 unused (no next token)
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [5.0, 5.0]]])
    ids = torch.tensor([[1, 1, 0]])      # predicted tokens: ids[1] = 1 at pos 0, ids[2] = 0 at pos 1
    per_token = token_logprobs(logits, ids)
    torch.testing.assert_close(per_token, torch.tensor([[math.log(0.5), math.log(0.75)]]))
    mask = torch.tensor([[0, 1, 1]])     # both predicted tokens are response tokens
    torch.testing.assert_close(sequence_logprobs(logits, ids, mask, "sum"), torch.tensor([math.log(0.375)]))
    torch.testing.assert_close(sequence_logprobs(logits, ids, mask, "mean"), torch.tensor([math.log(0.375) / 2]))
    only_last = torch.tensor([[0, 0, 1]])
    torch.testing.assert_close(sequence_logprobs(logits, ids, only_last, "sum"), torch.tensor([math.log(0.75)]))
    # the mean divides by the number of response tokens (1 here), not by the sequence length
    torch.testing.assert_close(sequence_logprobs(logits, ids, only_last, "mean"), torch.tensor([math.log(0.75)]))
    # temperature 2 halves the logits: position 1 becomes (ln 3 / 2, 0) -> p(0) = sqrt3 / (sqrt3 + 1)
    t2 = sequence_logprobs(logits, ids, only_last, "sum", temperature=2.0)
    torch.testing.assert_close(t2, torch.tensor([math.log(math.sqrt(3) / (math.sqrt(3) + 1))]))


def test_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, ids), ref)


def test_empty_mask_mean_is_zero():
    assert masked_reduce(torch.ones(2, 3), torch.zeros(2, 3), "mean").tolist() == [0.0, 0.0]


def test_padding_changes_nothing(tiny_model):
    model, tok = tiny_model
    prompt, response = sample_ids(shape=(1, 5), seed=1)[0].tolist(), sample_ids(shape=(1, 4), seed=2)[0].tolist()
    seq = prompt + response
    mask = [0] * len(prompt) + [1] * len(response)

    def score(ids, attn, rmask, reduce="sum"):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([attn])).logits
        return sequence_logprobs(logits, torch.tensor([ids]), torch.tensor([rmask]), reduce)

    plain = score(seq, [1] * len(seq), mask)
    pad = tok.pad_token_id
    right = score(seq + [pad] * 3, [1] * len(seq) + [0] * 3, mask + [0] * 3)
    torch.testing.assert_close(right, plain, rtol=1e-5, atol=1e-5)
    right_mean = score(seq + [pad] * 3, [1] * len(seq) + [0] * 3, mask + [0] * 3, "mean")
    torch.testing.assert_close(right_mean, score(seq, [1] * len(seq), mask, "mean"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right_mean * len(response), plain, rtol=1e-5, atol=1e-5)
    # left padding needs positions that skip the pads: transformers derives them from the mask in generate;
    # a plain forward gets them here
    ids, attn, rmask = [pad] * 3 + seq, [0] * 3 + [1] * len(seq), [0] * 3 + mask
    with torch.no_grad():
        pos = torch.clamp(torch.tensor([attn]).cumsum(-1) - 1, min=0)
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([attn]), position_ids=pos).logits
    left = sequence_logprobs(logits, torch.tensor([ids]), torch.tensor([rmask]), "sum")
    torch.testing.assert_close(left, plain, rtol=1e-5, atol=1e-5)


class SoftcappedLM(torch.nn.Module):
    """A head with Gemma's final soft-capping, the shape head_logits must reproduce."""

    def __init__(self, H=6, V=13, cap=0.7):
        super().__init__()
        self.lm_head = torch.nn.Linear(H, V, bias=False)
        self.config = type("C", (), {"final_logit_softcapping": cap})()

    def get_output_embeddings(self):
        return self.lm_head


def plain_head(lm, hidden, targets, temperature):
    logits = torch.tanh(lm.lm_head(hidden) / 0.7) * 0.7 / temperature
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("trained_head", [False, True])
def test_chunked_head_equals_the_whole_block_values_entropy_and_gradients(trained_head):
    torch.manual_seed(0)
    lm = SoftcappedLM()
    lm.lm_head.weight.requires_grad_(trained_head)          # frozen (LoRA) or trained (--use_lora 0)
    hidden = torch.randn(10, 6, requires_grad=True) * 3
    targets = torch.randint(0, 13, (10,))
    weights = torch.randn(10)                                # a loss that weighs each position differently
    want, want_ent = plain_head(lm, hidden, targets, 0.7)
    want_grads = torch.autograd.grad((want * weights).sum(), [hidden] + ([lm.lm_head.weight] if trained_head else []))
    # 13 * 3 logits a chunk: 3 positions, so 4 chunks of 10 positions (the last one short)
    got, ent = head_logprobs(lm, hidden, targets, 0.7, with_entropy=True, chunk_logits=13 * 3)
    grads = torch.autograd.grad((got * weights).sum(), [hidden] + ([lm.lm_head.weight] if trained_head else []))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, want_ent, atol=1e-6, rtol=1e-6)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(head_logprobs(lm, hidden, targets, 0.7, chunk_logits=13)[0], want)


def test_forward_head_logprobs_falls_back_when_the_model_post_processes_otherwise(tiny_model, monkeypatch):
    """A model whose logits are not what head_logits computes is noticed at its first forward
    and scored with its own logits from then on, so the values stay right."""
    model, _ = tiny_model
    model = copy.deepcopy(model)
    ids = sample_ids(shape=(2, 7), seed=3)
    want = token_logprobs(model(input_ids=ids).logits * 2.0, ids)
    monkeypatch.setattr(type(model), "forward", _doubled(type(model).forward))
    got = model_token_logprobs(model, ids, torch.ones_like(ids))
    assert model._chunked_head_ok is False
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _doubled(forward):
    def wrapped(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 2.0
        return out
    return wrapped
