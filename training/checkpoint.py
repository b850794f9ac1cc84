"""Saves and resumes: the weights folder and the resume file, written atomically; the resume
file read back and checked before any expensive set-up; a run continued exactly.

``{checkpoint_dir}/{save_weight}_{hidden_size}[_moe]_resume.pth`` holds the trainable weights
in fp32, optimizer, grad scaler, every RNG state, epoch, step, data position, world size, the
learning-rate schedule's length, the wandb run id and the args. It holds only tensors, numbers, strings, lists and dicts, so it is
read back with ``torch.load(weights_only=True)``. A write goes to a temp file that is renamed
over the old one only once complete: a crash mid-write leaves the previous file valid.

With ``--keep_checkpoints K`` above 1, each save is also kept as
``..._resume_step{N}.pth`` (a hard link to the same file, so no extra space), the K newest
of them; ``--from_resume 1`` falls back to them, newest first, when the latest cannot be read.
"""
from __future__ import annotations

import glob
import os
import random
import re
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import RunHalted, UserError
from core.files import atomic_file
from core.runtime import print0
from model.config import weight_name
from model.strict import key_mismatch
from training.order import DataOrder, TrainState, rescaled_position

# Args that may change between a run and its resume without changing what is trained.
# --max_steps and --epochs set the schedule's length, which the file records and checks itself.
RESUME_FREE_ARGS = {"from_resume", "device", "log_interval", "save_interval", "use_wandb", "wandb_project",
                    "num_workers", "max_steps", "stop_after_steps", "epochs", "checkpoint_dir", "save_dir",
                    "keep_checkpoints", "max_bad_steps", "merge_for_sampling",
                    # the scripts' defaults behind a chosen value; the chosen value itself is compared
                    "demo_learning_rate", "real_learning_rate", "real_micro_batch",
                    # evaluation reads the weights and draws from its own generator: it changes no training
                    "eval_data", "eval_interval", "eval_samples", "eval_max_new_tokens", "save_best", "best_metric"}


def resume_path(checkpoint_dir: str, save_weight: str, hidden_size: int, use_moe: bool) -> str:
    return os.path.join(checkpoint_dir, weight_name(save_weight, hidden_size, use_moe) + "_resume.pth")


def capture_rng() -> dict:
    """Every RNG state, as plain tensors and numbers."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, fp32 on CPU (LoRA only, or all with --use_lora 0)."""
    return {n: p.detach().to("cpu", torch.float32).clone() for n, p in model.named_parameters() if p.requires_grad}


def check_trainable_state(model, state: dict[str, torch.Tensor], path: str) -> dict[str, torch.nn.Parameter]:
    """The model's trainable parameters by name; stops when ``state`` does not hold exactly
    those names and shapes."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    problem = key_mismatch(state, params)
    if problem:
        raise UserError(f"{path} does not match this model's trainable parameters ({problem}); "
                        f"it was saved by another configuration")
    return params


def load_trainable_state(model, state: dict[str, torch.Tensor], path: str) -> None:
    params = check_trainable_state(model, state, path)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


def kept_path(path: str, step: int) -> str:
    return f"{path[:-len('.pth')]}_step{step}.pth"


def kept_resume_files(path: str) -> list[tuple[int, str]]:
    """(step, file) of the kept copies of resume file ``path``, newest first."""
    stem = path[:-len(".pth")]
    found = []
    for f in glob.glob(glob.escape(stem) + "_step*.pth"):
        m = re.fullmatch(re.escape(stem) + r"_step(\d+)\.pth", f)
        if m:
            found.append((int(m.group(1)), f))
    return sorted(found, reverse=True)


def save_resume(path: str, state: dict, keep: int = 1) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename); with ``keep`` above 1
    also keep it as ``kept_path(path, step)`` and remove all but the ``keep`` newest such files."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_file(path, "wb") as f:
        torch.save(state, f)
    if keep > 1:
        link = kept_path(path, state["step"])
        if os.path.exists(link):
            os.remove(link)
        try:
            os.link(path, link)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, link)
    for _, f in kept_resume_files(path)[keep if keep > 1 else 0:]:   # with keep 1, no copies at all
        os.remove(f)


def _unreadable(path: str, e: Exception) -> str:
    return f"cannot read resume file {path}: {e.__class__.__name__}: {str(e).splitlines()[0].split('. ')[0][:200]}"


def load_resume(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{_unreadable(path, e)}; delete it to start over")


def load_latest_resume(path: str, say=print) -> tuple[dict, str] | None:
    """(state, file) of the newest readable resume file: ``path``, else its kept copies newest
    first (each unreadable one is named); None when there is none at all."""
    candidates = ([path] if os.path.isfile(path) else []) + [f for _, f in kept_resume_files(path)]
    errors = []
    for f in candidates:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            errors.append(_unreadable(f, e))
            continue
        for e in errors:
            say(f"{e}; trying an older one")
        if f != path:
            say(f"resuming from the kept copy {f} (step {state['step']})")
        return state, f
    if errors:
        raise UserError(f"{errors[0]}; delete it to start over" if len(errors) == 1 else
                        f"none of the {len(errors)} resume files for {path} can be read ({errors[0]}); "
                        f"delete them to start over")
    return None


def other_size_resume_files(checkpoint_dir: str, save_weight: str, path: str) -> list[str]:
    """Resume files of the same --save_weight for another model size than ``path``'s."""
    pattern = re.compile(re.escape(save_weight) + r"_\d+(_moe)?_resume\.pth")
    return sorted(f for f in glob.glob(os.path.join(glob.escape(checkpoint_dir), glob.escape(save_weight) + "_*_resume.pth"))
                  if pattern.fullmatch(os.path.basename(f)) and os.path.abspath(f) != os.path.abspath(path))


