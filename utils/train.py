"""What every training script does around its loss: set-up, data order, saving, resuming, stopping.

A script's loop reads (train_sft.py is the plainest example):

    run = Run(args, "sft")                                  # DDP, device, model (+LoRA), tokenizer
    order = DataOrder(len(data), args.batch_size, ...)      # seeded, resumable, rank-sliced
    state = run.resume_or_start(optimizer, order)           # --from_resume 1
    while state.step < stop_step:                           # micro-batches order.batch(state.micro)
        with run.grad_sync(state.micro): loss.backward()    # forward through run.model (DDP)
        ... clip_and_step(run, optimizer, args.grad_clip) at each accumulation boundary
        ... run.save(state, optimizer) every --save_interval, at the end, and on SIGTERM/SIGINT
"""
from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from model import LMConfig, apply_lora, init_model, save_lora, weight_name
from model.export import export
from model.lora import trainable_parameters
from utils.checkpoint import (capture_rng, check_resume_args, load_resume, load_trainable_state, restore_rng,
                              resume_path, save_resume, trainable_state)
from utils.errors import UserError
from utils.runtime import DistInfo, grad_scaler, init_distributed, print0, seed_everything


def validate_common_args(args) -> None:
    """Every problem with the shared flags, raised once as one line."""
    problems = []
    for name in ("batch_size", "accumulation_steps", "epochs", "log_interval", "save_interval", "max_seq_len"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.learning_rate <= 0:
        problems.append(f"--learning_rate must be positive (got {args.learning_rate})")
    if args.max_steps < 0:
        problems.append(f"--max_steps must be 0 (no limit) or positive (got {args.max_steps})")
    if args.use_lora and (args.lora_rank < 1 or args.lora_alpha <= 0):
        problems.append("--lora_rank must be at least 1 and --lora_alpha positive")
    if problems:
        raise UserError("; ".join(problems))


class DataOrder:
    """A seeded shuffle of the dataset per epoch, cut into micro-batches for this rank.

    Micro-batches are counted globally across epochs (``micro``), so a resume only needs that
    one number. Each epoch uses ``n // (batch_size * world_size)`` full micro-batches per rank
    (the rest of the shuffle is dropped, so every rank does the same number of steps).
    """

    def __init__(self, n: int, batch_size: int, epochs: int, accumulation_steps: int, seed: int,
                 dist_info: DistInfo, what: str = "examples"):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world = dist_info.rank, dist_info.world_size
        self.batches_per_epoch = n // (batch_size * self.world)
        if self.batches_per_epoch == 0:
            raise UserError(f"--batch_size {batch_size} x {self.world} process(es) is more than the {n} {what} "
                            f"in the data; lower --batch_size")
        self.total_micro = epochs * self.batches_per_epoch
        self.total_steps = self.total_micro // accumulation_steps
        if self.total_steps == 0:
            raise UserError(f"--accumulation_steps {accumulation_steps} is more than the {self.total_micro} "
                            f"micro-batches of the whole run; lower it")
        self._perm_epoch, self._perm = None, None

    def batch(self, micro: int) -> list[int]:
        """Dataset indices of global micro-batch ``micro`` on this rank."""
        epoch, b = divmod(micro, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        per_rank = self._perm[self.rank:: self.world]
        return per_rank[b * self.batch_size: (b + 1) * self.batch_size]

    def epoch_of(self, micro: int) -> int:
        return micro // self.batches_per_epoch


@dataclass
class TrainState:
    step: int = 0            # optimizer steps done
    micro: int = 0           # micro-batches done
    extra: dict = field(default_factory=dict)
    wandb_id: str | None = None


class StopSignal:
    """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and exits."""

    def __init__(self):
        self.received = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: saving at the end of this step, then exiting", flush=True)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Run:
    """The model and everything around it for one training process."""

    def __init__(self, args, algorithm: str):
        validate_common_args(args)
        self.args, self.algorithm = args, algorithm
        self.dist, self.device = init_distributed(args.device)
        seed_everything(args.seed)
        self.lm_config = LMConfig.from_args(args)
        model, self.tokenizer = init_model(self.lm_config, args.from_weight, device=self.device,
                                           save_dir=args.save_dir, tokenizer_path=args.tokenizer_path)
        if args.use_lora:
            apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, targets=args.lora_targets)
        else:
            model.requires_grad_(True)
        model.train()
        self.base_model = model
        # Every forward that feeds a loss goes through self.model, so DDP syncs the gradients.
        self.model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.dist.enabled else model
        if args.use_compile:
            self.model = torch.compile(self.model)
        self.scaler = grad_scaler(self.device, args.dtype)
        self.stem = weight_name(args.save_weight, self.lm_config.hidden_size, self.lm_config.use_moe)
        self.weights_dir = os.path.join(args.save_dir, self.stem)
        self.metrics_path = os.path.join(args.save_dir, self.stem + "_metrics.jsonl")
        self.resume_file = resume_path(args.checkpoint_dir, args.save_weight, self.lm_config.hidden_size,
                                       self.lm_config.use_moe)
        trainable, total = trainable_parameters(self.base_model)
        print0(f"{algorithm}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
               f"({'LoRA r=%d' % args.lora_rank if args.use_lora else 'all'}), device {self.device}, "
               f"{self.dist.world_size} process(es)")

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (so all ranks stop at the same step)."""
        if not self.dist.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def grad_sync(self, micro: int):
        """Context for the backward of micro-batch ``micro`` (0-based): under DDP, gradients are
        all-reduced only on the last micro-batch of an optimizer step, not on every backward."""
        last = (micro + 1) % self.args.accumulation_steps == 0
        if self.dist.enabled and not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.base_model.parameters() if p.requires_grad]

    # -------------------------------------------------------------- resume
    def resume_args(self) -> dict:
        return {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool, type(None)))}

    def resume_or_start(self, optimizer, order: DataOrder) -> TrainState:
        """The state to start from: the resume file's with --from_resume 1 (if there is one), else fresh."""
        if not self.args.from_resume:
            return TrainState()
        if not os.path.isfile(self.resume_file):
            print0(f"--from_resume 1: no resume file at {self.resume_file}, starting fresh")
            return TrainState()
        ckpt = load_resume(self.resume_file)
        if ckpt.get("algorithm") != self.algorithm:
            raise UserError(f"{self.resume_file} was written by {ckpt.get('algorithm')}, not {self.algorithm}; "
                            f"use another --save_weight or --checkpoint_dir")
        check_resume_args(ckpt["args"], self.resume_args(), self.resume_file)
        load_trainable_state(self.base_model, ckpt["model"], self.resume_file)
        optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        step, micro = ckpt["step"], ckpt["micro"]
        if ckpt["world_size"] != self.dist.world_size:
            # The same number of examples seen, counted in this world size's steps.
            samples = micro * self.args.batch_size * ckpt["world_size"]
            micro = samples // (self.args.batch_size * self.dist.world_size)
            micro -= micro % self.args.accumulation_steps
            step = micro // self.args.accumulation_steps
            print0(f"resume: world size {ckpt['world_size']} -> {self.dist.world_size}, step {ckpt['step']} -> {step}")
        rng = ckpt["rng"]
        restore_rng(rng[self.dist.rank] if isinstance(rng, list) and self.dist.rank < len(rng) else rng[0])
        print0(f"resumed from {self.resume_file} at step {step}/{order.total_steps}")
        return TrainState(step=step, micro=micro, extra=ckpt.get("extra", {}), wandb_id=ckpt.get("wandb_id"))

    def save(self, state: TrainState, optimizer, extra_meta: dict | None = None) -> None:
        """Weights to ``{save_dir}/{stem}/`` and the resume file, both atomically, rank 0 only."""
        rngs = [capture_rng()]
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not self.is_main:
            return
        self.save_weights(extra_meta)
        save_resume(self.resume_file, {
            "algorithm": self.algorithm, "model": trainable_state(self.base_model),
            "optimizer": optimizer.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
            "step": state.step, "micro": state.micro, "world_size": self.dist.world_size,
            "wandb_id": state.wandb_id, "args": self.resume_args(), "extra": state.extra,
        })

    def save_weights(self, extra_meta: dict | None = None) -> None:
        """LoRA-only adapter (PEFT format), or with --use_lora 0 a full Hugging Face model folder."""
        os.makedirs(self.args.save_dir, exist_ok=True)
        meta = {"algorithm": self.algorithm, **(extra_meta or {})}
        if self.args.use_lora:
            save_lora(self.base_model, self.weights_dir, base=self.args.from_weight, lm_config=self.lm_config,
                      extra=meta)
            return
        export(self.base_model, self.tokenizer, self.weights_dir, meta={"base": self.args.from_weight, **meta})

    def close(self) -> None:
        if self.dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def clip_and_step(run: Run, optimizer, grad_clip: float) -> float:
    """Unscale, clip, step, zero: one optimizer step. Returns the gradient norm before clipping."""
    run.scaler.unscale_(optimizer)
    params = run.trainable_parameters()
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    run.scaler.step(optimizer)
    run.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)
