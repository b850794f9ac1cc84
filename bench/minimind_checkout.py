"""A MiniMind checkout of this project's own making, laid out as MiniMind's repository is, to run
MiniMind's command lines on: random-init weights of MiniMind's architecture (not MiniMind's
trained models), a 6,400-token tokenizer (the shipped one padded with added tokens), and a few
hundred rows of the shipped demo data in MiniMind's DPO and RLAIF formats.

    python bench/minimind_checkout.py /tmp/mm                      # MiniMind's 512 x 8
    python bench/minimind_checkout.py /tmp/mm_small --hidden_size 64 --num_hidden_layers 2

It writes
    DIR/model/tokenizer.json, tokenizer_config.json   6,400 tokens, the chat template inside the config
    DIR/out/full_sft_{H}.pth           dense: a plain fp16 state dict with MiniMind's key names
    DIR/out/full_sft_{H}_moe.pth       MoE: router mlp.gate.weight, each expert stored apart
    DIR/out/lora_identity_{H}.pth      MiniMind LoRA: <module>.lora.A/B.weight, rank 16, square layers
    DIR/dataset/dpo.jsonl              {"chosen": [messages], "rejected": [messages]}
    DIR/dataset/rlaif.jsonl            {"conversations": [user turn, assistant turn "无"]}
    DIR/trainer/                       empty: MiniMind's scripts run from here (--save_dir ../out)
The builders are the tests' too (tests/test_minimind_*.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import LMConfig, build_model, load_tokenizer  # noqa: E402
from model.minimind import minimind_state_dict  # noqa: E402

MM_VOCAB = 6400   # MiniMind's tokenizer size


def tokenizer_of_size(n: int, folder) -> str:
    """The shipped tokenizer padded with added tokens to ``n`` tokens, saved in ``folder`` as
    MiniMind's model/ holds it: tokenizer.json and tokenizer_config.json, the chat template in
    the latter. Returns the folder."""
    tok = load_tokenizer()
    tok.add_tokens([f"<mm_{i}>" for i in range(n - len(tok))])
    assert len(tok) == n
    folder = str(folder)
    tok.save_pretrained(folder)
    template = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(template):                       # transformers 5 writes it apart; MiniMind keeps it inside
        config_path = os.path.join(folder, "tokenizer_config.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        with open(template, encoding="utf-8") as f:
            config["chat_template"] = f.read()
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
        os.remove(template)
    return folder


def random_minimind_model(hidden_size: int = 32, num_hidden_layers: int = 2, vocab_size: int = MM_VOCAB,
                          use_moe: bool = False, num_experts: int = 4, seed: int = 0, std: float | None = None):
    """A randomly initialised model of MiniMind's architecture (transformers Qwen3, Qwen3-MoE with
    ``use_moe``). std: every weight drawn from N(0, std) instead (distinct routing in tests)."""
    torch.manual_seed(seed)
    model = build_model(LMConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_moe=use_moe,
                                 vocab_size=vocab_size, num_experts=num_experts))
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, std)
    return model


def save_minimind_pth(model, path) -> dict[str, torch.Tensor]:
    """``model`` saved as MiniMind's trainer saves it (a plain fp16 state dict, its key names, each
    MoE expert apart); the state dict saved, in fp32."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sd = minimind_state_dict(model)
    torch.save(sd, str(path))
    return {k: v.float() for k, v in sd.items()}


