"""Reward functions (built-in and a user's own), their checks, and the reward model's loss."""
import math
import sys

import pytest
import torch

from core.errors import UserError
from losses.preference import reward_model_loss
from rl.rewards import (RewardFunctions, accuracy_reward, format_reward, length_reward, load_reward_function,
                        parse_reward_args, repeated_ngram_share, repetition_reward)

EN_Q = [{"role": "user", "content": "What is 3 plus 4?"}]
ZH_Q = [{"role": "user", "content": "3加4等于多少？"}]


def test_accuracy_in_both_languages():
    responses = ["3 plus 4 makes 7. The answer is 7.", "The answer is 8.", "3加4等于7。答案是 7。", "答案是 6。",
                 "I would rather not say.", "The answer is 6. Wait, the answer is 7."]
    answers = ["7", "7", "7", "7", "7", "7"]
    prompts = [EN_Q, EN_Q, ZH_Q, ZH_Q, EN_Q, EN_Q]
    assert accuracy_reward(prompts, responses, answer=answers) == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match='no "answer" field'):
        accuracy_reward(prompts, responses)


def test_format_in_both_languages():
    responses = ["The answer is 7.", "答案是 7。", "The answer is 7. Anything else?", "答案是 7。还有问题吗？",
                 "Seven, I think.", "大概是七吧"]
    assert format_reward([EN_Q] * 6, responses) == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]


def test_length_and_repetition():
    assert length_reward([EN_Q] * 4, ["a" * 10, "a" * 50, "a" * 125, "a" * 400]) == [1.0, 1.0, 0.5, 0.0]
    assert repeated_ngram_share("one two three four") == 0.0
    # 6 words -> 4 trigrams: (a b c) (b c a) (c a b) (a b c): one of four repeats an earlier one
    assert repeated_ngram_share("a b c a b c") == pytest.approx(0.25)
    # Chinese counts single characters: 好好好好好 -> 3 trigrams, all the same -> 2 of 3 repeat
    assert repeated_ngram_share("好好好好好") == pytest.approx(2 / 3)
    assert repetition_reward([ZH_Q, EN_Q], ["答案是 7。", "no no no no no no"]) == [1.0, pytest.approx(1 - 3 / 4)]


def test_user_function_by_module_name(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, responses, answer=None, **fields):\n"
        "    return [1.0 / (1 + len(r)) for r in responses]\n"
        "def broken(prompts, responses, **fields):\n"
        "    raise KeyError('score')\n"
        "def short(prompts, responses, **fields):\n"
        "    return [1.0]\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("my_rewards", None)
    rewards = RewardFunctions(["accuracy", "my_rewards:brevity"], [2.0, 10.0])
    total, parts = rewards([EN_Q, EN_Q], ["The answer is 7.", "no"], {"answer": ["7", "7"]})
    assert parts["accuracy"].tolist() == [1.0, 0.0]
    assert parts["my_rewards:brevity"].tolist() == pytest.approx([1 / 17, 1 / 3])
    assert total.tolist() == pytest.approx([2 + 10 / 17, 10 / 3])
    with pytest.raises(UserError, match=r"reward function my_rewards:broken failed: KeyError"):
        RewardFunctions(["my_rewards:broken"])([EN_Q], ["x"], {})
    with pytest.raises(UserError, match=r"reward function my_rewards:short returned 1 value\(s\) for 2 responses"):
        RewardFunctions(["my_rewards:short"])([EN_Q, EN_Q], ["x", "y"], {})
    with pytest.raises(UserError, match="has no function nope"):
        load_reward_function("my_rewards:nope")
    with pytest.raises(UserError, match="cannot import no_such_module"):
        load_reward_function("no_such_module:f")
    with pytest.raises(UserError, match="not a built-in"):
        load_reward_function("accuracyy")


def test_weights_clip_and_bad_values(monkeypatch):
    r = RewardFunctions(["format", "length"], [1.0, 1.0], clip=1.5)
    total, _ = r([EN_Q], ["The answer is 7."], {})
    assert total.tolist() == [1.5]                      # 1 + 1, clipped
    with pytest.raises(UserError, match="--reward_weights has 1 value"):
        RewardFunctions(["format", "length"], [1.0])
    with pytest.raises(UserError, match="no reward"):
        RewardFunctions([])
    assert parse_reward_args("accuracy, format", "1,0.5") == (["accuracy", "format"], [1.0, 0.5])
    with pytest.raises(UserError, match="comma-separated numbers"):
        parse_reward_args("accuracy", "one")
    nan = RewardFunctions(["format"])
    monkeypatch.setattr(nan, "funcs", [lambda p, r, **f: [math.nan]])
    with pytest.raises(UserError, match="non-finite"):
        nan([EN_Q], ["x"], {})


def test_reward_model_loss_hand_values():
    # r+ = 2, r- = 1: -log s(1) = log(1 + e^-1); with margin 0.5: -log s(0.5); centring 0.1 (2 + 1)^2 = 0.9
    c, r = torch.tensor([2.0]), torch.tensor([1.0])
    loss, m = reward_model_loss(c, r)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert loss.item() == pytest.approx(reward_model_loss(c + 5, r + 5)[0].item())  # only the gap matters
    assert reward_model_loss(c, r, torch.tensor([0.5]))[0].item() == pytest.approx(math.log(1 + math.exp(-0.5)))
    assert reward_model_loss(c, r, center_coef=0.1)[0].item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.9)
    assert {k: float(v) for k, v in m.items()} == {"accuracy": 1.0, "rewards/chosen": 2.0, "rewards/rejected": 1.0,
                                                   "rewards/margins": 1.0}
    # equal rewards: log 2, and the gradient pushes chosen up and rejected down
    c, r = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    loss, _ = reward_model_loss(c, r)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2)) and (c.grad < 0).all() and (r.grad > 0).all()


def test_reward_flags_build_the_rewards(tiny_dir):
    import argparse
    from rl.args import add_reward_args, add_rollout_args, rollout_problems
    from rl.rewards import rewards_from_args
    p = argparse.ArgumentParser()
    add_rollout_args(p)
    add_reward_args(p)
    args = p.parse_args([])
    assert rollout_problems(args) == []
    r = rewards_from_args(args)
    assert r.names == ["accuracy"] and r.reward_model is None
    args = p.parse_args(["--reward_funcs", "accuracy,format", "--reward_weights", "1,0.5", "--reward_clip", "1",
                         "--temperature", "0", "--top_p", "1.5"])
    assert rewards_from_args(args).weights == [1.0, 0.5]
    assert rollout_problems(args) == ["--temperature must be positive (got 0.0)", "--top_p must be in (0, 1] (got 1.5)"]
    with pytest.raises(UserError, match="no such folder"):
        rewards_from_args(p.parse_args(["--reward_model", "/nowhere"]))
