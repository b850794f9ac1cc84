"""What every training script does around its loss: set-up, data order, saving, resuming, stopping.

A supervised script (SFT, DPO, reward model) reads:

    run = Run(args, "dpo", reference="shared")              # DDP, device, model (+LoRA), reference
    order = DataOrder(len(data), args.batch_size, ...)      # seeded, resumable, rank-sliced
    def micro_step(indices):                                # one micro-batch: forward through run.model
        return loss, {"rewards/margins": ...}, n_tokens
    train(run, order, micro_step, desc="dpo")               # the loop below

``train`` does the rest: --from_resume 1, gradient accumulation (DDP syncs only on the last
micro-batch), cosine learning rate (ending at --max_steps), --stop_after_steps, clipping,
logging (metrics averaged over the log window and over ranks), saving every --save_interval,
at the end and on SIGTERM/SIGINT.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import signal
import time
from dataclasses import dataclass, field

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from model import LMConfig, apply_lora, init_model, save_lora, weight_name
from model.export import export
from model.loading import demo_weights, disable_dropout
from model.lora import adapters_disabled, trainable_parameters
from model.minimind import RouterLogits, moe_aux_loss
from model.value_head import HEAD_FILE, ActorCritic, ValueHeadModel
from utils.args import find_data_file
from utils.checkpoint import (capture_rng, check_resume_args, check_trainable_state, load_latest_resume,
                              load_trainable_state, other_size_resume_files, restore_rng, resume_path, save_resume,
                              trainable_state, upgraded_resume_args)
from core.errors import RunHalted, UserError
from utils.evaluation import TrainingEval, eval_arg_problems
from utils.logging import RunLogger
from core.runtime import (DistInfo, autocast_context, grad_scaler, init_distributed, peak_memory_gb, print0,
                           seed_everything)
from utils.schedule import cosine_lr


def validate_common_args(args) -> None:
    """Every problem with the shared flags, raised once as one line. A --data_path written for
    MiniMind's layout (``../dataset/x.jsonl``) is resolved to the project's file (see find_data_file)."""
    args.data_path = find_data_file(args.data_path)
    problems = []
    for name in ("batch_size", "accumulation_steps", "epochs", "log_interval", "save_interval", "max_seq_len",
                 "max_bad_steps", "keep_checkpoints"):
        if getattr(args, name) is not None and getattr(args, name) < 1:     # None: chosen with the weights
            problems.append(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.learning_rate is not None and args.learning_rate <= 0:
        problems.append(f"--learning_rate must be positive (got {args.learning_rate})")
    for name in ("max_steps", "stop_after_steps"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must be 0 (no limit) or positive (got {getattr(args, name)})")
    if args.use_lora and (args.lora_rank < 1 or args.lora_alpha <= 0):
        problems.append("--lora_rank must be at least 1 and --lora_alpha positive")
    if args.grad_clip < 0:
        problems.append(f"--grad_clip must be 0 (off) or positive (got {args.grad_clip})")
    problems += eval_arg_problems(args)
    if problems:
        raise UserError("; ".join(problems))


def choose_learning_rate(args, why: str | None) -> None:
    """--learning_rate when it was not given (None): the script's demo value on the demo's weights
    (``why`` they are: model.loading.demo_weights), tuned so the 2M-parameter demo learns in
    minutes; its real-model value on any other weights (``why`` None), measured on
    SmolLM2-135M-Instruct (recipes/smollm2), where the demo value makes the policy drift. Prints
    which and why."""
    if args.learning_rate is not None:
        return
    demo, real = args.demo_learning_rate, args.real_learning_rate
    args.learning_rate = demo if why else real
    said = f"the demo's value, for {why}" if why else "the real-model value, for weights that are not the demo's"
    print0(f"--learning_rate {args.learning_rate:g}: {said} (the demo's is {demo:g}, a real model's {real:g}; "
           f"pass --learning_rate to choose)")


class DataOrder:
    """A seeded shuffle of the dataset per epoch, cut into micro-batches for this rank.

    Micro-batches are counted globally across epochs (``micro``), so a resume only needs that
    one number. Each epoch uses ``n // (batch_size * world_size)`` full micro-batches per rank
    (the rest of the shuffle is dropped, so every rank does the same number of steps).
    """

    def __init__(self, n: int, batch_size: int, epochs: int, accumulation_steps: int, seed: int,
                 dist_info: DistInfo, what: str = "examples"):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.micro_per_step = accumulation_steps   # data micro-batches per optimizer step (RL: 1 prompt batch)
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

    def _epoch_perm(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm

    def batch(self, micro: int) -> list[int]:
        """Dataset indices of global micro-batch ``micro`` on this rank."""
        epoch, b = divmod(micro, self.batches_per_epoch)
        per_rank = self._epoch_perm(epoch)[self.rank:: self.world]
        return per_rank[b * self.batch_size: (b + 1) * self.batch_size]

    def used(self, start_micro: int, stop_micro: int) -> set[int]:
        """Dataset indices that micro-batches ``start_micro`` to ``stop_micro - 1`` read on any rank.
        Micro-batch b of an epoch on rank r is perm[r::world][b*bs:(b+1)*bs], so on all ranks
        together it is perm[b*bs*world:(b+1)*bs*world]."""
        span, used = self.batch_size * self.world, set()
        for micro in range(start_micro, stop_micro):
            if len(used) == self.n:
                break
            epoch, b = divmod(micro, self.batches_per_epoch)
            used.update(self._epoch_perm(epoch)[b * span: (b + 1) * span])
        return used

    def epoch_of(self, micro: int) -> int:
        return micro // self.batches_per_epoch


@dataclass
class TrainState:
    step: int = 0            # optimizer steps done
    micro: int = 0           # micro-batches done
    extra: dict = field(default_factory=dict)
    wandb_id: str | None = None
    bad_steps: int = 0       # steps skipped for a non-finite loss or gradients, in all
    bad_in_row: int = 0      # ... in a row up to now


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

    def __init__(self, args, algorithm: str, reference: str | None = None, wrap=None):
        """reference: None (no reference model), "shared" (the policy's weights with the LoRA
        adapters off: one copy in memory) or "copy" (a separate frozen copy of the start weights).
        wrap(lm, run): builds the trained module from the LM once its adapters are in, e.g. a reward
        model (model.value_head.reward_model_for_training) or PPO's ActorCritic; heads train
        and are saved with the weights."""
        validate_common_args(args)
        if reference == "shared" and not args.use_lora:
            raise UserError("--ref_model shared needs LoRA adapters to switch off; with --use_lora 0 use --ref_model copy")
        self.args, self.algorithm, self.reference = args, algorithm, reference
        self.dist, self.device = init_distributed(args.device)
        seed_everything(args.seed)
        self.lm_config = LMConfig.from_args(args)
        model, self.tokenizer = init_model(self.lm_config, args.from_weight, device=self.device,
                                           save_dir=args.save_dir, tokenizer_path=args.tokenizer_path,
                                           eos_token=args.eos_token, base_weight=args.base_weight)
        source = model.weight_source
        self.demo_weights = demo_weights(source, self.tokenizer)     # why they are the demo's; None: a real model's
        choose_learning_rate(args, self.demo_weights)
        if args.disable_dropout and disable_dropout(model):
            print0("dropout of the model set to 0 for the run (--disable_dropout 0 keeps it)")
        # The reference is the start weights, frozen: a copy taken before any adapter goes in.
        self.ref_model = copy.deepcopy(model).eval().requires_grad_(False) if reference == "copy" else None
        if args.use_lora:
            apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, targets=args.lora_targets)
        else:
            model.requires_grad_(True)
        if wrap is not None:
            model = wrap(model, self)
        model.train()
        self.base_model = model
        # MoE: while the router trains, MiniMind's load-balancing loss joins every backward.
        self.routers, self.aux_values = None, []
        lm_cfg = getattr(getattr(model, "lm", model), "config", None)
        if getattr(lm_cfg, "model_type", "") == "qwen3_moe" and lm_cfg.router_aux_loss_coef > 0:
            routers = RouterLogits(model)
            if routers.trains():
                self.routers, self.aux_top_k, self.aux_coef = routers, lm_cfg.num_experts_per_tok, \
                    lm_cfg.router_aux_loss_coef
            else:
                routers.remove()
        # Every forward that feeds a loss goes through self.model, so DDP syncs the gradients.
        self.model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None) \
            if self.dist.enabled else model
        if args.use_compile:
            self.model = torch.compile(self.model)
        self.scaler = grad_scaler(self.device, args.dtype)
        self.skipped_updates = 0      # optimizer steps skipped for a non-finite loss or gradients
        self._losses_finite = None    # whether every loss since the last optimizer step was finite
        self.saved_step = None        # the step of the last good save (or of the resume file)
        self.data_examples = None
        self.start, self._resume = None, None   # set by check_resume
        self.stem = weight_name(args.save_weight, self.lm_config.hidden_size, self.lm_config.use_moe)
        self.weights_dir = os.path.join(args.save_dir, self.stem)
        self.metrics_path = os.path.join(args.save_dir, self.stem + "_metrics.jsonl")
        self.resume_file = resume_path(args.checkpoint_dir, args.save_weight, self.lm_config.hidden_size,
                                       self.lm_config.use_moe)
        trainable, total = trainable_parameters(self.base_model)
        print0(f"{algorithm}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable "
               f"({'LoRA r=%d' % args.lora_rank if args.use_lora else 'all'}), device {self.device}, "
               f"{self.dist.world_size} process(es)")
        print0(f"weights {source.path or 'random init'}, tokenizer {self.tokenizer.name_or_path} "
               f"({len(self.tokenizer)} tokens)")

    @property
    def lm(self):
        """The causal LM itself, under a value head or PPO's ActorCritic if there is one."""
        return getattr(self.base_model, "lm", self.base_model)

    @property
    def critic_dir(self) -> str:
        """Where PPO saves its critic: ppo_actor -> ppo_critic, anything else -> <name>_critic."""
        name = self.args.save_weight
        name = name.replace("actor", "critic") if "actor" in name else name + "_critic"
        return os.path.join(self.args.save_dir, weight_name(name, self.lm_config.hidden_size, self.lm_config.use_moe))

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

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss (scaled under fp16), noting whether it was finite: the next
        optimizer step is skipped if any loss since the last one was not (see step_optimizers)."""
        if self.routers is not None:
            aux = moe_aux_loss(self.routers.pop(), self.aux_top_k, self.aux_coef)
            self.aux_values.append(float(aux.detach()))
            loss = loss + aux.to(loss.device) / self.args.accumulation_steps   # as MiniMind: (loss + aux) / accum
        finite = torch.isfinite(loss.detach()).all()
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite
        self.scaler.scale(loss).backward()

    def losses_were_finite(self) -> bool:
        """Whether every loss since the last call was finite, on every rank."""
        ok = True if self._losses_finite is None else bool(self._losses_finite)
        self._losses_finite = None
        return not self.any_rank(not ok)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.base_model.parameters() if p.requires_grad]

    def autocast(self):
        return autocast_context(self.device, self.args.dtype)

    @contextlib.contextmanager
    def reference_model(self):
        """The frozen reference, in eval mode, under no_grad: the separate copy, or the policy's
        own module with every adapter off. It feeds no gradient, so it bypasses the DDP wrapper."""
        if self.reference is None:
            raise RuntimeError(f"{self.algorithm} was set up without a reference model")
        if self.ref_model is not None:
            with torch.no_grad():
                yield self.ref_model
            return
        was_training = self.base_model.training
        self.base_model.eval()
        try:
            with torch.no_grad(), adapters_disabled(self.base_model):
                yield self.lm
        finally:
            self.base_model.train(was_training)

    def all_mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of each value (every rank must call it at the same point)."""
        if not self.dist.enabled or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return (t / self.dist.world_size).tolist()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a tensor (every rank must call it at the same point)."""
        if not self.dist.enabled:
            return t
        t = t.detach().clone()
        torch.distributed.all_reduce(t)
        return t

    # -------------------------------------------------------------- resume
    def resume_args(self) -> dict:
        return {k: v for k, v in vars(self.args).items() if isinstance(v, (int, float, str, bool, type(None)))}

    def check_resume(self, order: DataOrder) -> TrainState:
        """Read and check the resume file (with --from_resume 1) and fix the run's length; returns
        the state the run will start from. Cheap, so a script calls it before any expensive
        set-up (DPO's reference precompute); resume_or_start calls it when the script did not.
        Sets ``schedule_steps`` (where the learning-rate schedule ends: --max_steps, else every
        epoch) and ``stop_step`` (where this launch stops: --stop_after_steps, else there)."""
        args = self.args
        self.data_examples = order.n
        self.schedule_steps = min(order.total_steps, args.max_steps) if args.max_steps else order.total_steps
        self._resume, self.start = None, TrainState()
        stops = [args.stop_after_steps]
        found = self.find_resume() if args.from_resume else None
        if found is not None:
            self.start, self._resume = self.checked_start(*found, order), found
            if "schedule_steps" not in found[0]:   # written when --max_steps only stopped a run: it still does
                stops.append(args.max_steps)
        self.stop_step = min([self.schedule_steps] + [k for k in stops if k])
        return self.start

    def find_resume(self) -> tuple[dict, str] | None:
        """(state, file) of the resume file to continue from, or None (a fresh start, said so)."""
        found = load_latest_resume(self.resume_file, say=print0)
        if found is None:
            others = other_size_resume_files(self.args.checkpoint_dir, self.args.save_weight, self.resume_file)
            if others:
                raise UserError(f"--from_resume 1: no {os.path.basename(self.resume_file)} for this model size "
                                f"(--hidden_size {self.lm_config.hidden_size}"
                                f"{', --use_moe 1' if self.lm_config.use_moe else ''}), but {others[0]} is there, "
                                f"saved for another size; pass the sizes it was trained with to resume it, "
                                f"or --from_resume 0 to start a new run")
            print0(f"--from_resume 1: no resume file at {self.resume_file}, starting fresh")
        return found

    def checked_start(self, ckpt: dict, path: str, order: DataOrder) -> TrainState:
        """The state a resume file continues from. Everything that would make the resumed run
        train something else stops it here, with what differs: another algorithm, other
        arguments, another data file, another schedule, other trainable parameters."""
        args = self.args
        if ckpt.get("algorithm") != self.algorithm:
            raise UserError(f"{path} was written by {ckpt.get('algorithm')}, not {self.algorithm}; "
                            f"use another --save_weight or --checkpoint_dir")
        check_resume_args(upgraded_resume_args(ckpt["args"], self.resume_args()), self.resume_args(), path)
        if ckpt.get("data_examples", order.n) != order.n:
            raise UserError(f"{path} was written for {ckpt['data_examples']} examples in {args.data_path}, "
                            f"which now has {order.n}; resume with the data it was trained on, "
                            f"or --from_resume 0 to start over")
        same_world = ckpt["world_size"] == self.dist.world_size
        saved_schedule = ckpt.get("schedule_steps")
        if saved_schedule is None:
            print0(f"resume: {path} records no schedule length: the schedule spans every epoch as when it "
                   f"was written, and --max_steps only stops the run")
            self.schedule_steps = order.total_steps
        elif same_world and saved_schedule != self.schedule_steps:
            raise UserError(f"{path} was written for a learning-rate schedule of {saved_schedule} steps, these "
                            f"flags give {self.schedule_steps} (--max_steps {args.max_steps}, --epochs "
                            f"{args.epochs}); resume with the --max_steps and --epochs it started with (stop "
                            f"early with --stop_after_steps K), or --from_resume 0 to start over")
        check_trainable_state(self.base_model, ckpt["model"], path)
        step, micro = ckpt["step"], ckpt["micro"]
        if not same_world:
            step, micro = rescaled_position(micro, ckpt["world_size"], self.dist.world_size, order.micro_per_step)
            samples = ckpt["micro"] * args.batch_size * ckpt["world_size"]
            print0(f"resume: world size {ckpt['world_size']} -> {self.dist.world_size}: step {ckpt['step']} -> "
                   f"{step} (the same {samples} examples seen; the data order and sampling RNG continue per "
                   f"rank, so the run is not bit-identical to one that kept {ckpt['world_size']} process(es); "
                   f"the schedule is this launch's {self.schedule_steps} steps)")
        return TrainState(step=step, micro=micro, extra=ckpt.get("extra", {}), wandb_id=ckpt.get("wandb_id"),
                          bad_steps=ckpt.get("bad_steps", 0), bad_in_row=ckpt.get("bad_in_row", 0))

    def resume_or_start(self, optimizer, order: DataOrder) -> TrainState:
        """The state to start from: check_resume's, with the resume file's weights, optimizer
        state(s), grad scaler and RNG loaded when there is one. optimizer: one optimizer, or
        {name: optimizer} (PPO's policy and critic)."""
        if self.start is None:
            self.check_resume(order)
        if self._resume is None:
            return self.start
        (ckpt, path), self._resume = self._resume, None
        load_trainable_state(self.base_model, ckpt["model"], path)
        optimizers, saved = named_optimizers(optimizer), ckpt["optimizers"]
        if set(saved) != set(optimizers):
            raise UserError(f"{path} holds the state of optimizer(s) {sorted(saved)}, this run has "
                            f"{sorted(optimizers)}; use another --checkpoint_dir or start without --from_resume")
        for name, opt in optimizers.items():
            opt.load_state_dict(saved[name])
        self.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        restore_rng(rng[self.dist.rank] if isinstance(rng, list) and self.dist.rank < len(rng) else rng[0])
        self.saved_step = self.start.step
        print0(f"resumed from {path} at step {self.start.step}/{self.schedule_steps}")
        return self.start

    def save(self, state: TrainState, optimizer, extra_meta: dict | None = None) -> None:
        """Weights to ``{save_dir}/{stem}/`` and the resume file, both atomically, rank 0 only.
        Non-finite weights are never written; a failed write (a full disk) leaves the last good
        weights and resume file as they were and stops the run with a RunHalted."""
        bad = [n for n, p in self.base_model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise RunHalted(f"step {state.step}: non-finite values in {bad[0]}"
                            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}; nothing was saved, the last "
                            f"good save{f' (step {self.saved_step})' if self.saved_step is not None else ''} is kept")
        self.check_replicas_agree(state.step)
        rngs = [capture_rng()]
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not self.is_main:
            self.saved_step = state.step
            return
        weights_saved = False
        try:
            self.save_weights(extra_meta)
            weights_saved = True
            save_resume(self.resume_file, {
                "algorithm": self.algorithm, "model": trainable_state(self.base_model),
                "optimizers": {name: opt.state_dict() for name, opt in named_optimizers(optimizer).items()},
                "scaler": self.scaler.state_dict(), "rng": rngs,
                "step": state.step, "micro": state.micro, "world_size": self.dist.world_size,
                "schedule_steps": self.schedule_steps,
                "wandb_id": state.wandb_id, "args": self.resume_args(), "extra": state.extra,
                "data_examples": self.data_examples, "bad_steps": state.bad_steps, "bad_in_row": state.bad_in_row,
            }, keep=self.args.keep_checkpoints)
        except OSError as e:
            last = f"step {self.saved_step}" if self.saved_step is not None else "none yet"
            kept = (f"the weights of step {state.step} are saved, the resume file still holds {last}" if weights_saved
                    else f"the last good weights and resume file ({last}) are kept")
            raise RunHalted(f"could not save step {state.step}: {e.strerror or e} ({e.filename or self.resume_file}); "
                            f"{kept}; free some space and rerun with --from_resume 1") from None
        self.saved_step = state.step

    def check_replicas_agree(self, step: int) -> None:
        """Under DDP, stop if the ranks' trainable weights differ: every rank applies the same
        all-reduced gradients, so they are identical unless a loss forward bypassed the wrapper."""
        if not self.dist.enabled:
            return
        sums = torch.stack([p.detach().double().sum() for p in self.trainable_parameters()])
        gathered = [torch.empty_like(sums) for _ in range(self.dist.world_size)]
        torch.distributed.all_gather(gathered, sums)
        if any(not torch.equal(g, gathered[0]) for g in gathered[1:]):
            raise RuntimeError(f"the {self.dist.world_size} processes hold different weights at step {step}: "
                               f"gradients were not synchronised")
        if not getattr(self, "_replicas_reported", False):
            print0(f"step {step}: weights identical on all {self.dist.world_size} processes")
            self._replicas_reported = True

    def weights_dir_for(self, stem: str) -> str:
        """{save_dir}/{stem}_{hidden_size}[_moe]: where weights saved under that name go."""
        return os.path.join(self.args.save_dir, weight_name(stem, self.lm_config.hidden_size, self.lm_config.use_moe))

    def save_weights(self, extra_meta: dict | None = None, stem: str | None = None) -> None:
        """LoRA-only adapter (PEFT format), or with --use_lora 0 a full Hugging Face model folder.
        stem: save under another name ({stem}_{hidden}[_moe], e.g. the best evaluation's), the
        policy alone (PPO's critic stays with the run's own save)."""
        os.makedirs(self.args.save_dir, exist_ok=True)
        meta = {"algorithm": self.algorithm, **(extra_meta or {})}
        lm, extra_tensors = self.lm, None
        folder = self.weights_dir if stem is None else self.weights_dir_for(stem)
        if isinstance(self.base_model, ActorCritic):  # the policy's adapter, then the critic's with its head
            save_lora(lm, folder, base=self.args.from_weight, lm_config=self.lm_config, extra=meta,
                      tokenizer=self.tokenizer)
            if stem is not None:
                return
            save_lora(lm, self.critic_dir, base=self.args.from_weight, lm_config=self.lm_config,
                      adapter_name=self.base_model.adapter, extra={**meta, "kind": "critic"},
                      extra_tensors={HEAD_FILE: self.base_model.head_state()}, tokenizer=self.tokenizer)
            return
        if isinstance(self.base_model, ValueHeadModel):
            extra_tensors = {HEAD_FILE: self.base_model.head_state()}
        if self.args.use_lora:
            save_lora(lm, folder, base=self.args.from_weight, lm_config=self.lm_config,
                      extra=meta, extra_tensors=extra_tensors, tokenizer=self.tokenizer)
            return
        export(lm, self.tokenizer, folder, meta={"base": self.args.from_weight, **meta},
               extra_tensors=extra_tensors)

    def close(self, clean: bool = True) -> None:
        """Leave the process group. The DDP wrapper goes first: freeing it after its process
        group is destroyed can hang the process at exit. After an error (clean=False) there is
        no barrier, since the other ranks may never reach it; torchrun stops them."""
        if self.dist.enabled and torch.distributed.is_initialized():
            self.model = self.base_model
            gc.collect()
            if clean:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def rescaled_position(micro: int, saved_world: int, world: int, micro_per_step: int) -> tuple[int, int]:
    """(step, micro) on ``world`` processes that have seen the examples ``micro`` micro-batches
    on ``saved_world`` processes saw (rounded down to a whole step). micro_per_step: data
    micro-batches per optimizer step, --accumulation_steps for the supervised scripts, 1 for RL
    (each step takes one prompt batch and cuts it into --accumulation_steps pieces itself)."""
    micro = micro * saved_world // world
    micro -= micro % micro_per_step
    return micro // micro_per_step, micro


def named_optimizers(optimizer) -> dict:
    """{name: optimizer}: a dict as given, or one optimizer under the name ""."""
    return dict(optimizer) if isinstance(optimizer, dict) else {"": optimizer}


def clip_and_step(run: Run, optimizer, grad_clip: float) -> float:
    """Unscale, clip, step, zero: one optimizer step. Returns the gradient norm before clipping."""
    return step_optimizers(run, [optimizer], grad_clip)[0]


def step_optimizers(run: Run, optimizers: list, grad_clip: float) -> list[float]:
    """clip_and_step for optimizers over disjoint parameters (PPO's policy and critic), each
    clipped to its own norm, with one grad-scaler update. Returns each gradient norm.

    When a loss since the last step or a gradient is not finite, no optimizer steps: the
    gradients are dropped and ``run.skipped_updates`` counts it (run_steps stops the run after
    --max_bad_steps such steps in a row). Under fp16 the grad scaler's own overflow handling
    (skip, lower the scale) stays as it is: an overflowing gradient there is not a bad step."""
    norms = []
    for opt in optimizers:
        run.scaler.unscale_(opt)
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params else torch.zeros(())
        norms.append(float(norm))
    losses_ok = run.losses_were_finite()
    grads_ok = all(math.isfinite(n) for n in norms)
    if not losses_ok or not (grads_ok or run.scaler.is_enabled()):
        run.skipped_updates += 1
    else:
        for opt in optimizers:
            run.scaler.step(opt)
    run.scaler.update()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return norms


@dataclass
class Job:
    """A training run ready to go: what ``run_steps`` needs. Each script's ``build(args)`` returns
    one and its ``main`` runs it; bench/run.py times the same ``one_step`` without the loop."""
    run: Run
    order: DataOrder
    optimizer: object
    one_step: object
    desc: str
    extra_meta: dict | None = None

    def __call__(self) -> str:
        return run_steps(self.run, self.order, self.optimizer, self.one_step, desc=self.desc, extra_meta=self.extra_meta)


def supervised_job(run: Run, order: DataOrder, micro_step, *, desc: str, optimizer=None,
                   extra_meta: dict | None = None) -> Job:
    """The supervised training step shared by SFT, DPO and the reward model, as a Job.

    micro_step(indices) -> (loss, metrics, n_tokens): the loss of one micro-batch (the dataset
    items at ``indices``), computed with a forward through ``run.model``; metrics are floats
    (or 0-d tensors) averaged over the log window and over ranks before they are logged.
    """
    args = run.args
    optimizer = optimizer or torch.optim.AdamW(run.trainable_parameters(), lr=args.learning_rate, weight_decay=0.0)

    def one_step(state: TrainState, lr: float):
        sums, tokens = {}, 0
        for _ in range(args.accumulation_steps):
            with run.grad_sync(state.micro):
                loss, metrics, n_tokens = micro_step(order.batch(state.micro))
                run.backward(loss / args.accumulation_steps)
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            tokens += n_tokens
            state.micro += 1
        grad_norm = clip_and_step(run, optimizer, args.grad_clip)
        return {**{k: v / args.accumulation_steps for k, v in sums.items()}, "grad_norm": grad_norm}, tokens

    return Job(run, order, optimizer, one_step, desc, extra_meta)


def train(run: Run, order: DataOrder, micro_step, *, desc: str, optimizer=None, extra_meta: dict | None = None) -> str:
    """The supervised training loop: supervised_job(...) run to the end. Returns the weights folder."""
    return supervised_job(run, order, micro_step, desc=desc, optimizer=optimizer, extra_meta=extra_meta)()


def run_steps(run: Run, order: DataOrder, optimizer, one_step, *, desc: str, extra_meta: dict | None = None) -> str:
    """The loop around every training script's steps. Returns the weights folder.

    one_step(state, lr) -> (metrics, n_tokens) does one step at learning rate ``lr`` (already
    set on ``optimizer``): its forwards, backwards and optimizer update(s), advancing
    ``state.micro`` by the data batches it used. Around it: --from_resume 1, the cosine
    schedule, logging (metrics averaged over the log window and over ranks), saving every
    --save_interval steps, at the end and on SIGTERM/SIGINT. The schedule ends at --max_steps
    (else after every epoch), as in TRL; --stop_after_steps stops earlier without changing it,
    so a run stopped there and resumed later follows the same curve as one that never stopped.
    """
    args = run.args
    state = run.resume_or_start(optimizer, order)
    schedule_steps, stop_step = run.schedule_steps, run.stop_step
    logger = RunLogger(enabled=run.is_main, total_steps=stop_step, start_step=state.step,
                       log_interval=args.log_interval, metrics_path=run.metrics_path, use_wandb=args.use_wandb,
                       wandb_project=args.wandb_project, run_name=run.stem, config=vars(args),
                       wandb_id=state.wandb_id, desc=desc)
    state.wandb_id = logger.wandb_id
    evaluator = TrainingEval(run) if getattr(args, "eval_data", None) else None
    stop = StopSignal()
    sums, n_steps, tokens, t_last = {}, 0, 0, time.time()
    stopped = finished = False
    try:
        while state.step < stop_step:
            if run.any_rank(stop.received is not None):  # every rank stops at the same step
                stopped = True
                break
            lrs = {}
            for name, opt in named_optimizers(optimizer).items():
                for group in opt.param_groups:
                    # the first step at the peak, the last (step schedule_steps) at the schedule's end value
                    group["lr"] = cosine_lr(state.step, schedule_steps - 1, group.get("peak_lr", args.learning_rate))
                lrs[f"{name}_lr" if lrs else "lr"] = opt.param_groups[0]["lr"]
            lr = lrs["lr"]
            skipped_before = run.skipped_updates
            metrics, n_tokens = one_step(state, lr)
            state.step += 1
            if run.skipped_updates > skipped_before:
                state.bad_steps, state.bad_in_row = state.bad_steps + 1, state.bad_in_row + 1
                print0(f"step {state.step}: non-finite loss or gradients, update skipped ({state.bad_in_row} in a row, "
                       f"{state.bad_steps} in all; the run stops after --max_bad_steps {args.max_bad_steps} in a row)")
            else:
                state.bad_in_row = 0
            metrics["skipped_steps"] = state.bad_steps
            if run.aux_values:
                metrics["aux_loss"], run.aux_values = sum(run.aux_values) / len(run.aux_values), []
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_steps, tokens = n_steps + 1, tokens + n_tokens
            scores = {}
            if evaluator is not None and (state.step % args.eval_interval == 0 or state.step == stop_step):
                scores = evaluator(state.step)
                evaluator.keep_if_best(state, scores)
            if state.step % args.log_interval == 0 or state.step == stop_step:
                names = list(sums)
                values = run.all_mean([sums[k] / n_steps for k in names] + [float(tokens)])
                now = time.time()
                logger.step(state.step, {**dict(zip(names, values[:-1])), **lrs,
                                         "epoch": order.epoch_of(state.micro - 1),
                                         "peak_mem_gb": peak_memory_gb(run.device),
                                         "tokens_per_sec": values[-1] * run.dist.world_size / max(now - t_last, 1e-9),
                                         **scores},
                            force=True)
                sums, n_steps, tokens, t_last = {}, 0, 0, now
            else:
                logger.step(state.step, scores, force=bool(scores))
            if state.bad_in_row >= args.max_bad_steps:
                break
            if state.step % args.save_interval == 0 and state.step < stop_step:
                run.save(state, optimizer, extra_meta)
        run.save(state, optimizer, extra_meta)
        if state.bad_in_row >= args.max_bad_steps:
            raise RunHalted(f"stopped at step {state.step}: {state.bad_in_row} steps in a row had a non-finite loss or "
                            f"gradients (skipped, so the weights stay finite; saved to {run.weights_dir}); "
                            f"lower --learning_rate or check the data (on a GPU, --dtype float32 may help)")
        print0(f"{'stopped by a signal' if stopped else 'done'} at step {state.step}/{schedule_steps}; "
               f"weights in {run.weights_dir}, resume file {run.resume_file}")
        finished = True
    finally:
        stop.restore()
        logger.close()
        run.close(clean=finished)
    return run.weights_dir
