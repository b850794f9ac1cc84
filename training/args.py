"""The flags every training script shares (MiniMind's names), added by one helper, and how
every script checks its flags.

Each script calls ``add_common_args(parser, **its_defaults)`` and then adds its algorithm's
own flags. Flags the seed's command uses work exactly as written there. Each group of flags
has a ``*_problems(args) -> [messages]``; a script passes its own to ``core.errors.check_args``, which
raises them all at once, as one line, before anything is loaded.
"""
from __future__ import annotations

import argparse
import os

from core.files import project_path
from core.runtime import add_device_arg, print0
from model.flags import NOT_GIVEN, add_model_args, add_save_dir_arg, dir_default
from training.evaluation import add_eval_args, eval_arg_problems

CHECKPOINT_DIR = dir_default("--checkpoint_dir", "checkpoints", os.path.join("..", "checkpoints"),
                             "resume files are read and written there")


def find_data_file(path: str) -> str:
    """``path`` as given when it exists; else, for a relative path, the same path read from the
    project root, or from a ``trainer/`` folder in it: MiniMind's scripts ran from trainer/, so
    commands written for it (``--data_path ../dataset/dpo.jsonl``) find the project's dataset/
    when run from the project root. A path found nowhere is returned as given (the reader
    then says it is missing)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    for base in (project_path(), project_path("trainer")):
        candidate = os.path.normpath(os.path.join(base, path))
        if os.path.isfile(candidate):
            print0(f"--data_path {path}: not found from {os.getcwd()}; using {candidate}")
            return candidate
    return path


def weight_dependent(group, flag: str, kind, default, what: str, chosen_help: str | None) -> None:
    """``flag`` with ``default``; with ``chosen_help``, default None instead, which the script
    replaces with a value for the weights it loads."""
    group.add_argument(flag, type=kind, default=None if chosen_help else default,
                       help=chosen_help or f"{what} (default: %(default)s)")


def add_common_args(parser: argparse.ArgumentParser, *, save_weight: str, data_path: str,
                    epochs: int = 1, batch_size: int = 16, learning_rate: float = 1e-4,
                    real_learning_rate: float | None = None, max_seq_len: int = 256,
                    from_weight: str = "full_sft", log_interval: int = 10, save_interval: int = 100,
                    use_lora: int = 1, real_micro_batch: int | None = None) -> None:
    """The flags every training script shares. With ``real_learning_rate`` (the alignment
    scripts), --learning_rate left out is chosen once the weights are known
    (training.run.choose_learning_rate); with ``real_micro_batch`` (the RL scripts), so is
    --accumulation_steps (rl.start.choose_micro_batches)."""
    g = parser.add_argument_group("data and model")
    g.add_argument("--data_path", default=project_path(data_path), type=find_data_file,
                   help=f"training data, JSON lines (default: the project's {data_path})")
    add_model_args(g, from_weight, "starting weights: none, a path (model folder, adapter folder, "
                   ".safetensors/.pth) or a name looked up in --save_dir, then the shipped demo")
    g.add_argument("--max_seq_len", type=int, default=max_seq_len,
                   help="longest prompt + response in tokens; prompts are cut from the left (default: %(default)s)")

    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help="passes over the data (default: %(default)s)")
    g.add_argument("--batch_size", type=int, default=batch_size, help="examples per step and process (default: %(default)s)")
    # Left out, these two are chosen once the weights are known (training.run.choose_learning_rate,
    # rl.start.choose_micro_batches) in the scripts that give a real-model value.
    weight_dependent(g, "--learning_rate", float, learning_rate, "peak learning rate", real_learning_rate and (
        f"peak learning rate (default: {learning_rate:g} on the demo's weights: the shipped ones, --from_weight "
        f"none, or any on the demo tokenizer; {real_learning_rate:g} on any other weights, e.g. a pretrained model "
        f"or a MiniMind checkpoint)"))
    if real_learning_rate is not None:
        parser.set_defaults(demo_learning_rate=learning_rate, real_learning_rate=real_learning_rate)
    weight_dependent(g, "--accumulation_steps", int, 1, "micro-batches per optimizer step", real_micro_batch and (
        f"micro-batches each mini-batch of samples is cut into, one forward and backward each, the gradients "
        f"summed into one update, the same as uncut except bnpo's per-piece token mean (default: 1 on the demo's "
        f"weights; on any other weights the fewest that keep a forward to at most {real_micro_batch} sequences)"))
    if real_micro_batch is not None:
        parser.set_defaults(real_micro_batch=real_micro_batch)
    g.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clipping, 0 to turn off (default: %(default)s)")
    g.add_argument("--max_steps", type=int, default=0,
                   help="the run's length in optimizer steps (at most what --epochs give): the cosine learning "
                        "rate ends there, as in TRL; 0: every epoch (default: %(default)s)")
    g.add_argument("--stop_after_steps", type=int, default=0,
                   help="stop after this optimizer step, saving as at the end, with the schedule unchanged, so "
                        "--from_resume 1 continues the same run; 0: no early stop (default: %(default)s)")
    g.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    g.add_argument("--max_bad_steps", type=int, default=10,
                   help="a step whose loss or gradients are not finite is skipped; after this many in a row the "
                        "run saves and stops (default: %(default)s)")

    g = parser.add_argument_group("LoRA")
    g.add_argument("--use_lora", type=int, choices=[0, 1], default=use_lora,
                   help="1: train LoRA adapters only; 0: train every parameter (default: %(default)s)")
    g.add_argument("--lora_rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    g.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA alpha; the scale is alpha/r (default: %(default)s)")
    g.add_argument("--lora_targets", default=None,
                   help="comma-separated module names to adapt (default: every attention and MLP projection)")
    g.add_argument("--disable_dropout", type=int, choices=[0, 1], default=1,
                   help="1: every dropout of the model is 0 for the whole run (policy, reference, critic), so policy "
                        "and reference agree exactly at the start and no noise enters ratios and KL; 0: keep the "
                        "model's own dropout (default: %(default)s)")

    g = parser.add_argument_group("hardware")
    add_device_arg(g)
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="autocast precision on CUDA; CPU always runs fp32 (default: %(default)s)")
    g.add_argument("--num_workers", type=int, default=0, help="accepted for MiniMind's command lines; it changes nothing here: the data is tokenized "
                        "once before training and batches are cut from memory (default: %(default)s)")
    g.add_argument("--use_compile", type=int, choices=[0, 1], default=0, help="torch.compile the model (default: 0)")

    g = parser.add_argument_group("saving, resuming and logging")
    add_save_dir_arg(g, "where weights and the metrics file go, and names are looked up first")
    g.add_argument("--save_weight", default=save_weight,
                   help="name of the saved weights: {save_dir}/{save_weight}_{hidden_size}[_moe] (default: %(default)s)")
    g.add_argument("--checkpoint_dir", default=NOT_GIVEN, type=CHECKPOINT_DIR,
                   help="where resume files go (default: checkpoints; ../checkpoints when run from a MiniMind "
                        "checkout's trainer/, as MiniMind's)")
    g.add_argument("--save_interval", type=int, default=save_interval, help="save every N optimizer steps (default: %(default)s)")
    g.add_argument("--keep_checkpoints", type=int, default=1,
                   help="resume files to keep: 1 keeps the latest only; K keeps the K latest as "
                        "..._resume_step{N}.pth too, and resuming falls back to them (default: %(default)s)")
    g.add_argument("--from_resume", type=int, choices=[0, 1], default=0,
                   help="1: continue from the resume file in --checkpoint_dir if there is one (default: 0)")
    g.add_argument("--log_interval", type=int, default=log_interval, help="log every N optimizer steps (default: %(default)s)")
    g.add_argument("--use_wandb", action="store_true", help="log to wandb (offline if not logged in)")
    g.add_argument("--wandb_project", default="MiniAlign", help="wandb project (default: %(default)s)")
    add_eval_args(parser)


def common_problems(args) -> list[str]:
    """What is wrong with the shared flags (add_common_args), evaluation's included."""
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
    return problems + eval_arg_problems(args)
