"""Answers against the start model's, judged by a reward model (eval_align.py --reward_model).

win_sums by hand: rewards (2.0, 1.0, 0.5, 0.0) against the start's (1.0, 0.98, 0.9, 0.0) with
tie margin 0.05 have gaps 1.0 (win), 0.02 (tie), -0.4 (loss), 0.0 (tie): win 1/4, tie 2/4,
loss 1/4; mean rewards 3.5/4 = 0.875 and 2.88/4 = 0.72. Against rejected rewards
(1.5, 1.5, 0.0, 0.0): the model beats 1 and 3 of them (2.0 > 1.5, 0.5 > 0.0), so 0.5; the start
beats only 0.9 > 0.0, so 0.25. Lengths (3, 5, 7, 9) and (2, 2, 2, 2): means 6 and 2.
"""
import json
import os

import pytest
import torch

from dataset.demo_world import on_point
from eval_align import main, parse_args
from core.errors import UserError
from training.evaluation import rates, win_sums

NEW, START = torch.tensor([2.0, 1.0, 0.5, 0.0]), torch.tensor([1.0, 0.98, 0.9, 0.0])
REJECTED = torch.tensor([1.5, 1.5, 0.0, 0.0])


def test_win_sums_by_hand():
    r = rates(win_sums(NEW, START, [3, 5, 7, 9], [2, 2, 2, 2], 0.05, REJECTED))
    assert (r["win_rate"], r["tie_rate"], r["loss_rate"]) == (0.25, 0.5, 0.25)
    assert r["reward"] == pytest.approx(0.875) and r["reward_start"] == pytest.approx(0.72)
    assert (r["beats_rejected"], r["beats_rejected_start"]) == (0.5, 0.25)
    assert (r["gen_len"], r["gen_len_start"]) == (6.0, 2.0)
    edge = rates(win_sums(torch.tensor([2.0, 1.0]), torch.tensor([1.5, 1.25]), [1, 1], [1, 1], 0.5))
    assert (edge["win_rate"], edge["tie_rate"]) == (0.5, 0.5)       # a gap of exactly the margin wins


def test_win_sums_invariants():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    ab, ba = rates(win_sums(a, b, [1] * 50, [1] * 50, 0.1)), rates(win_sums(b, a, [1] * 50, [1] * 50, 0.1))
    assert ab["win_rate"] == ba["loss_rate"] and ab["tie_rate"] == ba["tie_rate"]
    assert ab["win_rate"] + ab["tie_rate"] + ab["loss_rate"] == pytest.approx(1.0)
    same = rates(win_sums(a, a.clone(), [1] * 50, [1] * 50, 0.0001))
    assert (same["win_rate"], same["tie_rate"]) == (0.0, 1.0)
    assert rates(win_sums(a, b, [1] * 50, [1] * 50, 0.0))["tie_rate"] == 0.0     # margin 0: no ties
    shifted = rates(win_sums(a + 1, b + 1, [1] * 50, [1] * 50, 0.1))            # rewards shifted alike
    assert shifted["win_rate"] == ab["win_rate"]
    with pytest.raises(ValueError, match="shapes"):
        win_sums(a, b[:3], [1] * 50, [1] * 50)


