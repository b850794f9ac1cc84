"""The rollout engine: grouping, masks after the end token, and log-probs equal to a training forward."""
import pytest
import torch

from dataset.batches import pad_with_mask
from dataset.encoding import encode_prompt
from dataset.formats import load_prompts
from model import LMConfig, init_model
from model.logprobs import model_token_logprobs, token_logprobs
from rl.rollout import HFRolloutEngine, decode, response_mask_after_prompt, token_sampler


def test_response_mask_stops_after_the_first_end_token():
    responses = torch.tensor([[5, 2, 7, 2],     # ends at 1: the end token counts, what follows does not
                              [5, 6, 7, 8],     # never ends (cut by max_gen_len)
                              [2, 2, 9, 9]])    # ends at once
    mask, ended = response_mask_after_prompt(responses, stop=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


@pytest.fixture(scope="module")
def demo():
    model, tok = init_model(LMConfig(), "full_sft")   # the shipped demo SFT model: it does end its answers
    prompts = [p["prompt"] for p in load_prompts("dataset/heldout_rl.jsonl")[:3]]
    return model, tok, [encode_prompt(tok, m) for m in prompts]


def sample(demo, G=3, temperature=1.0, seed=0, **kw):
    model, tok, prompt_ids = demo
    torch.manual_seed(seed)
    engine = HFRolloutEngine(model, tok, max_gen_len=40, temperature=temperature, **kw)
    return engine.generate(prompt_ids, G)


def test_groups_stay_together_and_in_order(demo):
    model, tok, prompt_ids = demo
    r = sample(demo, G=3)
    assert r.sequences.shape[0] == 9 and r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(9):
        p = prompt_ids[i // 3]
        row = r.sequences[i, :r.prompt_len]
        assert row[r.prompt_len - len(p):].tolist() == p          # its own prompt, left-padded
        assert r.attention_mask[i, :r.prompt_len].sum() == len(p)
    assert r.ended.all(), r.texts                                  # the demo model closes its answers
    for i in range(9):
        resp = r.sequences[i, r.prompt_len:][r.response_mask[i, r.prompt_len:].bool()].tolist()
        assert resp[-1] == tok.eos_token_id and tok.eos_token_id not in resp[:-1]
        assert r.texts[i] == tok.decode(resp, skip_special_tokens=True)
    after = (r.response_mask[:, r.prompt_len:] == 0)
    assert (r.sequences[:, r.prompt_len:][after] == tok.pad_token_id).all()   # nothing after the end token
    assert r.response_lengths.tolist() == r.response_mask.sum(-1).tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_equal_a_training_forward(demo, temperature):
    model, tok, _ = demo
    r = sample(demo, G=2, temperature=temperature, top_k=20)
    model.train()   # the training forward: train mode, grad on
    with torch.enable_grad():
        fresh = model_token_logprobs(model, r.sequences, r.attention_mask, temperature)
    model.eval()
    mask = r.response_mask[:, 1:].bool()
    torch.testing.assert_close(r.logps[mask], fresh.detach()[mask], atol=1e-5, rtol=0)
    assert (r.logps[~mask] == 0).all()
    # The sampling forward's own log-probs (merged adapters, one token at a time) agree up to rounding.
    torch.testing.assert_close(r.sampled_logps, r.logps, atol=1e-4, rtol=0)
    # Each sample alone, without any padding, scores the same: positions follow the real tokens.
    for i in range(r.sequences.shape[0]):
        keep = r.attention_mask[i].bool()
        ids = r.sequences[i][keep][None]
        logits = model(input_ids=ids).logits
        alone = token_logprobs(logits, ids, temperature)[0]
        resp = r.response_mask[i][keep][1:].bool()
        torch.testing.assert_close(r.logps[i][mask[i]], alone[resp], atol=1e-5, rtol=0)


@torch.no_grad()
def test_positions_match_what_generate_used(demo):
    """generate's own raw logits for the sampled tokens equal the rescoring forward's."""
    model, tok, prompt_ids = demo
    ids, am = pad_with_mask(prompt_ids, tok.pad_token_id, side="left")
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=am, do_sample=True, max_new_tokens=6, top_k=0,
                         output_logits=True, return_dict_in_generate=True, eos_token_id=-1, pad_token_id=0)
    seq = out.sequences
    full_am = torch.cat([am, torch.ones(seq.shape[0], seq.shape[1] - ids.shape[1], dtype=am.dtype)], 1)
    rescored = model_token_logprobs(model, seq, full_am)[:, ids.shape[1] - 1:]            # (P, 6)
    from_generate = torch.stack([torch.log_softmax(l.float(), -1).gather(1, seq[:, ids.shape[1] + t, None])[:, 0]
                                 for t, l in enumerate(out.logits)], 1)
    torch.testing.assert_close(rescored, from_generate, atol=1e-4, rtol=0)


def test_sampling_is_seeded(demo):
    a, b = sample(demo, seed=3), sample(demo, seed=3)
    assert torch.equal(a.sequences, b.sequences) and a.texts == b.texts
    assert not torch.equal(a.sequences, sample(demo, seed=4).sequences)


def test_temperature_must_be_positive(demo):
    with pytest.raises(ValueError, match="temperature"):
        sample(demo, temperature=0.0)


def test_each_rank_samples_its_own_prompts_in_groups(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from conftest import free_port
    from dataset.encoding import encode_prompt
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "tests/helpers/rollout_ranks.py",
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert not set(ranks[0]["indices"]) & set(ranks[1]["indices"])      # different prompts on each rank
    _, tok = init_model(LMConfig(), "full_sft")
    prompts = load_prompts("dataset/heldout_rl.jsonl")[:8]
    for r in ranks:
        assert r["prompt_index"] == [0, 0, 0, 1, 1, 1]
        for j, text in enumerate(r["prompts"]):                         # sample j answers its own prompt
            assert text == tok.decode(encode_prompt(tok, prompts[r["indices"][j // 3]]["prompt"]))


@torch.no_grad()
def test_decode_picks_what_generate_picks(demo):
    """With argmax as the pick, decode's tokens (prompt shared by G rows, finished rows dropped)
    equal generate's greedy ones over each prompt alone, until each row's end token."""
    model, tok, _ = demo
    prompts = [encode_prompt(tok, p["prompt"]) for p in load_prompts("dataset/heldout_rl.jsonl")[:6]]
    ids, am = pad_with_mask(prompts, tok.pad_token_id, side="left")
    G, L = 2, 24
    out, _ = decode(model.eval(), ids, am, G, L, tok.eos_token_id, tok.pad_token_id, pick=lambda logits: logits.argmax(-1))
    lengths = []
    for i, p in enumerate(prompts):
        ref = model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=L,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        for row in out[i * G:(i + 1) * G].tolist():
            assert row[:len(ref)] == ref and set(row[len(ref):]) <= {tok.pad_token_id}
        lengths.append(len(ref))
    assert out.shape[1] == max(lengths)
    assert len(set(lengths)) > 1            # rows did finish at different steps: dropping them was exercised


@torch.no_grad()
def test_decode_stops_at_max_new_tokens_and_keeps_unfinished_rows(demo):
    model, tok, prompt_ids = demo
    ids, am = pad_with_mask(prompt_ids, tok.pad_token_id, side="left")
    never_ends = lambda logits: logits.masked_fill(torch.arange(logits.shape[1]) == tok.eos_token_id, -1e9).argmax(-1)
    out, _ = decode(model.eval(), ids, am, 3, 5, tok.eos_token_id, tok.pad_token_id, pick=never_ends)
    assert out.shape == (9, 5) and (out != tok.pad_token_id).all() and (out != tok.eos_token_id).all()


def draws(pick, logits, n=40000, seed=0):
    torch.manual_seed(seed)
    tokens = pick(logits.expand(n, -1).clone())
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / n


def test_token_sampler_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    for temperature in (1.0, 0.5, 2.0):
        freq = draws(token_sampler(temperature), logits)
        torch.testing.assert_close(freq, torch.softmax(logits[0] / temperature, -1), atol=0.01, rtol=0)


def test_token_sampler_top_k_and_top_p_keep_the_likeliest_tokens():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    p = torch.softmax(logits[0], -1)                       # 0.53, 0.20, 0.07, 0.03, 0.12
    freq = draws(token_sampler(top_k=2), logits)
    expect = torch.zeros(5)
    expect[[0, 1]] = p[[0, 1]] / p[[0, 1]].sum()
    torch.testing.assert_close(freq, expect, atol=0.01, rtol=0)
    assert freq[[2, 3, 4]].sum() == 0                     # never a token outside the top k
    freq = draws(token_sampler(top_p=0.8), logits)         # 0.53 + 0.20 < 0.8 <= + 0.12: three tokens
    expect = torch.zeros(5)
    expect[[0, 1, 4]] = p[[0, 1, 4]] / p[[0, 1, 4]].sum()
    torch.testing.assert_close(freq, expect, atol=0.01, rtol=0)


def test_token_sampler_survives_invalid_logits():
    logits = torch.tensor([[float("nan"), 1.0, float("inf")], [float("nan")] * 3])
    tokens = token_sampler()(logits)
    assert tokens[0] == 2 and 0 <= tokens[1] < 3
