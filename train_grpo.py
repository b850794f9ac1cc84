"""GRPO as the chapter writes it: reward-free, each sample rewarded by its own log-probability.

    python train_grpo.py                                  # the demo's RL prompts, shipped SFT start
    python train_grpo.py --logp_reduce sum --beta 0       # the chapter's literal loss, no KL
    python train_grpo.py --reward_funcs accuracy --self_reward_weight 0   # DeepSeekMath's GRPO
    torchrun --nproc_per_node 8 train_grpo.py ...          # DDP, the same flags

For G samples y_1..y_G of a prompt, r_i = log pi(y_i|x) at sampling time (no gradient; the
mean per token with ``--logp_reduce mean``, the sum with ``sum``), A_i = r_i - mean_j r_j
(``--scale_rewards group`` also divides by the group's std), and the loss is the chapter's
-E_x[sum_i A_i log pi(y_i|x)] in PPO-clip form, plus beta * k3 KL to the frozen reference.
At one update per rollout its gradient is exactly the chapter's.

What it does: it raises the probability of what the model already finds likely and lowers the
rest, i.e. it sharpens the model's distribution towards its own preferences (self-confidence
training, like entropy minimisation). Without a reference to hold it, that collapses into short
or repeated text ("No Free Lunch", arXiv 2506.17219), so the KL term is on by default and
entropy, length and repetition are logged. ``--reward_funcs`` / ``--reward_model`` add an
external reward, weighted against the self-reward by ``--self_reward_weight``. ``--loss_type
seed_sum`` (the default) is the chapter's sum; the other loss types of train_gpo.py apply too.
"""
from __future__ import annotations

import argparse

from core.errors import check_args, run_cli
from core.runtime import print0
from dataset.formats import load_prompts
from model.logprobs import masked_reduce
from rl.args import (add_group_args, add_rl_args, external_reward_problems, group_problems, rollout_problems,
                     update_problems)
from rl.group import GroupSettings, make_group_step
from rl.rewards import rewards_from_args
from rl.start import start_rl_run
from training.args import common_problems
from training.loop import Job, adamw_updater


def arg_parser() -> argparse.ArgumentParser:
    """The script's flags (docs/flags.md is made from them)."""
    parser = argparse.ArgumentParser(description="The chapter's reward-free GRPO: group-relative self log-probability.")
    add_rl_args(parser, save_weight="grpo", epochs=1, learning_rate=1e-3, real_micro_batch=64, num_generations=8,
                reward_funcs="")
    add_group_args(parser, beta=0.1, loss_type="seed_sum")
    g = parser.add_argument_group("GRPO")
    g.add_argument("--logp_reduce", choices=["mean", "sum"], default="mean",
                   help="the self-reward and log pi(y|x): mean per token, or sum (the chapter's literal form) "
                        "(default: %(default)s)")
    g.add_argument("--scale_rewards", choices=["group", "none"], default="none",
                   help="none: A_i = r_i - group mean (the chapter); group: also divided by the group std (default: %(default)s)")
    g.add_argument("--self_reward_weight", type=float, default=1.0,
                   help="weight of the log-prob self-reward when an external reward is added (default: %(default)s)")
    return parser


def parse_args(argv=None):
    return arg_parser().parse_args(argv)


def method_line(self_reward_weight: float) -> str:
    """What a run with an external reward does, and how to get MiniMind's train_grpo.py."""
    if self_reward_weight == 0:
        return ("train_grpo.py with --self_reward_weight 0: the external reward alone with group advantages, "
                "MiniMind's (and DeepSeekMath's) GRPO; train_gpo.py is the same method with more options")
    return (f"train_grpo.py: the chapter's reward-free GRPO (each sample rewarded by its own log-prob, weight "
            f"{self_reward_weight:g}) plus the external reward; for MiniMind's train_grpo.py (the reward alone, group "
            f"advantages, CISPO) run train_gpo.py --loss_type cispo, or add --self_reward_weight 0 here")


def grpo_problems(args) -> list[str]:
    """What is wrong with GRPO's own flags."""
    if args.self_reward_weight == 0 and not (args.reward_funcs or args.reward_model):
        return ["--self_reward_weight 0 with no --reward_funcs or --reward_model leaves no reward"]
    return []


def build(args) -> Job:
    """Everything up to the first step: checks, prompts, rewards, model, sampler (see training.loop.Job)."""
    # bad flags and bad data stop the run before any model is built
    check_args(args, common_problems, rollout_problems, group_problems, update_problems, external_reward_problems,
               grpo_problems)
    prompts = load_prompts(args.data_path)
    external = rewards_from_args(args, device=args.device) if (args.reward_funcs or args.reward_model) else None
    if external is not None:
        print0(method_line(args.self_reward_weight))
    run, source, start = start_rl_run(args, "grpo", prompts, group=args.num_generations)
    updater = adamw_updater(run)

    def score(rows, rollout):
        # The sample's own log-prob at sampling time, as the sampling forward computed it: a
        # number, never a gradient path.
        self_reward = masked_reduce(rollout.sampled_logps, rollout.response_mask[:, 1:], args.logp_reduce).float().cpu()
        parts = {"logp": self_reward}
        total = args.self_reward_weight * self_reward
        if external is not None:
            extra, extra_parts = external.score_rollout(rows, rollout)
            total, parts = total + extra, {**parts, **extra_parts}
        return total, parts

    # seed_sum: sum over a group's samples, mean over prompts, the chapter's -E_x[sum_i A_i log pi(y_i|x)],
    # with log pi(y|x) reduced over tokens as --logp_reduce says.
    settings = GroupSettings.from_args(args, baseline="mean", scale=args.scale_rewards, level="sample",
                                       seq_reduce=args.logp_reduce)
    step = make_group_step(run, source, updater, score, settings)
    return Job(run, source.order, updater, step, "grpo", {"logp_reduce": args.logp_reduce}, start)


def main(args):
    return build(args)()


if __name__ == "__main__":
    run_cli(main, parse_args)
