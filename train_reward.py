"""A Bradley-Terry reward model on preference pairs, for --reward_model of PPO / GPO / GRPO.

    python train_reward.py                                 # the shipped demo's pairs, from the shipped SFT model
    python train_reward.py --data_path dataset/dpo.jsonl --from_weight full_sft --epochs 3
    torchrun --nproc_per_node 8 train_reward.py ...        # DDP, the same flags

The model is the SFT model's transformer body with LoRA adapters plus a scalar head
(model/value_head.py); the reward of a response is the head's value at its last token (the
end-of-turn token). Loss: -log sigmoid(r(x, y+) - r(x, y-) [- margin]) [+ c (r+ + r-)^2].
Saves the adapter and value_head.safetensors to {save_dir}/{save_weight}_{hidden_size}/;
``eval_align.py --reward_model`` that folder reports its held-out pair accuracy.
"""
from __future__ import annotations

import argparse
import os

import torch

from core.errors import UserError, check_args, run_cli
from core.runtime import to_device
from dataset.batches import collate_pairs, pair_rows
from dataset.encoding import encode_pairs
from dataset.formats import load_pairs
from losses.preference import reward_model_loss
from model.logprobs import last_token_values
from model.value_head import reward_model_for_training
from training.args import add_common_args, common_problems
from training.evaluation import eval_kind
from training.loop import Job, data_order, supervised_job
from training.run import Run


def arg_parser() -> argparse.ArgumentParser:
    """The script's flags (docs/flags.md is made from them)."""
    parser = argparse.ArgumentParser(description="Bradley-Terry reward model on preference pairs (LoRA + scalar head).")
    add_common_args(parser, save_weight="reward", data_path="dataset/dpo.jsonl", epochs=2, learning_rate=1e-3,
                    real_learning_rate=1e-4, max_seq_len=1024)
    g = parser.add_argument_group("reward model")
    g.add_argument("--margin", type=int, choices=[0, 1], default=0,
                   help='1: subtract each pair\'s "margin" field from the reward gap (Llama 2\'s margin loss) (default: 0)')
    g.add_argument("--center_rewards", type=float, default=0.0,
                   help="coefficient of (r+ + r-)^2, which keeps rewards centred on 0 (e.g. 0.01; default: 0, off)")
    return parser


def parse_args(argv=None):
    return arg_parser().parse_args(argv)


def reward_model_problems(args) -> list[str]:
    """What is wrong with the reward model's own flags, and with evaluation flags it cannot take."""
    problems = [] if args.center_rewards >= 0 else [f"--center_rewards must be 0 (off) or positive (got {args.center_rewards})"]
    if args.eval_reward_model:
        problems.append("--eval_reward_model compares a language model's answers; a reward model has none")
    if args.eval_data and os.path.isfile(args.eval_data):
        try:
            prompts = eval_kind(args.eval_data) == "prompts"
        except UserError:                           # a bad file: common_problems says why
            prompts = False
        if prompts:
            problems.append(f"--eval_data {args.eval_data}: a reward model scores preference pairs, not prompts")
    return problems


def build(args) -> Job:
    """Everything up to the first step: checks, data, model (see training.loop.Job)."""
    check_args(args, common_problems, reward_model_problems)   # bad flags and bad data stop the run before any model is built
    pairs = load_pairs(args.data_path)
    if args.margin:
        missing = [i for i, p in enumerate(pairs) if "margin" not in p]
        if missing:
            raise UserError(f'{args.data_path}: --margin 1 needs a "margin" field on every pair; '
                            f"{len(missing)} pair(s) have none (the first is pair {missing[0] + 1})")
    run = Run(args, "reward", wrap=lambda lm, _: reward_model_for_training(lm, seed=args.seed))
    items, kept = encode_pairs(pairs, run.tokenizer, args.max_seq_len, args.data_path)
    margins = torch.tensor([p.get("margin", 0.0) for p in kept])
    order = data_order(run, len(items), "pairs")
    pad = run.tokenizer.pad_token_id

    def micro_step(indices):
        batch = to_device(collate_pairs([items[i] for i in indices], pad), run.device)
        with run.autocast():
            values = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])   # (2B, T)
        chosen, rejected = pair_rows(last_token_values(values, batch["attention_mask"]))           # (B,) each
        loss, metrics = reward_model_loss(chosen, rejected,
                                          margins[indices].to(run.device) if args.margin else None,
                                          args.center_rewards)
        return loss, metrics, int(batch["attention_mask"].sum())

    return supervised_job(run, order, micro_step, "reward", {"kind": "reward_model"})


def main(args):
    return build(args)()


if __name__ == "__main__":
    run_cli(main, parse_args)
