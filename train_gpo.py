"""GPO: PPO with a group-level advantage, a reward (functions and/or a reward model) and KL.

    python train_gpo.py                                   # the demo's RL prompts, accuracy reward, shipped SFT start
    python train_gpo.py --reward_model out/reward_192 --reward_funcs ''   # a reward model trained by train_reward.py
    torchrun --nproc_per_node 8 train_gpo.py ...           # DDP, the same flags

For each prompt, G responses are sampled and scored; each response's advantage is its
reward minus its group's mean (``--baseline loo``: minus the mean of the other G-1), divided
by the group's reward std (``--scale_rewards``), and shared by all its tokens. The loss is the
PPO-clip loss with that advantage plus beta * k3 KL to the frozen reference (the SFT weights
with the LoRA adapters off). This is what the literature calls GRPO (DeepSeekMath) or, with
``--baseline loo --scale_rewards none``, RLOO. ``--adv_level group`` is the chapter's literal
A_g: each group's mean reward, z-scored across the groups of the batch, for all its responses.
``--loss_type`` picks how the per-token losses add up (dapo, the default: a token mean over the
whole optimizer step; grpo, bnpo, dr_grpo, cispo, seed_sum; see losses.policy.policy_loss), and
``--importance_sampling_level sequence`` is GSPO's per-response ratio.

One step = one batch of --batch_size prompts per process: sampling, scoring, then
--ppo_epochs passes over its samples in mini-batches of --mini_batch_size, one optimizer
update each (the ratio's old log-probs are the sampling-time ones).
"""
from __future__ import annotations

import argparse

from core.errors import check_args, run_cli
from dataset.formats import load_prompts
from rl.args import (add_group_args, add_rl_args, group_problems, required_reward_problems, reward_problems,
                     rollout_problems, update_problems)
from rl.group import GroupSettings, make_group_step
from rl.rewards import check_answers, rewards_from_args
from rl.start import start_rl_run
from training.args import common_problems
from training.loop import Job, adamw_updater


def arg_parser() -> argparse.ArgumentParser:
    """The script's flags (docs/flags.md is made from them)."""
    parser = argparse.ArgumentParser(description="GPO: group-advantage PPO with a reward and KL to a frozen reference.")
    add_rl_args(parser, save_weight="gpo", epochs=2, learning_rate=2e-3, real_micro_batch=64, num_generations=8,
                reward_funcs="accuracy")
    add_group_args(parser, beta=0.02)
    g = parser.add_argument_group("GPO")
    g.add_argument("--baseline", choices=["mean", "loo"], default="mean",
                   help="subtracted from each reward: the group mean, or the mean of the other samples (default: %(default)s)")
    g.add_argument("--scale_rewards", choices=["group", "batch", "none"], default="group",
                   help="divide advantages by the group's reward std, the batch's, or nothing (default: %(default)s)")
    g.add_argument("--adv_level", choices=["sample", "group"], default="sample",
                   help="sample: one advantage per response; group: the seed's A_g per group (default: %(default)s)")
    return parser


def parse_args(argv=None):
    return arg_parser().parse_args(argv)


def build(args) -> Job:
    """Everything up to the first step: checks, prompts, rewards, model, sampler (see training.loop.Job)."""
    # bad flags and bad data stop the run before any model is built
    check_args(args, common_problems, rollout_problems, group_problems, update_problems, reward_problems,
               required_reward_problems)
    prompts = load_prompts(args.data_path)
    rewards = rewards_from_args(args, device=args.device)
    check_answers(args.reward_funcs, prompts, args.data_path)
    run, source, start = start_rl_run(args, "gpo", prompts, group=args.num_generations)
    updater = adamw_updater(run)
    settings = GroupSettings.from_args(args, baseline=args.baseline, scale=args.scale_rewards, level=args.adv_level)
    step = make_group_step(run, source, updater, rewards.score_rollout, settings)
    return Job(run, source.order, updater, step, "gpo", {"reward_funcs": args.reward_funcs}, start)


def main(args):
    return build(args)()


if __name__ == "__main__":
    run_cli(main, parse_args)
