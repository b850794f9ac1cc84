"""The one training loop every script runs, and the optimizer updates inside its steps.

A script's ``build(args)`` returns a Job:

    run = Run(args, "dpo", reference="shared")              # model (+LoRA), reference, DDP (training.run)
    order = data_order(run, len(pairs), "pairs")            # seeded, resumable, rank-sliced (training.order)
    def micro_step(indices):                                # one micro-batch: forward through run.model
        return loss, {"rewards/margins": ...}, n_tokens
    return supervised_job(run, order, micro_step, "dpo")    # AdamW (Updater), one step of micro-batches

and ``main`` runs it: ``build(args)()``. The loop does the rest: --from_resume 1, the cosine
learning rate (ending at --max_steps), --stop_after_steps, logging (metrics averaged over the
log window and over ranks), evaluation (--eval_data), saving every --save_interval, at the end
and on SIGTERM/SIGINT, and stopping after --max_bad_steps non-finite steps in a row.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from typing import Callable

import torch

from core.errors import RunHalted, UserError
from core.runtime import grad_scaler, peak_memory_gb, print0
from training.checkpoint import Start, plan_start, restore, save_checkpoint
from training.evaluation import TrainingEval
from training.logging import RunLogger
from training.order import DataOrder, TrainState
from training.run import Run


def cosine_lr(step: int, total_steps: int, lr: float) -> float:
    """MiniMind's cosine schedule: from 1.0 * lr at step 0 down to 0.1 * lr at the last step."""
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, total_steps))))


def adamw(params, learning_rate: float) -> torch.optim.AdamW:
    """The optimizer of every script: AdamW without weight decay over ``params`` (tensors, or
    parameter groups, e.g. with a ``peak_lr`` of their own)."""
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)


class Updater:
    """The optimizer updates of a run: backward passes (scaled under fp16, with an MoE's router
    loss added), then one step of each optimizer, each clipped to its own norm, or none at all
    when a loss or a gradient since the last step was not finite.

    optimizers: one optimizer, or {name: optimizer} over disjoint parameters (PPO's policy and
    critic), each scheduled from its groups' ``peak_lr`` (default: ``learning_rate``).
    accumulation_steps: the micro-batches one step's loss is cut into (the router loss of each
    is divided by it, as MiniMind's (loss + aux) / accumulation_steps).
    """

    def __init__(self, run: Run, optimizers, learning_rate: float, grad_clip: float, accumulation_steps: int = 1):
        self.run, self.grad_clip, self.accumulation_steps = run, grad_clip, accumulation_steps
        self.optimizers = dict(optimizers) if isinstance(optimizers, dict) else {"": optimizers}
        self.learning_rate = learning_rate
        self.scaler = grad_scaler(run.device, run.dtype)
        self.skipped = 0            # optimizer steps skipped for a non-finite loss or gradients
        self.aux_values = []        # the router losses since the last log line
        self._losses_finite = None  # whether every loss since the last optimizer step was finite

    def set_learning_rates(self, step: int, schedule_steps: int) -> dict[str, float]:
        """Every group's learning rate at ``step`` of a cosine schedule over ``schedule_steps``
        steps: the first step at the peak, the last at the schedule's end value. Returns them as
        logged: ``lr`` (the first optimizer's), ``{name}_lr`` (the others')."""
        lrs = {}
        for name, opt in self.optimizers.items():
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, schedule_steps - 1, group.get("peak_lr", self.learning_rate))
            lrs[f"{name}_lr" if lrs else "lr"] = opt.param_groups[0]["lr"]
        return lrs

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss (scaled under fp16), noting whether it was finite: the next
        optimizer step is skipped if any loss since the last one was not."""
        aux = self.run.moe_aux_loss()
        if aux is not None:
            self.aux_values.append(float(aux.detach()))
            loss = loss + aux.to(loss.device) / self.accumulation_steps   # as MiniMind: (loss + aux) / accum
        finite = torch.isfinite(loss.detach()).all()
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite
        self.scaler.scale(loss).backward()

    def step(self) -> list[float]:
        """Unscale, clip, step and zero every optimizer. Returns each gradient norm before clipping.

        When a loss since the last step or a gradient is not finite, no optimizer steps: the
        gradients are dropped and ``skipped`` counts it (run_steps stops the run after
        --max_bad_steps such steps in a row). Under fp16 the grad scaler's own overflow handling
        (skip, lower the scale) stays as it is: an overflowing gradient there is not a bad step."""
        norms = []
        for opt in self.optimizers.values():
            self.scaler.unscale_(opt)
            params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
            if self.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
            else:
                norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])) if params \
                    else torch.zeros(())
            norms.append(float(norm))
        losses_ok = self.losses_were_finite()
        grads_ok = all(math.isfinite(n) for n in norms)
        if not losses_ok or not (grads_ok or self.scaler.is_enabled()):
            self.skipped += 1
        else:
            for opt in self.optimizers.values():
                self.scaler.step(opt)
        self.scaler.update()
        self.zero_grad()
        return norms

    def zero_grad(self) -> None:
        """Drop every gradient (an update given up, e.g. PPO's early stop)."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def losses_were_finite(self) -> bool:
        """Whether every loss since the last call was finite, on every rank."""
        ok = True if self._losses_finite is None else bool(self._losses_finite)
        self._losses_finite = None
        return not self.run.dist.any(not ok)

    def state(self) -> dict:
        """What a resume file holds of the updates: every optimizer's state, the grad scaler's."""
        return {"optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
                "scaler": self.scaler.state_dict()}

    def load_state(self, ckpt: dict, path: str) -> None:
        """The optimizers' and the grad scaler's state from a resume file (``path``, for messages)."""
        saved = ckpt["optimizers"]
        if set(saved) != set(self.optimizers):
            raise UserError(f"{path} holds the state of optimizer(s) {sorted(saved)}, this run has "
                            f"{sorted(self.optimizers)}; use another --checkpoint_dir or start without --from_resume")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])
        self.scaler.load_state_dict(ckpt["scaler"])


