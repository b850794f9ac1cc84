"""Peak memory and step time of a DPO and a GPO step on a model with a Qwen-sized vocabulary
(151,936 tokens), with the output head scoring responses in chunks (model.logprobs.
HEAD_CHUNK_LOGITS, the default) against the whole (positions x vocabulary) block at once (0).

    python bench/large_vocab.py                        # CPU or the first GPU; a random Qwen3, 2 layers
    python bench/large_vocab.py --hidden_size 512 --steps 5 --json out/large_vocab.json

Each (algorithm, head) runs alone in a child process (bench/run.py's own step of
train_dpo / train_gpo, LoRA on every projection): after --warmup steps its peak memory is reset
and --steps steps are timed. Peak memory: on CUDA the tensors' peak, on CPU the resident memory
the steps add (peak RSS minus RSS before them). Target: chunked at least 30% lower peak, step
time within 10%.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import run  # noqa: E402  (bench/run.py)
from make_model import save_random_model  # noqa: E402
from model import logprobs  # noqa: E402

HEADS = {"whole block": 0, "chunked": None}     # HEAD_CHUNK_LOGITS: 0, or the default


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab_size", type=int, default=151936)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_hidden_layers", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=8, help="pairs (dpo) or prompts (gpo) per step (default: %(default)s)")
    p.add_argument("--prompt_len", type=int, default=64, help="prompt tokens, about (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if there is one)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", nargs=3, metavar=("ALGO", "HEAD", "MODEL"), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_args(a, algo: str, model: str):
    """bench/run.py's arguments for our side of ``algo`` on ``model``."""
    return run.parse_args(["--algo", algo, "--model", model, "--batch_size", str(a.batch_size), "--steps", str(a.steps),
                           "--warmup", str(a.warmup), "--prompt_len", str(a.prompt_len), "--max_len", "1024",
                           "--side", "ours"] + (["--device", a.device] if a.device else []))


def child(a) -> dict:
    """One (algorithm, head) alone: seconds per step (median) and the peak memory its steps add."""
    algo, head, model = a.child
    if HEADS[head] is not None:
        logprobs.HEAD_CHUNK_LOGITS = HEADS[head]
    ra = run_args(a, algo, model)
    ra.device = ra.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    cuda = ra.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        step = run.build_sides(ra, tmp)["ours"][0]
        for _ in range(a.warmup):
            step()
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2 ** 20
        else:
            before = run.rss_mb()
            run.reset_peak_rss()
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else run.peak_rss_mb()
    return {"s_per_step": statistics.median(times), "peak_mb": peak - before, "device": ra.device}


def main(argv=None):
    a = parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        n = save_random_model(model, a.hidden_size, a.num_hidden_layers, vocab_size=a.vocab_size)
        print(f"random Qwen3: {n / 1e6:.1f}M parameters, vocabulary {a.vocab_size}, hidden {a.hidden_size}, "
              f"{a.num_hidden_layers} layers; batch {a.batch_size}, prompts of about {a.prompt_len} tokens", flush=True)
        for algo in ("dpo", "gpo"):
            for head in HEADS:
                argv_child = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                              "--child", algo, head, model]
                proc = subprocess.run(argv_child, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    sys.exit(f"error: the {algo} run with the {head} head failed:\n{proc.stderr[-3000:]}")
                results[f"{algo} / {head}"] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"  {algo} / {head}: {results[f'{algo} / {head}']}", flush=True)
    device = next(iter(results.values()))["device"]
    kind = "CUDA allocated" if device.startswith("cuda") else "RSS added"
    print(f"\n| step | head | peak MiB ({kind}) | s/step | peak vs whole | time vs whole |\n|---|---|---|---|---|---|")
    ok = True
    for algo in ("dpo", "gpo"):
        whole = results[f"{algo} / whole block"]
        for head in HEADS:
            r = results[f"{algo} / {head}"]
            pr, tr = r["peak_mb"] / whole["peak_mb"], r["s_per_step"] / whole["s_per_step"]
            print(f"| {algo} | {head} | {r['peak_mb']:.0f} | {r['s_per_step']:.3f} | {pr:.2f} | {tr:.2f} |")
            if head == "chunked":
                ok &= pr <= 0.7 and tr <= 1.1
    print(f"target (chunked: peak <= 0.70 of the whole block's, time <= 1.10): {'ok' if ok else 'NOT REACHED'}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"args": {k: v for k, v in vars(a).items() if k != "child"}, "results": results}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
