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
whole optimizer step; grpo, bnpo, dr_grpo, cispo, seed_sum; see utils.rl.policy_loss), and
``--importance_sampling_level sequence`` is GSPO's per-response ratio.

One step = one batch of --batch_size prompts per process: sampling, scoring, then
--ppo_epochs passes over its samples in mini-batches of --mini_batch_size, one optimizer
update each (the ratio's old log-probs are the sampling-time ones).
"""
from __future__ import annotations

import argparse

from dataset.formats import load_prompts
from utils.args import add_common_args, add_reward_args, add_rollout_args
from core.errors import run_cli
from utils.rewards import check_answers, rewards_from_args
from utils.rl import add_group_args, check_rl_args, make_group_step, reward_samples, start_group_run
from utils.train import Job


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="GPO: group-advantage PPO with a reward and KL to a frozen reference.")
    add_common_args(parser, save_weight="gpo", data_path="dataset/rl.jsonl", epochs=2, batch_size=16,
                    learning_rate=2e-3, real_learning_rate=5e-5, max_seq_len=256, from_weight="full_sft",
                    log_interval=10, save_interval=50, use_lora=1,
                    real_micro_batch=64)
    add_rollout_args(parser, num_generations=8, max_gen_len=48)
    add_reward_args(parser, reward_funcs="accuracy")
    add_group_args(parser, beta=0.02)
    g = parser.add_argument_group("GPO")
    g.add_argument("--baseline", choices=["mean", "loo"], default="mean",
                   help="subtracted from each reward: the group mean, or the mean of the other samples (default: %(default)s)")
    g.add_argument("--scale_rewards", choices=["group", "batch", "none"], default="group",
                   help="divide advantages by the group's reward std, the batch's, or nothing (default: %(default)s)")
    g.add_argument("--adv_level", choices=["sample", "group"], default="sample",
                   help="sample: one advantage per response; group: the seed's A_g per group (default: %(default)s)")
    return parser.parse_args(argv)


def build(args) -> Job:
    """Everything up to the first step: checks, prompts, rewards, model, sampler (see utils.train.Job)."""
    check_rl_args(args)                       # bad flags and bad data stop the run before any model is built
    prompts = load_prompts(args.data_path)
    rewards = rewards_from_args(args, device=args.device)
    check_answers(args.reward_funcs, prompts, args.data_path)
    run, order, prompt_ids, engine, optimizer = start_group_run(args, "gpo", prompts)
    G = args.num_generations

    def score(rows, rollout):
        return reward_samples(rewards, rows, rollout.texts, G)

    step = make_group_step(run, order, prompts, prompt_ids, engine, optimizer, score, baseline=args.baseline, scale=args.scale_rewards, level=args.adv_level)
    return Job(run, order, optimizer, step, "gpo", {"reward_funcs": args.reward_funcs})


def main(args):
    return build(args)()


if __name__ == "__main__":
    run_cli(main, parse_args)