@dataclass
class Job:
    """A training run ready to go: each script's ``build(args)`` returns one and its ``main``
    runs it; bench/run.py times the same ``one_step`` without the loop.

    one_step(state) -> (metrics, n_tokens) does one optimizer step at the learning rate the loop
    has set: its forwards, backwards and update(s), advancing ``state.micro`` by the data
    batches it used. start: the resume file read and checked by the script before its expensive
    set-up (training.checkpoint.plan_start); None: the loop reads it."""
    run: Run
    order: DataOrder
    updater: Updater
    one_step: Callable[[TrainState], tuple[dict, int]]
    desc: str
    extra_meta: dict | None = None
    start: Start | None = None

    def __call__(self) -> str:
        return run_steps(self)


def data_order(run: Run, n: int, what: str) -> DataOrder:
    """The seeded order of a supervised script's ``n`` examples (``what`` they are, for messages):
    --batch_size a micro-batch, --accumulation_steps micro-batches a step, --epochs passes."""
    args = run.args
    return DataOrder(n, args.batch_size, args.epochs, args.accumulation_steps, args.seed, run.dist, what=what)


def adamw_updater(run: Run) -> Updater:
    """AdamW over the run's trainable parameters at --learning_rate, clipped at --grad_clip, each
    step's loss cut into --accumulation_steps pieces."""
    args = run.args
    return Updater(run, adamw(run.trainable_parameters(), args.learning_rate), args.learning_rate, args.grad_clip,
                   args.accumulation_steps)


def supervised_job(run: Run, order: DataOrder, micro_step, desc: str, extra_meta: dict | None = None,
                   start: Start | None = None) -> Job:
    """The Job of SFT, DPO and the reward model: adamw_updater, and supervised_step over
    --accumulation_steps micro-batches of ``micro_step``."""
    updater = adamw_updater(run)
    step = supervised_step(run, order, updater, micro_step, run.args.accumulation_steps)
    return Job(run, order, updater, step, desc, extra_meta, start)


