"""Evaluation during training (--eval_data): logged eval/*, the best adapter kept, training untouched, resume exact."""
import json
import os

import pytest
from safetensors.torch import load_file

import train_dpo
import train_gpo
import train_reward
from conftest import first_lines, run_args
from core.errors import UserError
from training.evaluation import pass_sums, rates

GROUP = ["--num_generations", "2", "--max_gen_len", "6", "--reward_funcs", "tests.helpers.toy_rewards:char_count",
         "--learning_rate", "1e-2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    return {"rl": first_lines("dataset/rl.jsonl", 16, d), "pairs": first_lines("dataset/dpo.jsonl", 16, d),
            "heldout_rl": first_lines("dataset/heldout_rl.jsonl", 4, d),
            "heldout_pairs": first_lines("dataset/heldout_dpo.jsonl", 6, d)}


def gpo(tmp, files, tiny_dir, *extra):
    return train_gpo.main(run_args(train_gpo.parse_args, tmp, files["rl"], os.path.join(tiny_dir, "full_sft_32"),
                                   *GROUP, *extra))


def adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_rates_and_pass_at_k_by_hand():
    """Two prompts, k = 2: the first has one right sample of two, the second none -> pass@2 = 0.5."""
    prompts = [{"answer": "3"}, {"answer": "4"}]
    texts = ["The answer is 3.", "The answer is 5.", "The answer is 1.", "no"]
    sums = {"correct": 1.0, "length": 10.0, "prompts": 2.0, **pass_sums(prompts, texts, 2),
            "wins": 3.0, "margin": -1.5, "pairs": 4.0}
    assert rates(sums, 2) == {"pair_acc": 0.75, "reward_margin": -0.375, "answer_acc": 0.5, "mean_len": 5.0,
                              "pass@2": 0.5}


def test_evaluation_trains_identically_keeps_the_best_and_resumes_exactly(tmp_path, files, tiny_dir):
    evaluated = ["--eval_data", files["heldout_rl"], "--eval_interval", "2", "--eval_samples", "2", "--save_best", "1",
                 "--eval_max_new_tokens", "8"]
    plain = gpo(tmp_path / "a", files, tiny_dir, "--max_steps", "3")
    gpo(tmp_path / "b", files, tiny_dir, "--max_steps", "3", "--stop_after_steps", "2", *evaluated)
    resumed = gpo(tmp_path / "b", files, tiny_dir, "--max_steps", "3", "--from_resume", "1", *evaluated)
    a, b = adapter(plain), adapter(resumed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0           # evaluation changed no training
    ra, rb = rows(plain + "_metrics.jsonl"), rows(resumed + "_metrics.jsonl")
    assert [r["reward"] for r in ra] == [r["reward"] for r in rb]          # nor a sample
    scored = [r for r in rb if "eval/answer_acc" in r]
    assert [r["step"] for r in scored] == [2, 3]                           # every 2 steps and at the end
    for key in ("eval/answer_acc", "eval/mean_len", "eval/pass@2"):
        assert 0 <= scored[0][key] and key in scored[1]
    best = os.path.join(str(tmp_path / "b" / "out"), "gpo_best_32")
    assert os.path.isfile(os.path.join(best, "adapter_model.safetensors"))
    assert not any("eval/" in k for r in ra for k in r)                    # nothing when off


@pytest.mark.parametrize("script, data", [(train_dpo, "pairs"), (train_reward, "pairs")])
def test_pairs_give_pair_accuracy_and_margin(tmp_path, files, tiny_dir, script, data):
    out = script.main(run_args(script.parse_args, tmp_path, files[data], os.path.join(tiny_dir, "full_sft_32"),
                               "--max_steps", "2", "--eval_data", files["heldout_pairs"], "--eval_interval", "1",
                               "--save_best", "1", "--best_metric", "reward_margin"))
    scored = [r for r in rows(out + "_metrics.jsonl") if "eval/pair_acc" in r]
    assert [r["step"] for r in scored] == [1, 2]
    assert all(0 <= r["eval/pair_acc"] <= 1 and "eval/reward_margin" in r for r in scored)
    assert os.path.isdir(out.replace(f"{script.__name__[6:]}_32", f"{script.__name__[6:]}_best_32"))


def test_bad_evaluation_flags_stop_before_any_model(tmp_path, files, tiny_dir):
    no_answer = tmp_path / "q.jsonl"
    no_answer.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match='prompt 1 has no "answer" field'):
        gpo(tmp_path, files, tiny_dir, "--eval_data", str(no_answer))
    with pytest.raises(UserError, match="--best_metric pair_acc: the prompts in .* give answer_acc, pass@2"):
        gpo(tmp_path, files, tiny_dir, "--eval_data", files["heldout_rl"], "--best_metric", "pair_acc",
            "--eval_samples", "2")
    with pytest.raises(UserError, match="--save_best 1 needs --eval_data"):
        gpo(tmp_path, files, tiny_dir, "--save_best", "1")
    assert not (tmp_path / "out").exists()
