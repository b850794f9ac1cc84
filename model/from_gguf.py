"""Import a GGUF file as a Hugging Face model folder that every script takes as --from_weight.

    python -m model.from_gguf SmolLM2-135M-Instruct.Q4_1.gguf --out out/smollm2
    python -m model.from_gguf FILE.gguf --out DIR --dtype bfloat16

transformers reads the file (``from_pretrained(folder, gguf_file=name)``, which needs the
``gguf`` package): quantised weights are dequantised (to fp32 unless --dtype says otherwise),
and the tokenizer, its special tokens and the chat template come from the file's metadata.
The folder is written atomically, like ``model.export``'s.
"""
from __future__ import annotations

import argparse
import os

import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

from core.errors import UserError, run_cli
from model.export import export

GGUF_MAGIC = b"GGUF"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def arg_parser() -> argparse.ArgumentParser:
    """The script's flags (docs/flags.md is made from them)."""
    p = argparse.ArgumentParser(description="Convert a GGUF file into a Hugging Face model folder.")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("--out", required=True, help="folder to write; must not exist unless --overwrite")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="dtype of the written weights (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def parse_args(argv=None):
    return arg_parser().parse_args(argv)


def gguf_architecture(path: str) -> str:
    """The file's ``general.architecture``; UserError when it is no GGUF or transformers cannot read it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; give a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UserError(f"{path}: not a GGUF file (it does not start with 'GGUF'); give a .gguf model file")
    try:
        field = GGUFReader(path).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:
        raise UserError(f"{path}: cannot read its GGUF header ({e.__class__.__name__}: {str(e)[:200]}); "
                        f"the file may be cut short: copy it again")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UserError(f"{path}: architecture {arch!r} cannot be read by transformers' GGUF loader "
                        f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    return arch


def load_gguf(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a GGUF file, through transformers' own GGUF loader."""
    folder, name = os.path.split(os.path.abspath(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except Exception as e:
        raise UserError(f"{path}: transformers cannot load it ({e.__class__.__name__}: {str(e).splitlines()[0][:300]})")
    # transformers marks a GGUF-loaded model as quantised and will not save it: the weights are already
    # dequantised, so they move into a plain model of the same config, strictly.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval(), tokenizer


def convert(gguf: str, out: str, dtype: str = "float32", overwrite: bool = False) -> str:
    """Write the Hugging Face folder ``out`` from the GGUF file ``gguf``; the line that says what it wrote."""
    if os.path.exists(out) and not overwrite:
        raise UserError(f"--out {out} already exists; choose another folder or pass --overwrite")
    arch = gguf_architecture(gguf)
    model, tokenizer = load_gguf(gguf, DTYPES[dtype])
    export(model, tokenizer, out)
    n_params = sum(p.numel() for p in model.parameters())
    return (f"wrote {out}: architecture {arch} ({model.config.model_type}), {n_params / 1e6:.2f}M parameters, "
            f"vocabulary {len(tokenizer)}, {dtype}, chat template {'yes' if tokenizer.chat_template else 'none'}")


def main(args):
    print(convert(args.gguf, args.out, args.dtype, args.overwrite))
    return args.out


if __name__ == "__main__":
    run_cli(main, parse_args)
