"""PPO: a policy, a critic, a reward and a KL penalty to the frozen reference, on one copy of the base weights.

    python train_ppo.py                                        # the demo's RL prompts, accuracy reward, shipped SFT start
    python train_ppo.py --reward_model out/reward_192 --reward_funcs ''   # a reward model trained by train_reward.py
    torchrun --nproc_per_node 8 train_ppo.py ...                # DDP, the same flags

Each step samples --num_generations responses for each of --batch_size prompts per process and
scores them (reward functions and/or a reward model) at the last response token; every
response token also gets -kl_coef * KL to the reference. The critic's values give GAE
advantages (gamma, lambda), whitened over the batch's response tokens; then --ppo_update_iters
passes over mini-batches of the clipped policy loss plus vf_coef times the clipped value loss,
until approx_kl passes --early_stop_kl.

The base weights are loaded once. The policy is its "default" LoRA adapter, the critic a second
adapter ("critic") with a value head, the reference the base with every adapter off; a reward
model that train_reward.py trained on the same base runs as a third, frozen adapter, and the
critic starts as it. A reward model on another base (or a transformers sequence-classification
model) is loaded as a separate model. Saves the policy adapter to {save_dir}/ppo_actor_{hidden}/
and the critic (adapter + value_head.safetensors) to {save_dir}/ppo_critic_{hidden}/.
"""
from __future__ import annotations

import argparse

from core.errors import check_args, run_cli
from dataset.formats import load_prompts
from rl.args import (add_ppo_args, add_rl_args, ppo_problems, required_reward_problems, reward_problems,
                     rollout_problems, update_problems)
from rl.ppo import PPOSettings, actor_critic_builder, make_ppo_step, ppo_optimizers
from rl.rewards import check_answers, rewards_from_args
from rl.start import start_rl_run
from training.args import common_problems
from training.loop import Job, Updater


def arg_parser() -> argparse.ArgumentParser:
    """The script's flags (docs/flags.md is made from them)."""
    parser = argparse.ArgumentParser(description="PPO: policy and critic as LoRA adapters on one base, GAE, "
                                                 "KL penalty to the frozen reference.")
    add_rl_args(parser, save_weight="ppo_actor", epochs=1, learning_rate=3e-3, real_micro_batch=8, num_generations=4,
                reward_funcs="accuracy")
    add_ppo_args(parser)
    return parser


def parse_args(argv=None):
    return arg_parser().parse_args(argv)


def build(args) -> Job:
    """Everything up to the first step: checks, prompts, rewards, model with its critic, sampler
    (see training.loop.Job)."""
    # bad flags and bad data stop the run before any model is built
    check_args(args, common_problems, rollout_problems, ppo_problems, update_problems, reward_problems,
               required_reward_problems)
    prompts = load_prompts(args.data_path)
    check_answers(args.reward_funcs, prompts, args.data_path)
    shared_reward = {}
    run, source, start = start_rl_run(args, "ppo", prompts, wrap=actor_critic_builder(args, shared_reward))
    rewards = rewards_from_args(args, device=run.device, reward_model=shared_reward.get("model"))
    optimizers = ppo_optimizers(run.base_model, args.learning_rate, args.critic_learning_rate)
    updater = Updater(run, optimizers, args.learning_rate, args.grad_clip, args.accumulation_steps)
    step = make_ppo_step(run, source, updater, rewards.score_rollout, PPOSettings.from_args(args))
    return Job(run, source.order, updater, step, "ppo", {"reward_funcs": args.reward_funcs}, start)


def main(args):
    return build(args)()


if __name__ == "__main__":
    run_cli(main, parse_args)
