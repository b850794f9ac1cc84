"""The flags that name a model, shared by every script that loads one (training, eval_align,
chat, export): --from_weight, --tokenizer_path, the sizes, --lora_weight and --save_dir, where
names are looked up. Run from a MiniMind checkout's ``trainer/``, the folder flags default to
MiniMind's own (``../out``, ``../checkpoints``).
"""
from __future__ import annotations

import os

from core.runtime import print0


def minimind_trainer_dir() -> str | None:
    """The MiniMind checkout whose ``trainer/`` this is (``../out`` beside a tokenizer in
    ``../model``), or None."""
    here = os.getcwd()
    if os.path.basename(here) == "trainer" and os.path.isdir(os.path.join(here, "..", "out")) and any(
            os.path.isfile(os.path.join(here, "..", "model", f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return os.path.dirname(here)
    return None


NOT_GIVEN = "\0default"   # argparse passes a string default through ``type`` only when the flag is not given


def dir_default(flag: str, ours: str, minimind: str, what: str):
    """An argparse ``type`` for a folder flag: the given value; if not given, ``ours``, or, run from a
    MiniMind checkout's trainer/, MiniMind's own ``minimind`` (said once)."""
    def convert(value: str) -> str:
        if value != NOT_GIVEN:
            return value
        checkout = minimind_trainer_dir()
        if checkout is None:
            return ours
        print0(f"{flag} {minimind}: run from a MiniMind checkout's trainer/ ({checkout}), as MiniMind's scripts; {what}")
        return minimind
    return convert


def default_save_dir() -> str:
    """``out``; but run from a MiniMind checkout's ``trainer/``, ``../out``, as MiniMind's scripts:
    its weights are found by name there (``--from_weight full_sft``), not the shipped demo's, and
    results go beside them."""
    return _SAVE_DIR(NOT_GIVEN)


_SAVE_DIR = dir_default("--save_dir", "out", os.path.join("..", "out"),
                         "names are looked up there first and results saved there")


def add_save_dir_arg(parser, help_text: str) -> None:
    """--save_dir, default ``default_save_dir()`` (worked out, and said, only when the flag is not given)."""
    parser.add_argument("--save_dir", default=NOT_GIVEN, type=_SAVE_DIR,
                        help=help_text + " (default: out; ../out when run from a MiniMind checkout's trainer/)")


def add_model_args(group, from_weight: str | None, from_weight_help: str) -> None:
    """The flags that say which model to load: --from_weight, --tokenizer_path and the sizes.
    from_weight None (the scripts that take --lora_weight): the base --lora_weight recorded."""
    default = " (default: the base --lora_weight records, else full_sft)" if from_weight is None else \
        " (default: %(default)s)"
    group.add_argument("--from_weight", default=from_weight, help=from_weight_help + default)
    group.add_argument("--base_weight", default="full_sft",
                       help="when --from_weight is a MiniMind LoRA file (lora_identity_512.pth): the base it is "
                            "merged into, as W + B A (default: %(default)s)")
    group.add_argument("--tokenizer_path", default=None,
                       help="tokenizer folder (default: the one that goes with the weights: their folder's own, "
                            "a MiniMind checkout's model/ for <repo>/out/x.pth, an adapter's base's; the shipped "
                            "model/ only for the shipped weights and --from_weight none)")
    group.add_argument("--eos_token", default=None,
                       help="the token that ends an assistant turn, e.g. '<|im_end|>' (default: read off the chat "
                            "template; responses are trained to end with it and sampling stops at it, at the "
                            "tokenizer's eos and at the model's own stop tokens)")
    group.add_argument("--hidden_size", type=int, default=None,
                       help="model width (default: the checkpoint's own; with --from_weight none, MiniMind's 512, "
                            "or the demo's 192 in train_sft.py)")
    group.add_argument("--num_hidden_layers", type=int, default=None,
                       help="number of layers (default: the checkpoint's own; with --from_weight none, MiniMind's 8, "
                            "or the demo's 4 in train_sft.py)")
    group.add_argument("--use_moe", type=int, choices=[0, 1], default=None,
                       help="mixture-of-experts model (default: the checkpoint's own; 0 with --from_weight none)")
    group.add_argument("--num_experts", type=int, default=None,
                       help="MoE: experts per layer (default: the checkpoint's own; MiniMind's 4 for a new model)")
    group.add_argument("--num_experts_per_tok", type=int, default=None,
                       help="MoE: experts each token is routed to (default: MiniMind's 1)")
    group.add_argument("--norm_topk_prob", type=int, choices=[0, 1], default=None,
                       help="MoE: 1 renormalises the top-k router weights to sum to 1 (default: MiniMind's 1)")
    group.add_argument("--aux_loss_coef", type=float, default=None,
                       help="MoE: coefficient of the router's load-balancing loss, added while the router trains "
                            "(default: MiniMind's 5e-4; 0 turns it off)")


def add_lora_weight_arg(parser) -> None:
    """--lora_weight of the scripts that load a model to use it (eval_align, chat, export)."""
    parser.add_argument("--lora_weight", default=None,
                        help="adapter (name, folder, or MiniMind LoRA file) merged on top of --from_weight; without "
                             "--from_weight, onto the base it records (a MiniMind LoRA file: --base_weight, looked "
                             "up beside it first); its own tokenizer goes first")


def add_inference_model_args(parser, from_weight_help: str) -> None:
    """The model flags of the scripts that load a model to use it (eval_align, chat, export):
    add_model_args with no --from_weight default, --lora_weight and --save_dir."""
    add_model_args(parser, None, from_weight_help)
    add_lora_weight_arg(parser)
    add_save_dir_arg(parser, "where names are looked up first, then the shipped demo")
