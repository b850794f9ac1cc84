"""The flags of the RL scripts (PPO, GPO, GRPO) and their checks: sampling, rewards, the policy
update of the group scripts, PPO's own. Each group of flags has its ``*_problems(args)``, which
a script passes to core.errors.check_args.
"""
from __future__ import annotations

import argparse
import os

from core.errors import UserError
from losses.policy import AGGREGATION_TYPES, CISPO_EPSILON_HIGH, IS_LEVELS, LOSS_TYPES
from losses.ppo import KL_ESTIMATORS
from model.reward_model import check_reward_folder
from rl.rewards import RewardFunctions, parse_reward_args
from training.args import add_common_args
from training.checkpoint import OLD_LOSS_AGG  # --loss_agg, the old spelling of --loss_type

SGLANG_FLAGS = ("sglang_base_url", "sglang_model_path", "sglang_shared_path")   # MiniMind's, refused


def add_rl_args(parser: argparse.ArgumentParser, *, save_weight: str, epochs: int, learning_rate: float,
                real_micro_batch: int, num_generations: int, reward_funcs: str) -> None:
    """The flags every RL script shares, with the defaults they share: add_common_args's (the demo's
    RL prompts, a save every 50 steps, a real model's learning rate 5e-5), sampling (responses of up
    to 48 tokens) and rewards."""
    add_common_args(parser, save_weight=save_weight, data_path="dataset/rl.jsonl", epochs=epochs,
                    learning_rate=learning_rate, real_learning_rate=5e-5, save_interval=50,
                    real_micro_batch=real_micro_batch)
    add_rollout_args(parser, num_generations=num_generations, max_gen_len=48)
    add_reward_args(parser, reward_funcs=reward_funcs)


