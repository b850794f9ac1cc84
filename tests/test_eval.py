"""eval_align.py: the shipped SFT sits in its band; metrics are well defined."""
import json

import pytest
import torch

from dataset.encoding import encode_prompt, encode_response, render_prompt
from dataset.formats import load_pairs
from model.logprobs import model_sequence_logprobs
from eval_align import main, pair_accuracy, parse_args


def test_shipped_sft_is_deliberately_imperfect():
    r = main(parse_args(["--json", "--device", "cpu"]))
    assert 0.20 <= r["answer_acc"] <= 0.70, r
    assert r["n_prompts"] >= 150 and r["n_pairs"] >= 250
    assert 0.5 < r["pair_acc"] < 0.95  # room for DPO to help


def test_json_line_keys(tiny_dir, tiny_model, cli):
    code, out, err = cli("eval_align.py", "--from_weight", "full_sft", "--save_dir", tiny_dir, "--json", "--device",
                         "cpu", "--max_new_tokens", "4")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("pair_acc", "answer_acc", "mean_len", "n_pairs", "n_prompts"):
        assert key in result
    # pair_acc: the pairs whose chosen answer has the higher mean log-prob per token, each pair scored on its own
    # here (no batch, no padding); answer_acc 0: a random 2-layer model does not write "The answer is X." in 4 tokens
    model, tok = tiny_model
    pairs = load_pairs("dataset/heldout_dpo.jsonl")
    wins = [one_by_one(model, tok, p, "chosen") > one_by_one(model, tok, p, "rejected") for p in pairs]
    assert result["n_pairs"] == len(pairs) and result["pair_acc"] == round(sum(wins) / len(wins), 4)
    assert result["pair_acc"] not in (0.0, 0.5, 1.0)                 # a flipped comparison would show
    assert result["answer_acc"] == 0 and 1 <= result["mean_len"] <= 4


@torch.no_grad()
def one_by_one(model, tok, pair: dict, side: str) -> float:
    """The mean log-prob per token of one answer of a pair, its sequence alone in a batch of one."""
    prompt = encode_prompt(tok, pair["prompt"])
    response = encode_response(tok, pair[side], render_prompt(tok, pair["prompt"]), prompt)
    ids = torch.tensor([prompt + response])
    mask = torch.tensor([[0] * len(prompt) + [1] * len(response)])
    return float(model_sequence_logprobs(model, ids, torch.ones_like(ids), mask))


def test_swapping_chosen_and_rejected_flips_pair_accuracy(tiny_model):
    model, tok = tiny_model
    pairs = load_pairs("dataset/heldout_dpo.jsonl")[:40]
    swapped = [dict(p, chosen=p["rejected"], rejected=p["chosen"]) for p in pairs]
    acc, n = pair_accuracy(model, tok, pairs, 256, 16, "cpu")
    acc_swapped, _ = pair_accuracy(model, tok, swapped, 256, 16, "cpu")
    assert n == 40 and acc + acc_swapped == pytest.approx(1.0)


def test_missing_answer_field_is_reported(tmp_path, tiny_dir, cli):
    f = tmp_path / "p.jsonl"
    f.write_text('{"conversations": [{"role": "user", "content": "q"}]}\n')
    code, _, err = cli("eval_align.py", "--from_weight", "full_sft", "--save_dir", tiny_dir, "--data", str(f),
                       "--device", "cpu")
    assert code == 2 and "have no \"answer\" field" in err


def test_shipped_lora_identity_knows_who_it_is():
    from training.evaluation import generate_responses as greedy_responses
    from model import LMConfig, init_model
    model, tok = init_model(LMConfig(), "lora_identity", save_dir="no_such_dir")
    texts, _ = greedy_responses(model, tok, [[{"role": "user", "content": "Who are you?"}],
                                             [{"role": "user", "content": "你是谁？"}]], 40, 2, "cpu")
    assert "MiniAlign" in texts[0] and "MiniAlign" in texts[1], texts
    base, tok = init_model(LMConfig(), "full_sft", save_dir="no_such_dir")
    texts, _ = greedy_responses(base, tok, [[{"role": "user", "content": "Who are you?"}]], 40, 1, "cpu")
    assert "MiniAlign" not in texts[0]  # the SFT model alone does not know


def test_pairs_none_gives_answer_accuracy_alone(tiny_dir, tmp_path, capsys):
    from tests.conftest import first_lines
    from core.errors import UserError
    data = first_lines("dataset/heldout_rl.jsonl", 6, tmp_path)
    common = ["--from_weight", "full_sft", "--save_dir", tiny_dir, "--data", data, "--pairs", "none", "--device", "cpu",
              "--max_new_tokens", "4"]
    r = main(parse_args(common))
    assert r["pair_acc"] is None and r["n_pairs"] == 0 and r["n_prompts"] == 6 and r["answer_acc"] == 0
    said = capsys.readouterr().out
    assert "answer_acc" in said and "pair_acc" not in said
    with pytest.raises(UserError, match="--reward_model needs --pairs"):
        main(parse_args(common + ["--reward_model", "out/reward_32"]))