def test_on_point_reads_the_demo_style():
    assert on_point("Sure! 2 + 3 = 5. The answer is 5.") and on_point("3 + 6 = 9，答案是 9。")
    assert on_point("2 + 3 = 6. The answer is 6.")              # wrong, yet on point: style, not correctness
    assert not on_point("Figure it out yourself.") and not on_point("Well, this is an interesting question.")
    assert not on_point("Let me think about it for a while. The answer is 5.")


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A tiny random sequence-classification reward model with the shipped tokenizer."""
    from transformers import Qwen3Config, Qwen3ForSequenceClassification
    from model import LMConfig, init_model
    model, tok = init_model(LMConfig(hidden_size=32, num_hidden_layers=2), "none")
    torch.manual_seed(0)
    clf = Qwen3ForSequenceClassification(Qwen3Config(**{**model.config.to_dict(), "num_labels": 1,
                                                        "architectures": None}))
    d = tmp_path_factory.mktemp("rm") / "clf"
    clf.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def few_pairs(tmp_path_factory):
    lines = open("dataset/heldout_dpo.jsonl", encoding="utf-8").read().splitlines()[:12]
    d = tmp_path_factory.mktemp("pairs")
    (d / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prompts = open("dataset/heldout_rl.jsonl", encoding="utf-8").read().splitlines()[:4]
    (d / "prompts.jsonl").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return str(d / "pairs.jsonl")


def compare(reward_dir, few_pairs, *extra):
    return main(parse_args(["--json", "--device", "cpu", "--reward_model", reward_dir, "--pairs", few_pairs,
                            "--data", few_pairs.replace("pairs.jsonl", "prompts.jsonl"),
                            "--max_new_tokens", "12", "--style_check", "dataset.demo_world:on_point", *extra]))


def test_against_itself_every_answer_ties(reward_dir, few_pairs, capsys):
    r = compare(reward_dir, few_pairs, "--baseline", "full_sft")
    assert (r["win_rate"], r["tie_rate"], r["n_compared"]) == (0.0, 1.0, 12)
    assert r["reward"] == r["reward_start"] and r["style_share"] == r["style_share_start"]
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["win_rate"] == 0.0 and "compared_examples" not in line


def test_an_adapter_against_its_base_and_back(reward_dir, few_pairs):
    there = compare(reward_dir, few_pairs, "--lora_weight", "lora_identity", "--tie_margin", "0")
    assert there["baseline"].endswith(os.path.join("model", "demo", "full_sft_192"))   # the base it records
    assert there["n_compared"] == 12
    back = compare(reward_dir, few_pairs, "--from_weight", "lora_identity", "--baseline", "full_sft",
                   "--tie_margin", "0")
    assert back["win_rate"] == there["win_rate"] and back["reward"] == there["reward"]     # the same comparison
    assert there["win_rate"] + there["tie_rate"] + there["loss_rate"] == pytest.approx(1.0)
    assert there["gen_len"] != there["gen_len_start"] or there["reward"] != there["reward_start"]


def test_sampled_answers_are_k_per_prompt_and_seeded(reward_dir, few_pairs):
    a = compare(reward_dir, few_pairs, "--lora_weight", "lora_identity", "--eval_samples", "2", "--seed", "3")
    b = compare(reward_dir, few_pairs, "--lora_weight", "lora_identity", "--eval_samples", "2", "--seed", "3")
    assert a["n_compared"] == 24 and a["win_rate"] == b["win_rate"] and a["reward"] == b["reward"]


def test_bad_flags_stop_before_loading(few_pairs):
    with pytest.raises(UserError, match="--baseline needs --reward_model"):
        main(parse_args(["--baseline", "full_sft", "--pairs", few_pairs]))
    with pytest.raises(UserError, match="--tie_margin must be 0 or more"):
        main(parse_args(["--reward_model", "x", "--tie_margin", "-1"]))
    with pytest.raises(UserError, match="--eval_samples must be 0 or more"):
        main(parse_args(["--reward_model", "x", "--eval_samples", "-1"]))
    with pytest.raises(UserError, match="--style_check nope:f"):
        main(parse_args(["--style_check", "nope:f"]))


@pytest.mark.parametrize("script", ["dpo", "gpo"])
def test_during_training_the_start_model_is_the_one_training_began_from(tmp_path, reward_dir, tiny_dir, script):
    """With a learning rate too small to move any greedy answer, every answer ties with the start's."""
    import importlib
    import os
    from conftest import first_lines, run_args
    mod = importlib.import_module(f"train_{script}")
    data = first_lines("dataset/dpo.jsonl" if script == "dpo" else "dataset/rl.jsonl", 8, tmp_path)
    extra = [] if script == "dpo" else ["--num_generations", "2", "--max_gen_len", "6", "--reward_funcs",
                                        "tests.helpers.toy_rewards:char_count"]
    out = mod.main(run_args(mod.parse_args, tmp_path, data, os.path.join(tiny_dir, "full_sft_32"), *extra,
                            "--max_steps", "2", "--learning_rate", "1e-12", "--eval_data",
                            first_lines("dataset/heldout_dpo.jsonl", 6, tmp_path), "--eval_interval", "1",
                            "--eval_reward_model", reward_dir, "--eval_max_new_tokens", "6"))
    scored = [json.loads(x) for x in open(out + "_metrics.jsonl") if "eval/win_rate" in x]
    assert [r["step"] for r in scored] == [1, 2]
    for r in scored:
        assert (r["eval/win_rate"], r["eval/tie_rate"]) == (0.0, 1.0)
        assert r["eval/reward"] == pytest.approx(r["eval/reward_start"]) and 0 <= r["eval/beats_rejected"] <= 1


def test_bad_training_comparison_flags(tmp_path, tiny_dir, reward_dir):
    import os
    import train_dpo
    from conftest import first_lines, run_args
    data = first_lines("dataset/dpo.jsonl", 8, tmp_path)
    args = lambda *x: run_args(train_dpo.parse_args, tmp_path, data, os.path.join(tiny_dir, "full_sft_32"), *x)
    with pytest.raises(UserError, match="--eval_reward_model needs --eval_data"):
        train_dpo.main(args("--eval_reward_model", reward_dir))
    with pytest.raises(UserError, match="compares answers to the prompts of held-out pairs"):
        train_dpo.main(args("--eval_reward_model", reward_dir, "--eval_data",
                            first_lines("dataset/heldout_rl.jsonl", 4, tmp_path)))
    assert not (tmp_path / "out").exists()
