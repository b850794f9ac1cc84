"""train_gpo.py and train_grpo.py end to end: tiny runs, exact resume (sampling RNG included), torchrun, bad input."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import train_gpo
import train_grpo
from conftest import assert_trained_lora, first_lines, free_port, run_args
from dataset.formats import load_pairs
from model.loading import load_for_inference
from core.errors import UserError

TINY = ["--num_generations", "2", "--max_gen_len", "6", "--batch_size", "4"]
METRICS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio", "completions/mean_length",
           "completions/clipped_ratio", "completions/repetition", "loss", "lr", "grad_norm")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return first_lines("dataset/rl.jsonl", 32, tmp_path_factory.mktemp("rldata"))


def args_for(script, tmp, data, tiny_dir, *extra):
    return run_args(script.parse_args, tmp, data, os.path.join(tiny_dir, "full_sft_32"), *TINY, *extra)


def adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


@pytest.mark.parametrize("script, extra", [(train_gpo, ["--reward_funcs", "length,tests.helpers.toy_rewards:char_count",
                                                         "--reward_weights", "1,0.5"]),
                                           (train_grpo, [])])
def test_tiny_run_logs_every_metric_and_saves_lora_only(tmp_path, prompts, tiny_dir, script, extra, capsys):
    out = script.main(args_for(script, tmp_path, prompts, tiny_dir, "--max_steps", "2", "--debug_mode",
                               "--debug_interval", "1", *extra))
    assert_trained_lora(adapter(out))
    logged = rows(out + "_metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2]
    for key in METRICS:
        assert key in logged[0], key
    assert logged[0]["kl"] == pytest.approx(0, abs=1e-6)        # the first rollout's policy is the reference
    assert "advantage" in capsys.readouterr().out               # --debug_mode printed the samples


@pytest.mark.parametrize("script, extra", [
    (train_gpo, ["--reward_funcs", "tests.helpers.toy_rewards:char_count", "--ppo_epochs", "2", "--mini_batch_size", "4",
                "--accumulation_steps", "2"]),
    (train_grpo, ["--logp_reduce", "sum"]),
])
def test_resume_equals_uninterrupted(tmp_path, prompts, tiny_dir, script, extra):
    common = ["--learning_rate", "1e-2", *extra]
    straight = script.main(args_for(script, tmp_path / "a", prompts, tiny_dir, *common, "--max_steps", "4"))
    script.main(args_for(script, tmp_path / "b", prompts, tiny_dir, *common, "--max_steps", "4", "--stop_after_steps", "2"))
    resumed = script.main(args_for(script, tmp_path / "b", prompts, tiny_dir, *common, "--max_steps", "4",
                                   "--from_resume", "1"))
    a, b = adapter(straight), adapter(resumed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    early = adapter(script.main(args_for(script, tmp_path / "c", prompts, tiny_dir, *common, "--max_steps", "4",
                                         "--stop_after_steps", "2")))
    assert max(float((a[k] - early[k]).abs().max()) for k in a) > 1e-5     # steps 3-4 moved the weights
    ra, rb = rows(straight + "_metrics.jsonl"), rows(resumed + "_metrics.jsonl")
    assert [r["reward"] for r in ra] == pytest.approx([r["reward"] for r in rb], abs=1e-6)  # same samples


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [(train_gpo, ["--scale_rewards", "batch"]), (train_grpo, [])])
def test_torchrun_two_processes_then_one(tmp_path, prompts, tiny_dir, script, extra, capsys):
    eval_pairs = first_lines("dataset/heldout_dpo.jsonl", 5, tmp_path) if script is train_gpo else None
    if eval_pairs:
        extra = [*extra, "--eval_data", eval_pairs, "--eval_interval", "2"]
    args = ["--data_path", prompts, "--from_weight", os.path.join(tiny_dir, "full_sft_32"), *TINY, *extra,
            "--reward_funcs", "tests.helpers.toy_rewards:char_count", "--max_steps", "2",
            "--device", "cpu", "--log_interval", "1", "--save_dir", str(tmp_path / "out"),
            "--checkpoint_dir", str(tmp_path / "ck")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), script.__name__ + ".py", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "weights identical on all 2 processes" in proc.stdout
    metrics = tmp_path / "out" / f"{script.__name__[6:]}_32_metrics.jsonl"
    assert [r["step"] for r in rows(metrics)] == [1, 2]
    if eval_pairs:    # the held-out pairs were split across the two ranks: their sums give one process's scores
        import eval_align
        from training.evaluation import pair_scores, pair_sums, rates
        model, tok, _ = load_for_inference(eval_align.parse_args(["--from_weight", args[3], "--lora_weight",
                                                                  str(tmp_path / "out" / "gpo_32")]))
        alone = rates(pair_sums(*pair_scores(model, tok, load_pairs(eval_pairs), 256, 8, "cpu")))
        logged = rows(metrics)[-1]
        assert logged["eval/pair_acc"] == pytest.approx(alone["pair_acc"])
        assert logged["eval/reward_margin"] == pytest.approx(alone["reward_margin"], abs=1e-4)
    script.main(script.parse_args(args + ["--from_resume", "1", "--max_steps", "5"]))   # one process resumes
    assert "world size 2 -> 1: step 2 -> 4" in capsys.readouterr().out
    assert [r["step"] for r in rows(metrics)] == [1, 2, 5]


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_accumulation_leaves_the_step_unchanged(tmp_path, prompts, tiny_dir, loss_type):
    """The same rollout (sampling comes first) cut into 1 or 2 micro-batches: the same loss and
    gradient, because the normaliser is counted over the whole step before the backwards."""
    logged = []
    for acc in ("1", "2"):
        out = train_gpo.main(args_for(train_gpo, tmp_path / acc, prompts, tiny_dir, "--max_steps", "1", "--loss_type",
                                      loss_type, "--reward_funcs", "tests.helpers.toy_rewards:char_count",
                                      "--accumulation_steps", acc))
        logged.append(rows(out + "_metrics.jsonl")[0])
    assert logged[0]["reward"] == logged[1]["reward"] and logged[0]["grad_norm"] > 0
    for key in ("loss", "grad_norm", "clip_ratio"):
        assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-5, abs=1e-7), key


def test_truncation_length_penalty_and_zero_std_groups_are_logged(tmp_path, prompts, tiny_dir):
    """The tiny model never ends within 6 tokens: every response is truncated and gets the full
    overlong penalty of -1, so every group's rewards are equal (std 0) and nothing is left in the loss."""
    out = train_gpo.main(args_for(train_gpo, tmp_path, prompts, tiny_dir, "--max_steps", "1", "--mask_truncated", "1",
                                  "--overlong_penalty", "2", "--drop_zero_std", "1", "--reward_funcs", "length"))
    r = rows(out + "_metrics.jsonl")[0]
    assert r["completions/clipped_ratio"] == 1 and r["rewards/overlong_penalty"] == -1
    assert r["frac_reward_zero_std"] == 1 and r["groups_used"] == 0
    assert r["loss"] == 0 and r["grad_norm"] == 0