def minimind_lora_pth(model, path, rank: int = 16, names=None, seed: int = 0, std: float = 0.02,
                      prefix: str = "") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A MiniMind LoRA file for ``model`` (model/model_lora.py's save_lora: fp16
    ``<module>.lora.A.weight`` (rank x in) and ``.lora.B.weight`` (out x rank)) on ``names``,
    default every square linear layer as MiniMind's apply_lora picks them; A and B random (B is
    not zero, so merging it changes the model). prefix: "module." as saved under DDP. Returns
    {name: (A, B)} as stored, in fp32."""
    if names is None:
        names = [n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and m.in_features == m.out_features and n != "lm_head"]
    g = torch.Generator().manual_seed(seed)
    sd, out = {}, {}
    for name in names:
        layer = model.get_submodule(name)
        A = (torch.randn(rank, layer.in_features, generator=g) * std).half()
        B = (torch.randn(layer.out_features, rank, generator=g) * std).half()
        sd[f"{prefix}{name}.lora.A.weight"], sd[f"{prefix}{name}.lora.B.weight"] = A, B
        out[name] = A.float(), B.float()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(sd, str(path))
    return out


def minimind_data(dataset_dir, rows: int = 300) -> dict[str, str]:
    """``rows`` lines of the shipped demo data in MiniMind's formats: dpo.jsonl (the demo's own
    pairs, already MiniMind's {"chosen": [...], "rejected": [...]}) and rlaif.jsonl (its RL prompts
    as MiniMind's RLAIF rows, conversations only: the user turn, then an assistant turn "无" that
    the loader drops). Returns {name: path}."""
    os.makedirs(str(dataset_dir), exist_ok=True)
    paths = {}
    with open(os.path.join(ROOT, "dataset", "dpo.jsonl"), encoding="utf-8") as f:
        pairs = [next(f) for _ in range(rows)]
    paths["dpo"] = os.path.join(str(dataset_dir), "dpo.jsonl")
    with open(paths["dpo"], "w", encoding="utf-8") as f:
        f.writelines(pairs)
    paths["rlaif"] = os.path.join(str(dataset_dir), "rlaif.jsonl")
    with open(os.path.join(ROOT, "dataset", "rl.jsonl"), encoding="utf-8") as src, \
            open(paths["rlaif"], "w", encoding="utf-8") as f:
        for _ in range(rows):
            user = json.loads(next(src))["conversations"][0]
            f.write(json.dumps({"conversations": [user, {"role": "assistant", "content": "无"}]},
                               ensure_ascii=False) + "\n")
    return paths


def build_checkout(root, hidden_size: int = 512, num_hidden_layers: int = 8, rows: int = 300,
                   seed: int = 0) -> dict[str, str]:
    """Everything in the module doc, under ``root``. Returns {what: path}."""
    root = str(root)
    h = hidden_size
    written = {"tokenizer": tokenizer_of_size(MM_VOCAB, os.path.join(root, "model"))}
    dense = random_minimind_model(h, num_hidden_layers, seed=seed)
    written["dense"] = os.path.join(root, "out", f"full_sft_{h}.pth")
    save_minimind_pth(dense, written["dense"])
    written["moe"] = os.path.join(root, "out", f"full_sft_{h}_moe.pth")
    save_minimind_pth(random_minimind_model(h, num_hidden_layers, use_moe=True, seed=seed), written["moe"])
    written["lora"] = os.path.join(root, "out", f"lora_identity_{h}.pth")
    minimind_lora_pth(dense, written["lora"], seed=seed)
    written.update(minimind_data(os.path.join(root, "dataset"), rows))
    os.makedirs(os.path.join(root, "trainer"), exist_ok=True)
    written["trainer"] = os.path.join(root, "trainer")
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", help="the checkout to write (created; files in it are overwritten)")
    p.add_argument("--hidden_size", type=int, default=512, help="default: MiniMind's %(default)s")
    p.add_argument("--num_hidden_layers", type=int, default=8, help="default: MiniMind's %(default)s")
    p.add_argument("--rows", type=int, default=300, help="lines of each data file (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.hidden_size <= 0 or a.hidden_size % 8 or a.num_hidden_layers <= 0 or not 0 < a.rows <= 2000:
        sys.exit(f"--hidden_size {a.hidden_size} --num_hidden_layers {a.num_hidden_layers} --rows {a.rows}: give a "
                 f"hidden size that is a positive multiple of 8 (8 heads), at least one layer, and 1..2000 rows")
    written = build_checkout(a.dir, a.hidden_size, a.num_hidden_layers, a.rows, a.seed)
    for what, path in written.items():
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) if os.path.isdir(path) \
            else os.path.getsize(path)
        print(f"{what:9} {path} ({size / 2 ** 20:.1f} MiB)")
    print(f"random-init MiniMind-architecture weights ({a.hidden_size} x {a.num_hidden_layers}, vocabulary "
          f"{MM_VOCAB}), not trained: run MiniMind's command lines from {written['trainer']} with --save_dir ../out")


if __name__ == "__main__":
    main()
