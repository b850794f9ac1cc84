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
import time

import torch

from dataset.data import SFTDataset, collate_sft, load_sft
from utils.args import add_common_args
from utils.errors import run_cli
from utils.logging import RunLogger
from utils.logprobs import masked_reduce, token_logprobs
from utils.runtime import autocast_context, print0
from utils.schedule import cosine_lr
from utils.train import DataOrder, Run, StopSignal, clip_and_step, validate_common_args

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
    # The schedule spans all epochs; --max_steps only stops early, so a run stopped there and
    # resumed later follows the same learning-rate curve as one that never stopped.
    total_steps = order.total_steps
    stop_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    optimizer = torch.optim.AdamW(run.trainable_parameters(), lr=args.learning_rate, weight_decay=0.0)
    state = run.resume_or_start(optimizer, order)
    logger = RunLogger(enabled=run.is_main, total_steps=stop_step, start_step=state.step,
                       log_interval=args.log_interval, metrics_path=run.metrics_path, use_wandb=args.use_wandb,
                       wandb_project=args.wandb_project, run_name=run.stem, config=vars(args),
                       wandb_id=state.wandb_id, desc="sft")
    state.wandb_id = logger.wandb_id
    stop = StopSignal()
    pad_id = run.tokenizer.pad_token_id
    tokens, t_last, loss_sum, n_micro = 0, time.time(), 0.0, 0
    try:
        stopped = False
        while state.step < stop_step:
            # Stop only between optimizer steps, and on every rank at the same one.
            if state.micro % args.accumulation_steps == 0 and run.any_rank(stop.received is not None):
                stopped = True
                break
            batch = collate_sft([data[i] for i in order.batch(state.micro)], pad_id)
            batch = {k: v.to(run.device) for k, v in batch.items()}
            with run.grad_sync(state.micro):
                with autocast_context(run.device, args.dtype):
                    logits = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = sft_loss(logits, batch["input_ids"], batch["loss_mask"])
                run.scaler.scale(loss / args.accumulation_steps).backward()
            loss_sum, n_micro = loss_sum + loss.item(), n_micro + 1
            tokens += int(batch["attention_mask"].sum())
            state.micro += 1
            if state.micro % args.accumulation_steps:
                continue
            lr = cosine_lr(state.step, total_steps, args.learning_rate)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = clip_and_step(run, optimizer, args.grad_clip)
            state.step += 1
            now = time.time()
            logger.step(state.step, {"loss": loss_sum / n_micro, "lr": lr, "grad_norm": grad_norm,
                                     "epoch": order.epoch_of(state.micro - 1),
                                     "tokens_per_sec": tokens * run.dist.world_size / max(now - t_last, 1e-9)},
                        force=state.step == stop_step)
            if state.step % args.log_interval == 0:
                tokens, t_last, loss_sum, n_micro = 0, now, 0.0, 0
            if state.step % args.save_interval == 0 and state.step < stop_step:
                run.save(state, optimizer)
        run.save(state, optimizer)
        print0(f"{'stopped by a signal' if stopped else 'done'} at step {state.step}/{total_steps}; "
               f"weights in {run.weights_dir}, resume file {run.resume_file}")
    finally:
        stop.restore()
        logger.close()
        run.close()
    return run.weights_dir


if __name__ == "__main__":
    run_cli(main, parse_args)