def test_bad_input_stops_before_training(tmp_path, prompts, tiny_dir, cli):
    no_answer = tmp_path / "q.jsonl"
    no_answer.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match='accuracy reward needs an "answer" field'):
        train_gpo.main(args_for(train_gpo, tmp_path, str(no_answer), tiny_dir))
    with pytest.raises(UserError, match="--num_generations must be at least 2"):
        train_gpo.main(args_for(train_gpo, tmp_path, prompts, tiny_dir, "--num_generations", "1"))
    with pytest.raises(UserError, match="--mini_batch_size must divide the 8 samples"):
        train_grpo.main(args_for(train_grpo, tmp_path, prompts, tiny_dir, "--mini_batch_size", "3"))
    with pytest.raises(UserError, match="not a built-in"):
        train_gpo.main(args_for(train_gpo, tmp_path, prompts, tiny_dir, "--reward_funcs", "acuracy"))
    with pytest.raises(UserError, match="--adv_level group z-scores each prompt's mean reward across the prompts"):
        train_gpo.main(args_for(train_gpo, tmp_path, prompts, tiny_dir, "--adv_level", "group", "--batch_size", "1"))
    with pytest.raises(UserError, match="--overlong_penalty must be 0"):
        train_grpo.main(args_for(train_grpo, tmp_path, prompts, tiny_dir, "--overlong_penalty", "7"))
    with pytest.raises(UserError, match="leaves no reward"):
        train_grpo.main(args_for(train_grpo, tmp_path, prompts, tiny_dir, "--self_reward_weight", "0"))
    assert not (tmp_path / "out").exists()
    code, _, err = cli("train_grpo.py", "--temperature", "0", "--device", "cpu")
    assert code == 2 and err.strip().splitlines()[-1] == "error: --temperature must be positive (got 0.0)"
