"""train_ppo.py end to end: metrics, the saved actor and critic, one copy of the base weights,
a frozen reference, exact resume (critic and both optimizers included), torchrun, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import rl.ppo
import train_ppo
import train_reward
from conftest import ADAPTER_FILES, assert_trained_lora, first_lines, free_port, run_args
from model.lora import adapter_parameters
from model.reward_model import RewardModel
from model.value_head import HEAD_FILE
from training.checkpoint import load_resume
from core.errors import UserError
from model.logprobs import model_token_logprobs
from rl.ppo import PPOSettings, actor_critic_builder, make_ppo_step, ppo_optimizers
from rl.rewards import rewards_from_args
from training.loop import Updater
from rl.start import start_rl_run
from training.order import TrainState

TINY = ["--num_generations", "2", "--max_gen_len", "6", "--batch_size", "4"]
METRICS = ("reward", "reward_std", "kl", "rlhf_reward", "approx_kl", "clip_ratio", "value_loss", "value_clip_ratio",
           "explained_variance", "entropy", "completions/mean_length", "completions/clipped_ratio", "loss", "lr",
           "critic_lr", "grad_norm", "critic_grad_norm", "ppo_updates", "values", "returns")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return first_lines("dataset/rl.jsonl", 32, tmp_path_factory.mktemp("rldata"))


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_dir):
    """A reward model train_reward.py trained on the tiny base (a LoRA adapter + head)."""
    tmp = tmp_path_factory.mktemp("rm")
    pairs = first_lines("dataset/dpo.jsonl", 16, tmp)
    return train_reward.main(run_args(train_reward.parse_args, tmp, pairs, os.path.join(tiny_dir, "full_sft_32"),
                                      "--max_steps", "2", "--learning_rate", "5e-2", "--lora_rank", "4"))


def args_for(tmp, data, tiny_dir, *extra):
    return run_args(train_ppo.parse_args, tmp, data, os.path.join(tiny_dir, "full_sft_32"), *TINY, *extra)


def tensors(folder, *files):
    out = {}
    for f in files or ("adapter_model.safetensors",):
        out.update({f"{f}:{k}": v for k, v in load_file(os.path.join(folder, f)).items()})
    return out


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def critic_dir(actor_dir):
    return actor_dir.replace("ppo_actor", "ppo_critic")


def test_tiny_run_logs_every_metric_and_saves_actor_and_critic(tmp_path, prompts, tiny_dir, capsys, monkeypatch):
    calls, policy_loss = [], rl.ppo.policy_loss

    def recording(logps, old_logps, *a, **kw):
        calls.append((logps.detach().clone(), old_logps.clone()))
        return policy_loss(logps, old_logps, *a, **kw)
    monkeypatch.setattr(rl.ppo, "policy_loss", recording)
    out = train_ppo.main(args_for(tmp_path, prompts, tiny_dir, "--max_steps", "2", "--debug_mode", "--debug_interval",
                                  "1", "--missing_eos_penalty", "1", "--critic_learning_rate", "3e-3"))
    assert torch.equal(*calls[0])                 # the first update's ratio is exactly 1: old and new, one computation
    assert not torch.equal(*calls[-1])            # ... and later ones have moved
    assert out.endswith("ppo_actor_32")
    assert sorted(os.listdir(out)) == ADAPTER_FILES
    actor = tensors(out)
    assert_trained_lora(actor)
    critic = critic_dir(out)
    assert sorted(os.listdir(critic)) == sorted(os.listdir(out) + [HEAD_FILE])
    assert max_diff(actor, tensors(critic)) > 0                     # two different adapters
    RewardModel.load(critic)                                        # the critic loads as a value model
    logged = rows(out + "_metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2]
    for key in METRICS:
        assert key in logged[0], key
    first = logged[0]
    assert first["kl"] == 0.0                                       # the first rollout's policy is the reference
    assert first["critic_lr"] == pytest.approx(3e-3) and first["lr"] == pytest.approx(3e-3)
    for r in logged:    # 6 new tokens rarely end: every unended response lost 1 point
        assert r["reward"] == pytest.approx(r["rewards/accuracy"] - r["completions/clipped_ratio"], abs=1e-6)
    assert "advantage" in capsys.readouterr().out


def test_resume_equals_uninterrupted_with_the_critic_and_both_optimizers(tmp_path, prompts, tiny_dir):
    common = ["--learning_rate", "1e-2", "--critic_learning_rate", "2e-2", "--ppo_update_iters", "2",
              "--mini_batch_size", "4", "--accumulation_steps", "2", "--kl_estimator", "k3",
              "--reward_funcs", "tests.helpers.toy_rewards:char_count"]
    files = ("adapter_model.safetensors", HEAD_FILE)
    straight = train_ppo.main(args_for(tmp_path / "a", prompts, tiny_dir, *common, "--max_steps", "4"))
    train_ppo.main(args_for(tmp_path / "b", prompts, tiny_dir, *common, "--max_steps", "4", "--stop_after_steps", "2"))
    ckpt = load_resume(str(tmp_path / "b" / "ck" / "ppo_actor_32_resume.pth"))
    assert set(ckpt["optimizers"]) == {"policy", "critic"}
    assert all(ckpt["optimizers"][k]["state"] for k in ("policy", "critic"))
    resumed = train_ppo.main(args_for(tmp_path / "b", prompts, tiny_dir, *common, "--max_steps", "4", "--from_resume", "1"))
    assert max_diff(tensors(straight), tensors(resumed)) <= 1e-6
    assert max_diff(tensors(critic_dir(straight), *files), tensors(critic_dir(resumed), *files)) <= 1e-6
    early = train_ppo.main(args_for(tmp_path / "c", prompts, tiny_dir, *common, "--max_steps", "4", "--stop_after_steps", "2"))
    assert max_diff(tensors(straight), tensors(early)) > 1e-5                      # steps 3-4 moved the policy
    assert max_diff(tensors(critic_dir(straight), *files), tensors(critic_dir(early), *files)) > 1e-5  # and the critic
    ra, rb = rows(straight + "_metrics.jsonl"), rows(resumed + "_metrics.jsonl")
    for key in ("reward", "value_loss", "critic_lr"):
        assert [r[key] for r in ra] == pytest.approx([r[key] for r in rb], abs=1e-6)


def test_one_copy_of_the_base_weights_and_a_frozen_reference(tmp_path, prompts, tiny_dir, reward_dir, capsys):
    from model import LMConfig, init_model
    args = args_for(tmp_path, prompts, tiny_dir, "--reward_model", reward_dir, "--reward_funcs", "",
                    "--learning_rate", "5e-2")
    from dataset.formats import load_prompts
    data = load_prompts(args.data_path)
    shared = {}
    run, source, _ = start_rl_run(args, "ppo", data, wrap=actor_critic_builder(args, shared))
    engine, prompt_ids = source.engine, source.ids
    assert "an adapter on the policy's own base weights" in capsys.readouterr().out
    lm, rm = run.lm, shared["model"]
    assert rm.model.lm is lm and run.ref_model is None and engine.model is lm

    # One copy: the run's base tensors are the plain model's, each stored once; only adapters and heads add to it.
    plain, _ = init_model(LMConfig(), os.path.join(tiny_dir, "full_sft_32"))
    ptrs = {}
    for name, p in run.base_model.named_parameters(remove_duplicate=False):
        ptrs.setdefault(p.data_ptr(), []).append(name)
    base = {n for n, p in run.base_model.named_parameters() if "lora_" not in n and not n.startswith("head.")}
    assert len(base) == len(list(plain.parameters()))
    assert all(len(names) == 1 or all("embed" in n or "lm_head" in n for n in names) for names in ptrs.values())
    assert not any(p.requires_grad for n, p in run.base_model.named_parameters() if n in base)
    assert not any(p.requires_grad for p in adapter_parameters(lm, "reward")) and not any(
        p.requires_grad for p in rm.model.head.parameters())

    # The critic starts as the reward model: same adapter weights, same head, so the same score.
    for c, r in zip(adapter_parameters(lm, "critic"), adapter_parameters(lm, "reward")):
        assert torch.equal(c, r)
    assert torch.equal(run.base_model.head.weight, rm.model.head.weight)

    rollout = engine.generate(prompt_ids[:2], 2)
    seqs, am, first = rollout.sequences, rollout.attention_mask, rollout.prompt_len

    def reference():
        with run.reference_model() as ref:
            return model_token_logprobs(ref, seqs, am, 1.0, first)
    ref_before, rm_before = reference(), rm.score_batched([[1, 5, 9, 12], [1, 7, 7]])
    plain_logps = model_token_logprobs(plain, seqs, am, 1.0, first)
    assert torch.allclose(ref_before, plain_logps, atol=1e-5)                    # reference = the SFT weights

    rewards = rewards_from_args(args, reward_model=rm)
    updater = Updater(run, ppo_optimizers(run.base_model, args.learning_rate), args.learning_rate, args.grad_clip,
                      args.accumulation_steps)
    step = make_ppo_step(run, source, updater, rewards.score_rollout, PPOSettings.from_args(args))
    state = TrainState()
    for _ in range(2):
        metrics, _ = step(state)
    assert "rewards/reward_model" in metrics
    with torch.no_grad():
        policy_after = model_token_logprobs(lm, seqs, am, 1.0, first)
    assert (policy_after - ref_before).abs().max() > 1e-4                         # the policy moved
    assert torch.equal(reference(), ref_before)                                   # the reference did not
    assert torch.equal(rm.score_batched([[1, 5, 9, 12], [1, 7, 7]]), rm_before)   # nor the reward model
    assert not torch.equal(run.base_model.head.weight, rm.model.head.weight)      # the critic trained


def test_a_reward_model_on_another_base_is_a_separate_model(tmp_path, prompts, tiny_dir, tiny_model, capsys):
    from transformers import Qwen3Config, Qwen3ForSequenceClassification
    model, tok = tiny_model
    torch.manual_seed(1)
    clf = Qwen3ForSequenceClassification(Qwen3Config(**{**model.config.to_dict(), "num_labels": 1,
                                                        "architectures": None}))
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    out = train_ppo.main(args_for(tmp_path, prompts, tiny_dir, "--reward_model", str(tmp_path / "clf"),
                                  "--reward_model_weight", "0.5", "--max_steps", "1"))
    assert "a separate model (another base); the critic starts fresh" in capsys.readouterr().out
    logged = rows(out + "_metrics.jsonl")[0]
    assert logged["reward"] == pytest.approx(logged["rewards/accuracy"] + 0.5 * logged["rewards/reward_model"], abs=1e-5)


def test_early_stop_on_approx_kl(tmp_path, prompts, tiny_dir):
    out = train_ppo.main(args_for(tmp_path, prompts, tiny_dir, "--max_steps", "2", "--learning_rate", "5e-2",
                                  "--ppo_update_iters", "3", "--mini_batch_size", "4", "--early_stop_kl", "1e-7",
                                  "--reward_funcs", "tests.helpers.toy_rewards:char_count"))
    # 3 passes x 2 mini-batches were allowed; the first update moves the policy past 1e-7
    assert [r["ppo_updates"] for r in rows(out + "_metrics.jsonl")] == [1, 1]


@pytest.mark.slow
def test_torchrun_two_processes_then_one(tmp_path, prompts, tiny_dir, capsys):
    args = ["--data_path", prompts, "--from_weight", os.path.join(tiny_dir, "full_sft_32"), *TINY,
            "--reward_funcs", "tests.helpers.toy_rewards:char_count", "--mini_batch_size", "4", "--max_steps", "2",
            "--device", "cpu", "--log_interval", "1", "--early_stop_kl", "10", "--save_dir", str(tmp_path / "out"),
            "--checkpoint_dir", str(tmp_path / "ck")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "train_ppo.py", *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "weights identical on all 2 processes" in proc.stdout
    assert [r["step"] for r in rows(tmp_path / "out" / "ppo_actor_32_metrics.jsonl")] == [1, 2]
    assert os.path.isfile(tmp_path / "out" / "ppo_critic_32" / HEAD_FILE)
    train_ppo.main(train_ppo.parse_args(args + ["--from_resume", "1", "--max_steps", "5"]))   # one process resumes
    assert "world size 2 -> 1: step 2 -> 4" in capsys.readouterr().out
    assert [r["step"] for r in rows(tmp_path / "out" / "ppo_actor_32_metrics.jsonl")] == [1, 2, 5]


def test_bad_input_stops_before_training(tmp_path, prompts, tiny_dir, cli):
    for extra, message in [(["--use_lora", "0"], "--use_lora 0: PPO keeps policy, critic and reference"),
                           (["--clip_epsilon", "1.5"], "--clip_epsilon must be in"),
                           (["--gamma", "2"], "--gamma and --lam must be in"),
                           (["--critic_learning_rate", "-1"], "--critic_learning_rate must be positive"),
                           (["--mini_batch_size", "3"], "--mini_batch_size must divide the 8 samples"),
                           (["--reward_model", str(tmp_path / "none")], "no such folder"),
                           (["--reward_funcs", ""], "no reward"),
                           (["--reward_funcs", "nosuch:fn"], "nosuch")]:
        with pytest.raises(UserError, match=message):
            train_ppo.main(args_for(tmp_path, prompts, tiny_dir, *extra))
    assert not (tmp_path / "out").exists()
    code, _, err = cli("train_ppo.py", "--kl_coef", "-1", "--device", "cpu")
    assert code == 2 and err.strip().splitlines()[-1] == "error: --kl_coef must be 0 or positive (got -1.0)"