# Flags added after resume files were first written, with the value that does what a run written
# before them did; --loss_agg was renamed --loss_type (token_mean: dapo, seq_mean: grpo).
FLAGS_ADDED_LATER = {"importance_sampling_level": "token", "mask_truncated": 0, "overlong_penalty": 0,
                     "drop_zero_std": 0}
OLD_LOSS_AGG = {"token_mean": "dapo", "seq_mean": "grpo"}


def upgraded_resume_args(saved: dict, current: dict) -> dict:
    """A resume file's arguments in today's spelling: --loss_agg X is --loss_type of X, a file
    from before --loss_type had the one loss its script then had (the current --loss_type), and
    flags added since take the value that does what the run did then."""
    saved = dict(saved)
    if "loss_agg" in saved:
        old = saved.pop("loss_agg")
        saved["loss_type"] = OLD_LOSS_AGG.get(old, old)
    if "loss_type" in current and "loss_type" not in saved:
        saved["loss_type"] = current["loss_type"]
    for k, v in FLAGS_ADDED_LATER.items():
        if k in current and k not in saved:
            saved[k] = v
    return saved


def check_resume_args(saved: dict, current: dict, path: str) -> None:
    """Stop when the resume file was written by a run that trains something else."""
    # A flag the file does not record came after it was written: the file says nothing about it.
    diffs = [f"--{k} {saved[k]!r} -> {current.get(k)!r}" for k in sorted(saved)
             if k not in RESUME_FREE_ARGS and saved[k] != current.get(k)]
    if diffs:
        raise UserError(f"{path} was written with other arguments ({'; '.join(diffs[:5])}); "
                        f"use the same ones, another --save_weight, or --from_resume 0 to start over")


# ----------------------------------------------------------------------------- a run's start, saves and resume
@dataclass
class Start:
    """Where a launch starts and stops: the state it starts from, the step the learning-rate
    schedule ends at (--max_steps, else every epoch), the step this launch stops at
    (--stop_after_steps, else there), and the resume file to load (with --from_resume 1)."""
    state: TrainState
    schedule_steps: int
    stop_step: int
    resume: tuple[dict, str] | None = None     # (what the file holds, its path)