def supervised_step(run: Run, order: DataOrder, updater: Updater, micro_step, accumulation_steps: int):
    """one_step(state) of SFT, DPO and the reward model: ``accumulation_steps`` micro-batches,
    one optimizer update.

    micro_step(indices) -> (loss, metrics, n_tokens): the loss of one micro-batch (the dataset
    items at ``indices``), computed with a forward through ``run.model``; metrics are floats
    (or 0-d tensors) averaged over the step, then over the log window and over ranks.
    """
    def one_step(state: TrainState):
        sums, tokens = {}, 0
        for k in range(accumulation_steps):
            with run.grad_sync(last=k == accumulation_steps - 1):
                loss, metrics, n_tokens = micro_step(order.batch(state.micro))
                updater.backward(loss / accumulation_steps)
            for key, v in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            tokens += n_tokens
            state.micro += 1
        grad_norm = updater.step()[0]
        return {**{k: v / accumulation_steps for k, v in sums.items()}, "grad_norm": grad_norm}, tokens

    return one_step


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


def run_steps(job: Job) -> str:
    """The loop around every training script's steps. Returns the weights folder.

    Around ``job.one_step``: --from_resume 1, the cosine schedule, logging (metrics averaged over
    the log window and over ranks), evaluation, saving every --save_interval steps, at the end
    and on SIGTERM/SIGINT. The schedule ends at --max_steps (else after every epoch), as in TRL;
    --stop_after_steps stops earlier without changing it, so a run stopped there and resumed
    later follows the same curve as one that never stopped.
    """
    run, order, updater, args = job.run, job.order, job.updater, job.run.args
    start = job.start or plan_start(run, order)
    state = restore(start, run, updater)
    saved_step = state.step if start.resume is not None else None     # the last good save
    schedule_steps, stop_step = start.schedule_steps, start.stop_step
    logger = RunLogger(enabled=run.is_main, total_steps=stop_step, start_step=state.step,
                       log_interval=args.log_interval, metrics_path=run.metrics_path, use_wandb=args.use_wandb,
                       wandb_project=args.wandb_project, run_name=run.stem, config=vars(args),
                       wandb_id=state.wandb_id, desc=job.desc)
    state.wandb_id = logger.wandb_id
    evaluator = TrainingEval(run) if getattr(args, "eval_data", None) else None
    stop = StopSignal()
    sums, n_steps, tokens, t_last = {}, 0, 0, time.time()
    stopped = finished = False
    try:
        while state.step < stop_step:
            if run.dist.any(stop.received is not None):  # every rank stops at the same step
                stopped = True
                break
            lrs = updater.set_learning_rates(state.step, schedule_steps)
            skipped_before = updater.skipped
            metrics, n_tokens = job.one_step(state)
            state.step += 1
            if updater.skipped > skipped_before:
                state.bad_steps, state.bad_in_row = state.bad_steps + 1, state.bad_in_row + 1
                print0(f"step {state.step}: non-finite loss or gradients, update skipped ({state.bad_in_row} in a row, "
                       f"{state.bad_steps} in all; the run stops after --max_bad_steps {args.max_bad_steps} in a row)")
            else:
                state.bad_in_row = 0
            metrics["skipped_steps"] = state.bad_steps
            if updater.aux_values:
                metrics["aux_loss"], updater.aux_values = sum(updater.aux_values) / len(updater.aux_values), []
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_steps, tokens = n_steps + 1, tokens + n_tokens
            scores = {}
            if evaluator is not None and (state.step % args.eval_interval == 0 or state.step == stop_step):
                scores = evaluator(state.step)
                evaluator.keep_if_best(state, scores)
            if state.step % args.log_interval == 0 or state.step == stop_step:
                names = list(sums)
                values = run.dist.all_mean([sums[k] / n_steps for k in names] + [float(tokens)])
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
                save_checkpoint(run, state, updater, start, order, job.extra_meta, saved_step)
                saved_step = state.step
        save_checkpoint(run, state, updater, start, order, job.extra_meta, saved_step)
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
