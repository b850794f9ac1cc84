"""Resume files: everything a run needs to continue exactly, written atomically.

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

import numpy as np
import torch

from model.config import weight_name
from model.strict import key_mismatch
from core.errors import UserError
from core.files import atomic_file

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
