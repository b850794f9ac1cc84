"""Supervised fine-tuning: the demo's SFT weights, and LoRA adapters such as lora_identity.

    python train_sft.py                       # the shipped demo SFT model (out/full_sft_192/)
    python train_sft.py --save_dir model/demo # ... rebuilt in place of the shipped one
    python train_sft.py --use_lora 1 --from_weight full_sft --data_path dataset/identity.jsonl \
        --save_weight lora_identity --epochs 3 --learning_rate 2e-3
    torchrun --nproc_per_node 2 train_sft.py ...

Cross-entropy on assistant tokens only (each response and its end-of-turn token); the prompt
is context. With the defaults it trains a small model from scratch on the demo's noisy
demonstrations, which is what makes the shipped SFT model imperfect on purpose.
"""
from __future__ import annotations

import argparse

from core.errors import check_args, run_cli
from core.runtime import print0, to_device
from dataset.batches import collate_sft
from dataset.encoding import encode_conversations
from dataset.formats import load_sft
from losses.sft import sft_loss
from training.args import add_common_args, common_problems
from training.loop import Job, data_order, supervised_job
from training.run import Run

DEMO_HIDDEN_SIZE, DEMO_LAYERS = 192, 4


def arg_parser() -> argparse.ArgumentParser:
    """The script's flags (docs/flags.md is made from them)."""
    parser = argparse.ArgumentParser(description="Supervised fine-tuning (full or LoRA).")
    add_common_args(parser, save_weight="full_sft", data_path="dataset/sft.jsonl", epochs=8, batch_size=32,
                    learning_rate=2e-3, max_seq_len=128, from_weight="none", log_interval=50, save_interval=500,
                    use_lora=0)
    # From scratch, the demo's size; a given checkpoint keeps its own.
    parser.set_defaults(hidden_size=None, num_hidden_layers=None)
    return parser


def parse_args(argv=None):
    args = arg_parser().parse_args(argv)
    if args.from_weight == "none":
        args.hidden_size = args.hidden_size or DEMO_HIDDEN_SIZE
        args.num_hidden_layers = args.num_hidden_layers or DEMO_LAYERS
    return args


def build(args) -> Job:
    """Everything up to the first step: checks, data, model (see training.loop.Job)."""
    check_args(args, common_problems)         # bad flags and bad data stop the run before any model is built
    conversations = load_sft(args.data_path)
    run = Run(args, "sft")
    items, skipped = encode_conversations(conversations, run.tokenizer, args.max_seq_len)
    if skipped:
        print0(f"skipped {skipped} conversation(s) whose last response does not fit --max_seq_len {args.max_seq_len}")
    order = data_order(run, len(items), "conversations")
    pad_id = run.tokenizer.pad_token_id

    def micro_step(indices):
        batch = to_device(collate_sft([items[i] for i in indices], pad_id), run.device)
        with run.autocast():
            logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, metrics = sft_loss(logits, batch["input_ids"], batch["loss_mask"])
        return loss, metrics, int(batch["attention_mask"].sum())

    return supervised_job(run, order, micro_step, "sft")


def main(args):
    return build(args)()


if __name__ == "__main__":
    run_cli(main, parse_args)
