"""Supervised fine-tuning: the demo's SFT weights, and LoRA adapters such as lora_identity.

    python train_sft.py                       # the shipped demo SFT model (out/full_sft_128/)
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

import torch

from dataset.batches import collate_sft
from dataset.encoding import SFTDataset
from dataset.formats import load_sft
from utils.args import add_common_args
from core.errors import run_cli
from model.logprobs import token_logprobs
from core.runtime import print0, to_device
from utils.train import DataOrder, Run, train, validate_common_args

DEMO_HIDDEN_SIZE, DEMO_LAYERS = 192, 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Supervised fine-tuning (full or LoRA).")
    add_common_args(parser, save_weight="full_sft", data_path="dataset/sft.jsonl", epochs=8, batch_size=32,
                    learning_rate=2e-3, max_seq_len=128, from_weight="none", log_interval=50, save_interval=500,
                    use_lora=0)
    # From scratch, the demo's size; a given checkpoint keeps its own.
    parser.set_defaults(hidden_size=None, num_hidden_layers=None)
    args = parser.parse_args(argv)
    if args.from_weight == "none":
        args.hidden_size = args.hidden_size or DEMO_HIDDEN_SIZE
        args.num_hidden_layers = args.num_hidden_layers or DEMO_LAYERS
    return args


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over the loss_mask tokens of the batch.

    logits (B, T, V), input_ids (B, T), loss_mask (B, T) with 1 on tokens to predict.
    """
    logps = token_logprobs(logits, input_ids)                # (B, T-1)
    mask = loss_mask[:, 1:].to(logps.dtype)
    return -(logps * mask).sum() / mask.sum().clamp(min=1)


def main(args):
    validate_common_args(args)                # bad flags and bad data stop the run before any model is built
    conversations = load_sft(args.data_path)
    run = Run(args, "sft")
    data = SFTDataset(conversations, run.tokenizer, args.max_seq_len)
    if data.skipped:
        print0(f"skipped {data.skipped} conversation(s) whose last response does not fit --max_seq_len {args.max_seq_len}")
    order = DataOrder(len(data), args.batch_size, args.epochs, args.accumulation_steps, args.seed, run.dist,
                      what="conversations")
    pad_id = run.tokenizer.pad_token_id

    def micro_step(indices):
        batch = to_device(collate_sft([data[i] for i in indices], pad_id), run.device)
        with run.autocast():
            logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = sft_loss(logits, batch["input_ids"], batch["loss_mask"])
        return loss, {}, int(batch["attention_mask"].sum())

    return train(run, order, micro_step, desc="sft")


if __name__ == "__main__":
    run_cli(main, parse_args)
