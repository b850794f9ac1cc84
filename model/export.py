"""Merge an adapter into its base and write a full Hugging Face model folder.

    python -m model.export --lora_weight dpo --out out/dpo_merged            # onto the base the adapter records
    python -m model.export --from_weight full_sft --lora_weight out/dpo_192 --out out/dpo_merged
    python -m model.export --from_weight lora_identity --out out/identity_merged   # an adapter alone:
                                                                                  # merged into its recorded base
    python -m model.export --from_weight dpo --format minimind --out ../minimind/out --name full_sft
                                                           # MiniMind's own .pth: out/full_sft_512[_moe].pth

The folder (config.json, model.safetensors, and the tokenizer that goes with the weights: an
adapter's own copy, else its base's; see model.loading.choose_tokenizer) loads with
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` as it is, and
as ``--from_weight`` of every script here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):   # run by its path (python ../minialign/model/export.py): the project root, not model/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from core.errors import UserError, check_args, run_cli  # noqa: E402
from core.files import atomic_dir, write_tensor_files  # noqa: E402
from model.config import weight_name  # noqa: E402
from model.flags import add_inference_model_args  # noqa: E402
from model.loading import load_for_inference  # noqa: E402
from model.minimind import minimind_state_dict  # noqa: E402


def arg_parser() -> argparse.ArgumentParser:
    """The script's flags (docs/flags.md is made from them)."""
    p = argparse.ArgumentParser(description="Merge a LoRA adapter into its base; write a Hugging Face model folder.")
    add_inference_model_args(p, "base model (name, path), or an adapter alone, merged into the base it records")
    p.add_argument("--out", required=True, help="folder to write; must not exist unless --overwrite "
                                                "(--format minimind: the folder the .pth goes in)")
    p.add_argument("--format", choices=["hf", "minimind"], default="hf",
                   help="hf: a Hugging Face model folder; minimind: MiniMind's {name}_{hidden_size}[_moe].pth "
                        "(fp16, its key names, MoE experts stored apart) that MiniMind's scripts load "
                        "(default: %(default)s)")
    p.add_argument("--name", default="full_sft", help="--format minimind: the file's name before _{hidden_size} "
                                                      "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def parse_args(argv=None):
    return arg_parser().parse_args(argv)


def export(model, tokenizer, out: str, meta: dict | None = None, extra_tensors: dict | None = None) -> None:
    """Write model and tokenizer (and ``meta`` as minialign.json, and each ``{file: tensors}``
    of extra_tensors as a safetensors file) to ``out`` atomically."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_tensor_files(tmp, extra_tensors)
        if meta is not None:
            with open(os.path.join(tmp, "minialign.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, ensure_ascii=False)


def export_minimind(model, lm_config, out_dir: str, name: str, overwrite: bool = False) -> str:
    """Write ``model`` as MiniMind's ``{out_dir}/{name}_{hidden}[_moe].pth``; its path."""
    path = os.path.join(out_dir, weight_name(name, lm_config.hidden_size, lm_config.use_moe) + ".pth")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} already exists; choose another --name or --out, or pass --overwrite")
    sd = minimind_state_dict(model)
    os.makedirs(out_dir, exist_ok=True)
    torch.save(sd, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def export_problems(args) -> list[str]:
    """What is wrong with the flags: a Hugging Face --out that exists, without --overwrite."""
    if args.format == "hf" and os.path.exists(args.out) and not args.overwrite:
        return [f"--out {args.out} already exists; choose another folder or pass --overwrite"]
    return []


def main(args):
    check_args(args, export_problems)
    if args.format == "minimind":
        model, _, lm_config = load_for_inference(args)
        path = export_minimind(model, lm_config, args.out, args.name, args.overwrite)
        print(f"wrote {path} (MiniMind's layout, fp16; put the tokenizer that goes with it in MiniMind's model/)")
        return path
    model, tokenizer, lm_config = load_for_inference(args)
    export(model, tokenizer, args.out)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"hidden_size {lm_config.hidden_size}, {lm_config.num_hidden_layers} layers)")
    return args.out


if __name__ == "__main__":
    run_cli(main, parse_args)