def add_rollout_args(parser: argparse.ArgumentParser, *, num_generations: int = 8, max_gen_len: int = 64,
                     temperature: float = 1.0) -> None:
    """Sampling flags of the RL scripts (see rl/rollout.py)."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--num_generations", type=int, default=num_generations,
                   help="responses sampled per prompt, G (default: %(default)s)")
    g.add_argument("--max_gen_len", type=int, default=max_gen_len, help="longest response in tokens (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=temperature,
                   help="sampling temperature, also applied to the training log-probs (default: %(default)s)")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling; 1: off (default: %(default)s)")
    g.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest tokens; 0: off (default: %(default)s)")
    g.add_argument("--merge_for_sampling", type=int, choices=[0, 1], default=1,
                   help="1: sample with the LoRA adapters folded into a temporary copy of the adapted weights "
                        "(faster; that copy is held while sampling) (default: %(default)s)")
    g.add_argument("--thinking_ratio", type=float, default=None,
                   help="share of prompts rendered with the chat template's thinking switch on (enable_thinking, "
                        "MiniMind's open_thinking), the rest with it off; drawn once per prompt from --seed. Does "
                        "nothing with a template that has no such switch (default: the template's own default)")
    g.add_argument("--rollout_engine", choices=["torch", "sglang"], default="torch",
                   help="torch: sampling runs on the model's own forward in this process; sglang (MiniMind's "
                        "server engine) is not supported (default: %(default)s)")
    for name in SGLANG_FLAGS:
        g.add_argument(f"--{name}", default=None, help="MiniMind's SGLang engine: not supported (refused)")


def add_reward_args(parser: argparse.ArgumentParser, *, reward_funcs: str = "accuracy") -> None:
    """Reward flags of the RL scripts (see rl/rewards.py)."""
    g = parser.add_argument_group("rewards")
    g.add_argument("--reward_model", "--reward_model_path", dest="reward_model", default=None,
                   help="a train_reward.py folder or a transformers sequence-classification model folder "
                        "(--reward_model_path: MiniMind's name for it)")
    g.add_argument("--trust_remote_code", type=int, choices=[0, 1], default=0,
                   help="1: a --reward_model folder that ships its own model code (config.json auto_map, .py "
                        "files) may run it; only for folders you trust (default: 0, such a folder is refused)")
    g.add_argument("--reward_funcs", default=reward_funcs,
                   help="comma-separated: accuracy, format, length, repetition, or module:function "
                        "(default: %(default)s; '' for none)")
    g.add_argument("--reward_weights", default=None,
                   help="comma-separated weights, one per --reward_funcs entry (default: all 1)")
    g.add_argument("--reward_model_weight", type=float, default=1.0,
                   help="weight of the --reward_model score in the sum (default: %(default)s)")
    g.add_argument("--reward_clip", type=float, default=0.0,
                   help="clip the weighted reward to [-c, c]; 0: off (default: %(default)s)")


def rollout_problems(args) -> list[str]:
    """What is wrong with the sampling flags, as messages (empty when nothing is)."""
    problems = []
    if args.rollout_engine != "torch":
        problems.append(f"--rollout_engine {args.rollout_engine}: not supported here; sampling runs on the model's "
                        f"own forward in this process: use --rollout_engine torch (the default)")
    given = [f"--{name}" for name in SGLANG_FLAGS if getattr(args, name) is not None]
    if given:
        problems.append(f"{', '.join(given)}: MiniMind's SGLang engine is not supported here; drop the --sglang_* "
                        f"flags (sampling uses --rollout_engine torch)")
    if args.thinking_ratio is not None and not 0 <= args.thinking_ratio <= 1:
        problems.append(f"--thinking_ratio must be in [0, 1] (got {args.thinking_ratio})")
    if args.num_generations < 1:
        problems.append(f"--num_generations must be at least 1 (got {args.num_generations})")
    if args.max_gen_len < 1:
        problems.append(f"--max_gen_len must be at least 1 (got {args.max_gen_len})")
    if not args.temperature > 0:
        problems.append(f"--temperature must be positive (got {args.temperature})")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top_p must be in (0, 1] (got {args.top_p})")
    if args.top_k < 0:
        problems.append(f"--top_k must be 0 (off) or positive (got {args.top_k})")
    if args.reward_clip < 0:
        problems.append(f"--reward_clip must be 0 (off) or positive (got {args.reward_clip})")
    return problems


def reward_problems(args) -> list[str]:
    """What is wrong with the reward flags given: weights that are not numbers or do not match the
    functions, a function that cannot be imported, a --reward_model that is no usable folder."""
    problems = []
    try:
        specs, weights = parse_reward_args(args.reward_funcs, args.reward_weights)
        if specs or weights is not None:          # imports each function, matches the weights to them
            RewardFunctions(specs, weights)
    except UserError as e:
        problems.append(str(e))
    if args.reward_model:
        try:
            check_reward_folder(args.reward_model, bool(args.trust_remote_code))
        except UserError as e:
            problems.append(str(e))
    return problems


def external_reward_problems(args) -> list[str]:
    """reward_problems when an external reward is given (--reward_funcs, --reward_model); GRPO
    has its own, and ignores the other reward flags without one."""
    return reward_problems(args) if args.reward_funcs or args.reward_model else []


def required_reward_problems(args) -> list[str]:
    """PPO and GPO learn from a reward: no --reward_funcs and no --reward_model is a problem."""
    specs, _ = parse_reward_args(args.reward_funcs, None)
    return [] if specs or args.reward_model else ["no reward: give --reward_funcs and/or --reward_model"]


def add_mini_batch_arg(group) -> None:
    group.add_argument("--mini_batch_size", type=int, default=0,
                       help="samples per optimizer update within a rollout batch; 0: all of them (default: 0)")


def add_debug_args(group) -> None:
    group.add_argument("--debug_mode", action="store_true",
                       help="print prompts, samples and rewards every --debug_interval steps")
    group.add_argument("--debug_interval", type=int, default=20,
                       help="steps between --debug_mode prints (default: %(default)s)")


def add_loss_type_arg(group, choices, default: str, what: str) -> None:
    """--loss_type, and --loss_agg token_mean|seq_mean, its old spelling of dapo|grpo (it sets --loss_type)."""
    group.add_argument("--loss_type", choices=choices, default=default, help=f"{what} (default: %(default)s)")

    def old_spelling(value: str) -> str:
        if value not in OLD_LOSS_AGG:
            raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from token_mean, seq_mean)")
        return OLD_LOSS_AGG[value]
    group.add_argument("--loss_agg", dest="loss_type", type=old_spelling, metavar="{token_mean,seq_mean}",
                       help="the old spelling of --loss_type: token_mean is dapo, seq_mean is grpo")


def add_group_args(parser, *, beta: float, loss_type: str = "dapo", ppo_epochs: int = 1) -> None:
    """The policy-update flags GPO and GRPO share."""
    g = parser.add_argument_group("policy update")
    g.add_argument("--epsilon", type=float, default=0.2, help="PPO clip range below 1 (default: %(default)s)")
    g.add_argument("--epsilon_high", type=float, default=None,
                   help="clip range above 1; larger values, e.g. 0.28, are DAPO's clip-higher; under cispo the cap "
                        f"of the ratio (default: --epsilon, {CISPO_EPSILON_HIGH} under cispo)")
    g.add_argument("--beta", type=float, default=beta, help="weight of the k3 KL to the reference; 0: no reference "
                   "forward (default: %(default)s)")
    add_loss_type_arg(g, LOSS_TYPES, loss_type,
                      "dapo: token sum / tokens of the whole optimizer step (DAPO; what token_mean means); "
                      "grpo: each response's token mean, then mean over responses (DeepSeekMath); bnpo: token mean "
                      "of each micro-batch; dr_grpo: token sum / (responses x --max_gen_len) (Dr. GRPO); cispo: the "
                      "ratio capped at --epsilon_high and detached weights the log-prob, aggregated as dapo "
                      "(MiniMax-M1, MiniMind); seed_sum: the chapter's -sum_i A_i log pi(y_i|x) per group, mean over "
                      "groups")
    g.add_argument("--importance_sampling_level", choices=IS_LEVELS, default="token",
                   help="token: one ratio per token; sequence: GSPO's exp(mean over the response of log r), clipped "
                        "per response (default: %(default)s)")
    g.add_argument("--mask_truncated", type=int, choices=[0, 1], default=0,
                   help="1: responses that reach --max_gen_len without an end token count nowhere in the loss "
                        "(still logged) (default: 0)")
    g.add_argument("--overlong_penalty", type=int, default=0,
                   help="L > 0: DAPO's soft overlong penalty, added to the reward, falling from 0 to -1 over the "
                        "last L tokens before --max_gen_len (default: 0, off)")
    g.add_argument("--drop_zero_std", type=int, choices=[0, 1], default=0,
                   help="1: groups whose rewards are all equal count nowhere in the loss or its token count "
                        "(logged as groups_used) (default: 0)")
    g.add_argument("--ppo_epochs", type=int, default=ppo_epochs,
                   help="passes over each rollout batch; old log-probs are the sampling-time ones (default: %(default)s)")
    add_mini_batch_arg(g)
    add_debug_args(g)


def epsilon_high_of(args) -> float:
    """--epsilon_high as given, else 5.0 under cispo (MiniMind's cap) and --epsilon otherwise."""
    if args.epsilon_high is not None:
        return args.epsilon_high
    return CISPO_EPSILON_HIGH if args.loss_type == "cispo" else args.epsilon


def group_problems(args) -> list[str]:
    """What is wrong with the policy-update flags of GPO and GRPO (add_group_args)."""
    problems = []
    if args.num_generations < 2:
        problems.append(f"--num_generations must be at least 2 for group advantages (got {args.num_generations})")
    if not 0 < args.epsilon < 1 or (args.epsilon_high is not None and args.epsilon_high <= 0):
        problems.append("--epsilon must be in (0, 1) and --epsilon_high positive")
    if args.loss_type != "cispo" and args.epsilon_high is not None and args.epsilon_high >= 2:
        problems.append(f"--epsilon_high {args.epsilon_high} under --loss_type {args.loss_type} is the clip range above "
                        f"1 (ratios clipped to [{1 - args.epsilon:g}, {1 + args.epsilon_high:g}], hardly a clip); "
                        f"MiniMind's 5.0 is CISPO's cap of the ratio: add --loss_type cispo, or give a clip range "
                        f"such as DAPO's 0.28")
    if args.beta < 0:
        problems.append(f"--beta must be 0 or positive (got {args.beta})")
    if args.ppo_epochs < 1:
        problems.append(f"--ppo_epochs must be at least 1 (got {args.ppo_epochs})")
    if not 0 <= args.overlong_penalty <= args.max_gen_len:
        problems.append(f"--overlong_penalty must be 0 (off) or a length in tokens up to --max_gen_len "
                        f"{args.max_gen_len} (got {args.overlong_penalty})")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if getattr(args, "adv_level", "sample") == "group" and args.batch_size * world < 2:
        problems.append(f"--adv_level group z-scores each prompt's mean reward across the prompts of a step, and a "
                        f"step holds {args.batch_size * world}; raise --batch_size (or use --adv_level sample)")
    return problems


def update_problems(args) -> list[str]:
    """What is wrong with how a step's samples are cut and printed (--mini_batch_size,
    --accumulation_steps, --debug_interval), and with the room --max_seq_len leaves for a prompt."""
    problems = []
    n = args.batch_size * args.num_generations
    if args.mini_batch_size < 0 or args.mini_batch_size > n or (args.mini_batch_size and n % args.mini_batch_size):
        problems.append(f"--mini_batch_size must divide the {n} samples of a step (--batch_size x --num_generations), "
                        f"or be 0 (got {args.mini_batch_size})")
    mb = args.mini_batch_size or n
    if args.accumulation_steps is not None and args.accumulation_steps >= 1 and mb % args.accumulation_steps:
        problems.append(f"--accumulation_steps {args.accumulation_steps} must divide the {mb} samples of a mini-batch")
    if args.debug_interval < 1:
        problems.append("--debug_interval must be at least 1")
    if args.max_seq_len - args.max_gen_len < 1:
        problems.append(f"--max_seq_len {args.max_seq_len} leaves no room for a prompt beside --max_gen_len "
                        f"{args.max_gen_len}: here it counts prompt + response (MiniMind's counts the prompt alone); "
                        f"give --max_seq_len {args.max_seq_len + args.max_gen_len} for MiniMind's meaning")
    return problems


def add_ppo_args(parser) -> None:
    """PPO's own flags (MiniMind's names where it has them)."""
    g = parser.add_argument_group("PPO")
    g.add_argument("--clip_epsilon", type=float, default=0.2, help="policy ratio clip range (default: %(default)s)")
    add_loss_type_arg(g, AGGREGATION_TYPES, "dapo",
                      "how the policy loss's per-token terms add up, the aggregations of train_gpo.py: dapo (token "
                      "sum / tokens of the whole optimizer step), grpo (per-response token mean, then mean), bnpo "
                      "(token mean of each micro-batch), dr_grpo (token sum / (responses x --max_gen_len)); cispo "
                      "and seed_sum are for the group scripts only")
    g.add_argument("--vf_coef", type=float, default=0.5, help="weight of the value loss (default: %(default)s)")
    g.add_argument("--kl_coef", type=float, default=0.02,
                   help="per-token KL penalty to the reference, in the reward (default: %(default)s; 0: no reference forward)")
    g.add_argument("--kl_estimator", choices=KL_ESTIMATORS, default="k1",
                   help="k1: logp - ref; k3: exp(ref - logp) - (ref - logp) - 1, never negative (default: %(default)s)")
    g.add_argument("--gamma", type=float, default=1.0, help="discount over response tokens (default: %(default)s)")
    g.add_argument("--lam", type=float, default=0.95, help="GAE lambda (default: %(default)s)")
    g.add_argument("--cliprange_value", type=float, default=0.2,
                   help="clip of the new values around the rollout's; 0: no value clipping (default: %(default)s)")
    g.add_argument("--ppo_update_iters", type=int, default=2,
                   help="passes over each rollout batch (default: %(default)s)")
    add_mini_batch_arg(g)
    g.add_argument("--early_stop_kl", type=float, default=0.0,
                   help="stop a rollout batch's updates once approx_kl passes this; 0: never (default: 0)")
    g.add_argument("--critic_learning_rate", type=float, default=None,
                   help="peak learning rate of the critic (default: --learning_rate)")
    g.add_argument("--missing_eos_penalty", type=float, default=0.0,
                   help="subtracted from the score of a response that never ends (default: 0, off)")
    g.add_argument("--debug_log_ratio", action="store_true",
                   help="print the log-ratio of the first mini-batch of each step's first pass (MiniMind's check "
                        "that the ratio starts at 1; here it is exactly 1 by construction)")
    add_debug_args(g)


def ppo_problems(args) -> list[str]:
    """What is wrong with PPO's own flags (add_ppo_args)."""
    problems = []
    if not 0 < args.clip_epsilon < 1:
        problems.append(f"--clip_epsilon must be in (0, 1) (got {args.clip_epsilon})")
    if args.vf_coef <= 0:
        problems.append(f"--vf_coef must be positive (got {args.vf_coef})")
    for name in ("kl_coef", "cliprange_value", "early_stop_kl", "missing_eos_penalty"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must be 0 or positive (got {getattr(args, name)})")
    if not 0 <= args.gamma <= 1 or not 0 <= args.lam <= 1:
        problems.append(f"--gamma and --lam must be in [0, 1] (got {args.gamma}, {args.lam})")
    if args.ppo_update_iters < 1:
        problems.append(f"--ppo_update_iters must be at least 1 (got {args.ppo_update_iters})")
    if args.critic_learning_rate is not None and args.critic_learning_rate <= 0:
        problems.append(f"--critic_learning_rate must be positive (got {args.critic_learning_rate})")
    if not args.use_lora:
        problems.append("--use_lora 0: PPO keeps policy, critic and reference on one copy of the base weights as "
                        "LoRA adapters; train with --use_lora 1")
    return problems