def resume_args(args) -> dict:
    """The arguments a resume file records and compares: every flag with a plain value."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}


def plan_start(run, order: DataOrder) -> Start:
    """Read and check the resume file (with --from_resume 1) and fix the run's length. Cheap, so
    a script calls it before any expensive set-up (DPO's reference precompute, the sampler);
    run_steps calls it when the script did not."""
    args = run.args
    schedule_steps = min(order.total_steps, args.max_steps) if args.max_steps else order.total_steps
    state, stops = TrainState(), [args.stop_after_steps]
    found = find_resume(run) if args.from_resume else None
    if found is not None:
        state, schedule_steps = checked_start(run, *found, order, schedule_steps)
        if "schedule_steps" not in found[0]:   # written when --max_steps only stopped a run: it still does
            stops.append(args.max_steps)
    return Start(state, schedule_steps, min([schedule_steps] + [k for k in stops if k]), found)


def find_resume(run) -> tuple[dict, str] | None:
    """(state, file) of the resume file to continue from, or None (a fresh start, said so)."""
    found = load_latest_resume(run.resume_file, say=print0)
    if found is None:
        others = other_size_resume_files(run.args.checkpoint_dir, run.args.save_weight, run.resume_file)
        if others:
            lm_config = run.lm_config
            raise UserError(f"--from_resume 1: no {os.path.basename(run.resume_file)} for this model size "
                            f"(--hidden_size {lm_config.hidden_size}{', --use_moe 1' if lm_config.use_moe else ''}), "
                            f"but {others[0]} is there, saved for another size; pass the sizes it was trained with "
                            f"to resume it, or --from_resume 0 to start a new run")
        print0(f"--from_resume 1: no resume file at {run.resume_file}, starting fresh")
    return found


def checked_start(run, ckpt: dict, path: str, order: DataOrder, schedule_steps: int) -> tuple[TrainState, int]:
    """(state, schedule_steps) a resume file continues from. Everything that would make the
    resumed run train something else stops it here, with what differs: another algorithm, other
    arguments, another data file, another schedule, other trainable parameters."""
    args, world = run.args, run.dist.world_size
    if ckpt.get("algorithm") != run.algorithm:
        raise UserError(f"{path} was written by {ckpt.get('algorithm')}, not {run.algorithm}; "
                        f"use another --save_weight or --checkpoint_dir")
    check_resume_args(upgraded_resume_args(ckpt["args"], resume_args(args)), resume_args(args), path)
    if ckpt.get("data_examples", order.n) != order.n:
        raise UserError(f"{path} was written for {ckpt['data_examples']} examples in {args.data_path}, "
                        f"which now has {order.n}; resume with the data it was trained on, "
                        f"or --from_resume 0 to start over")
    same_world = ckpt["world_size"] == world
    saved_schedule = ckpt.get("schedule_steps")
    if saved_schedule is None:
        print0(f"resume: {path} records no schedule length: the schedule spans every epoch as when it "
               f"was written, and --max_steps only stops the run")
        schedule_steps = order.total_steps
    elif same_world and saved_schedule != schedule_steps:
        raise UserError(f"{path} was written for a learning-rate schedule of {saved_schedule} steps, these "
                        f"flags give {schedule_steps} (--max_steps {args.max_steps}, --epochs "
                        f"{args.epochs}); resume with the --max_steps and --epochs it started with (stop "
                        f"early with --stop_after_steps K), or --from_resume 0 to start over")
    check_trainable_state(run.base_model, ckpt["model"], path)
    step, micro = ckpt["step"], ckpt["micro"]
    if not same_world:
        step, micro = rescaled_position(micro, ckpt["world_size"], world, order.micro_per_step)
        samples = ckpt["micro"] * args.batch_size * ckpt["world_size"]
        print0(f"resume: world size {ckpt['world_size']} -> {world}: step {ckpt['step']} -> "
               f"{step} (the same {samples} examples seen; the data order and sampling RNG continue per "
               f"rank, so the run is not bit-identical to one that kept {ckpt['world_size']} process(es); "
               f"the schedule is this launch's {schedule_steps} steps)")
    state = TrainState(step=step, micro=micro, extra=ckpt.get("extra", {}), wandb_id=ckpt.get("wandb_id"),
                       bad_steps=ckpt.get("bad_steps", 0), bad_in_row=ckpt.get("bad_in_row", 0))
    return state, schedule_steps


def restore(start: Start, run, updater) -> TrainState:
    """The state to start from: the resume file's weights, optimizer state(s), grad scaler and
    RNG loaded into the run when ``start`` has one."""
    if start.resume is None:
        return start.state
    ckpt, path = start.resume
    load_trainable_state(run.base_model, ckpt["model"], path)
    updater.load_state(ckpt, path)
    rng = ckpt["rng"]
    restore_rng(rng[run.dist.rank] if isinstance(rng, list) and run.dist.rank < len(rng) else rng[0])
    print0(f"resumed from {path} at step {start.state.step}/{start.schedule_steps}")
    return start.state


def save_checkpoint(run, state: TrainState, updater, start: Start, order: DataOrder, extra_meta: dict | None,
                    saved_step: int | None) -> None:
    """Weights to ``{save_dir}/{stem}/`` and the resume file, both atomically, rank 0 only.
    Non-finite weights are never written; a failed write (a full disk) leaves the last good
    weights and resume file (of step ``saved_step``) as they were and stops the run with a RunHalted."""
    bad = [n for n, p in run.base_model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise RunHalted(f"step {state.step}: non-finite values in {bad[0]}"
                        f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}; nothing was saved, the last "
                        f"good save{f' (step {saved_step})' if saved_step is not None else ''} is kept")
    run.check_replicas_agree(state.step)
    rngs = run.dist.all_objects(capture_rng())
    if not run.is_main:
        return
    weights_saved = False
    try:
        run.save_weights(extra_meta)
        weights_saved = True
        save_resume(run.resume_file, {
            "algorithm": run.algorithm, "model": trainable_state(run.base_model), **updater.state(),
            "rng": rngs, "step": state.step, "micro": state.micro, "world_size": run.dist.world_size,
            "schedule_steps": start.schedule_steps,
            "wandb_id": state.wandb_id, "args": resume_args(run.args), "extra": state.extra,
            "data_examples": order.n, "bad_steps": state.bad_steps, "bad_in_row": state.bad_in_row,
        }, keep=run.args.keep_checkpoints)
    except OSError as e:
        last = f"step {saved_step}" if saved_step is not None else "none yet"
        kept = (f"the weights of step {state.step} are saved, the resume file still holds {last}" if weights_saved
                else f"the last good weights and resume file ({last}) are kept")
        raise RunHalted(f"could not save step {state.step}: {e.strerror or e} ({e.filename or run.resume_file}); "
                        f"{kept}; free some space and rerun with --from_resume 1") from None
