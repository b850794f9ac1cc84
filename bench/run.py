"""This project's training step against TRL's on identical work: seconds per step, tokens per
second, peak memory, and their ratios.

    pip install -r requirements.txt -r bench/requirements.txt
    python bench/run.py --algo dpo                       # the demo SFT model, CPU or the first GPU
    python bench/run.py --algo dpo --model bench/models/qwen3_35m --steps 6 --json
    python bench/run.py --algo dpo --epochs 3 --precompute_ref 1
    python bench/run.py --algo gpo                       # against TRL's GRPOTrainer, same G and lengths
    python bench/run.py --algo ppo                       # PPO's peak memory against DPO's (ours)
    python bench/run.py --algo dpo --scaling             # cost as sequence length and batch double

Both sides get one model folder, the same examples in the same order, the same LoRA (rank,
alpha, every attention and MLP projection, no dropout), batch, maximum length, learning rate and
optimizer (AdamW, clipping at 1.0). Ours is the script's own step (``train_dpo.build(args).one_step``,
``train_gpo``'s for gpo); TRL's is ``trainer.training_step`` plus its optimizer step on batches
from its own data loader: the Trainer loop's logging and callbacks are left out, in TRL's
favour. The two alternate step by step in one process after --warmup steps each; the figures
are medians. Peak memory: on CUDA the tensors' peak per step, in the same process; on CPU each
side runs again alone in a child process and its figure is the resident memory the steps add
(peak RSS minus RSS before the first step), since one process's RSS cannot be split in two.

--epochs E with --precompute_ref 1 (dpo) adds the one forward over the data that computes the
reference log-probs and then counts E epochs of steps without the reference forward; TRL runs its
default (reference with the adapters off, every step). --json prints one line.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_dpo  # noqa: E402  (the project's root is on the path from here)
import train_gpo  # noqa: E402
import train_grpo  # noqa: E402
from dataset.answers import is_correct  # noqa: E402
from dataset.encoding import encode_pairs  # noqa: E402
from dataset.formats import load_pairs, load_prompts  # noqa: E402
from training.order import TrainState  # noqa: E402
from training.run import Run  # noqa: E402

# trl, datasets and accelerate (bench/requirements.txt) are imported where TRL's side is built: the
# project's side, and bench/gpu_check.py that borrows these builders, run without them.

DEMO_MODEL = os.path.join(ROOT, "model", "demo", "full_sft_192")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", choices=["dpo", "gpo", "grpo", "ppo"], required=True)
    p.add_argument("--model", default=DEMO_MODEL, help="a Hugging Face causal LM folder (default: the demo SFT model)")
    p.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if there is one)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="pairs (dpo) or prompts (gpo/grpo) per step (default: %(default)s)")
    p.add_argument("--max_len", type=int, default=256, help="dpo: longest prompt + response (default: %(default)s)")
    p.add_argument("--prompt_len", type=int, default=0,
                   help="join demo questions into prompts of about this many tokens, the last one being the question "
                        "answered (0: the demo prompts as they are)")
    p.add_argument("--num_generations", type=int, default=4, help="gpo/grpo: G (default: %(default)s)")
    p.add_argument("--max_gen_len", type=int, default=32, help="gpo/grpo: completion length (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=1, help="dpo: epochs the totals are counted over (default: %(default)s)")
    p.add_argument("--precompute_ref", type=int, choices=[0, 1], default=0)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--scaling", action="store_true", help="the table of cost as sequence length and batch double")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--side", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)   # memory child process
    return p.parse_args(argv)


# ---------------------------------------------------------------- data
def lengthened(rows: list[dict], n: int, prompt_len: int, tokenizer) -> list[dict]:
    """n rows from ``rows`` (cycling); with prompt_len, each row's question comes after other
    rows' questions, joined up to about prompt_len tokens, so its answer stays the row's own."""
    out, i = [], 0
    while len(out) < n:
        row = rows[i % len(rows)]
        prompt, j = row["prompt"][-1]["content"], i + 1
        while prompt_len and len(tokenizer(prompt)["input_ids"]) < prompt_len:
            prompt = rows[j % len(rows)]["prompt"][-1]["content"] + " " + prompt
            j += 1
        out.append({**row, "prompt": [{"role": "user", "content": prompt}]})
        i += 1
    return out


def dpo_rows(n: int, prompt_len: int, tokenizer) -> list[dict]:
    """n preference pairs from the demo file, in the conversational format both sides read."""
    pairs = [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
              "rejected": [{"role": "assistant", "content": p["rejected"]}]}
             for p in load_pairs(os.path.join(ROOT, "dataset", "dpo.jsonl"))]
    return lengthened(pairs, n, prompt_len, tokenizer)


def group_rows(n: int, prompt_len: int, tokenizer) -> list[dict]:
    """n prompts (with their answers) from the demo RL file."""
    prompts = [{"prompt": p["prompt"], "answer": p.get("answer")}
               for p in load_prompts(os.path.join(ROOT, "dataset", "rl.jsonl"))]
    return lengthened(prompts, n, prompt_len, tokenizer)


def write_jsonl(rows: list[dict], path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------- ours
def ours_dpo(a, data: str, tmp: str):
    args = train_dpo.parse_args(["--from_weight", a.model, "--data_path", data, "--batch_size", str(a.batch_size),
                                 "--max_seq_len", str(a.max_len), "--device", a.device, "--learning_rate",
                                 str(a.learning_rate), "--epochs", "1", "--save_dir", tmp, "--checkpoint_dir", tmp,
                                 "--precompute_ref", str(a.precompute_ref), "--dtype", "bfloat16",
                                 "--logp_reduce", "sum", "--beta", "0.1",         # TRL's: summed log-probs
                                 "--rpo_alpha", "0"])                             # and no NLL term
    return timed_steps(train_dpo.build(args))


def timed_steps(job):
    """(step, batches per epoch) of a training.loop.Job: step() runs one training step at the peak
    learning rate, returns its tokens."""
    state = TrainState()

    def step():
        _, tokens = job.one_step(state)
        return tokens
    return step, job.order.batches_per_epoch


def ours_group(a, data: str, tmp: str):
    module = train_gpo if a.algo == "gpo" else train_grpo
    extra = ["--reward_funcs", "accuracy"] if a.algo == "grpo" else []
    args = module.parse_args(["--from_weight", a.model, "--data_path", data, "--batch_size", str(a.batch_size),
                              "--num_generations", str(a.num_generations), "--max_gen_len", str(a.max_gen_len),
                              "--device", a.device, "--learning_rate", str(a.learning_rate), "--save_dir", tmp,
                              "--checkpoint_dir", tmp, "--dtype", "bfloat16", "--beta", "0.02",
                              "--accumulation_steps", "1",                       # the whole step in one forward, as TRL's
                              "--max_seq_len", str(max(256, 2 * a.prompt_len + a.max_gen_len)), *extra])
    return timed_steps(module.build(args))


# ---------------------------------------------------------------- TRL
def trl_common(a, tmp: str) -> dict:
    cuda = a.device.startswith("cuda")
    return dict(output_dir=tmp, per_device_train_batch_size=a.batch_size, learning_rate=a.learning_rate,
                max_grad_norm=1.0, weight_decay=0.0, report_to=[], logging_steps=10 ** 6, save_strategy="no",
                use_cpu=not cuda, bf16=cuda, seed=42, dataloader_num_workers=0, max_steps=10 ** 6,
                lr_scheduler_type="cosine", warmup_steps=0, disable_tqdm=True)


def trl_model(a):
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    return model, tok, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def trl_stepper(trainer):
    """One TRL step: training_step (forward, loss, backward) on its next batch, then the optimizer."""
    trainer.create_optimizer_and_scheduler(num_training_steps=10 ** 6)
    trainer.current_gradient_accumulation_steps = 1       # set by Trainer's own loop, which is left out
    batches = iter(trainer.get_train_dataloader())
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    tokens_seen = [0]

    def step():
        batch = next(batches)
        trainer.model.train()
        trainer.training_step(trainer.model, batch, None)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad(set_to_none=True)
        if isinstance(batch, dict):          # DPO: the padded chosen + rejected rows
            return sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask") and hasattr(v, "sum"))
        seen, start = trainer.state.num_input_tokens_seen, tokens_seen[0]   # GRPO counts prompt + completion tokens
        tokens_seen[0] = seen
        return seen - start
    return step


def trl_dpo(a, rows: list[dict], tmp: str):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    model, tok, lora = trl_model(a)
    cfg = DPOConfig(**trl_common(a, tmp), max_length=a.max_len, beta=0.1, loss_type=["sigmoid"],
                    precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora)
    return trl_stepper(trainer)


def trl_grpo(a, prompts: list[dict], tmp: str):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    model, tok, lora = trl_model(a)

    def accuracy(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if is_correct(t, x) else 0.0 for t, x in zip(texts, answer)]

    n = a.batch_size * a.num_generations
    common = {**trl_common(a, tmp), "per_device_train_batch_size": n}
    cfg = GRPOConfig(**common, num_generations=a.num_generations, max_completion_length=a.max_gen_len,
                     steps_per_generation=1, num_iterations=1, beta=0.02, epsilon=0.2, temperature=1.0,
                     scale_rewards="group", loss_type="dapo", top_k=0, top_p=1.0)
    rows = [{"prompt": p["prompt"], "answer": p.get("answer")} for p in prompts]
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy], args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, peft_config=lora)
    return trl_stepper(trainer)


# ---------------------------------------------------------------- measuring
class Meter:
    """Seconds and tokens of each timed step; the peak memory of each step on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.times, self.tokens, self.peaks = [], [], []

    def run(self, step, timed: bool):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        tokens = step()
        if self.cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if timed:
            self.times.append(dt)
            self.tokens.append(tokens)
            if self.cuda:
                self.peaks.append(torch.cuda.max_memory_allocated() / 2 ** 20)

    def summary(self) -> dict:
        s = statistics.median(self.times)
        return {"s_per_step": s, "tokens_per_step": statistics.median(self.tokens),
                "tokens_per_sec": statistics.median(self.tokens) / s,
                "peak_mb": max(self.peaks) if self.peaks else None}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def reset_peak_rss() -> None:
    """Linux: make the peak resident set size (VmHWM) start again from the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def build_sides(a, tmp: str):
    """{"ours": (step, batches_per_epoch), "trl": step} for --algo (one side only with --side)."""
    tok = AutoTokenizer.from_pretrained(a.model)
    n = a.batch_size * (a.steps + a.warmup)
    if a.algo == "dpo":
        rows, name, ours, trl = dpo_rows(n, a.prompt_len, tok), "pairs.jsonl", ours_dpo, trl_dpo
    else:
        rows, name, ours, trl = group_rows(n, a.prompt_len, tok), "prompts.jsonl", ours_group, trl_grpo
    data = write_jsonl(rows, os.path.join(tmp, name))      # ours reads the file, TRL the same rows
    sides = {}
    if a.side in (None, "ours"):
        sides["ours"] = ours(a, data, os.path.join(tmp, "ours"))
    if a.side in (None, "trl"):
        sides["trl"] = trl(a, rows, os.path.join(tmp, "trl"))
    return sides


def memory_child(a) -> dict:
    """--side: one side alone; the resident memory its steps add."""
    with tempfile.TemporaryDirectory() as tmp:
        step = build_sides(a, tmp)[a.side]
        step = step[0] if a.side == "ours" else step
        gc.collect()
        before = rss_mb()
        reset_peak_rss()
        for _ in range(a.warmup + a.steps):
            step()
        return {"peak_mb": peak_rss_mb() - before, "rss_before_mb": before}


def cpu_memory(a, side: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--side", side]
    argv = [x for x in argv if x not in ("--json", "--scaling")]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"the {side} memory run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matmul_params(model_dir: str) -> int:
    """Parameters a token's forward multiplies by: every weight but the input embedding (the
    output head counts even when its matrix is tied to the embedding), from the config alone."""
    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return total - embed + (embed if getattr(cfg, "tie_word_embeddings", False) else 0)


def mfu(a, s_per_step: float, tokens: float) -> float | None:
    """Model FLOPs utilisation on CUDA: 6 x matmul parameters x tokens per step (the usual
    forward + backward count; LoRA's cheaper backward, the reference forward and sampling are
    not counted separately), over the GPU's dense bf16 peak."""
    peak = dense_bf16_peak(a.device)
    return None if peak is None else 6 * matmul_params(a.model) * tokens / s_per_step / peak


def dense_bf16_peak(device: str) -> float | None:
    """The GPU's dense bf16 FLOP/s by its datasheet (H100/H200 SXM 989e12, A100 312e12); None
    for a CPU or a GPU not listed."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return 989e12 if ("H100" in name or "H200" in name) else 312e12 if "A100" in name else None


def measure_sides(a) -> tuple[dict, dict, int]:
    """(ours, TRL, batches per epoch): each side's Meter.summary() over --steps timed steps after
    --warmup, the two alternating step by step in this process (peak memory: CUDA only)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        sides = build_sides(a, tmp)
        (ours_step, batches), trl_step = sides["ours"], sides["trl"]
        meters = {"ours": Meter(a.device), "trl": Meter(a.device)}
        for i in range(a.warmup + a.steps):          # interleaved: ours, TRL, ours, TRL, ...
            meters["ours"].run(ours_step, timed=i >= a.warmup)
            meters["trl"].run(trl_step, timed=i >= a.warmup)
    return meters["ours"].summary(), meters["trl"].summary(), batches


def compare(a) -> dict:
    ours, trl, batches = measure_sides(a)
    if not a.device.startswith("cuda"):
        ours["peak_mb"], trl["peak_mb"] = cpu_memory(a, "ours")["peak_mb"], cpu_memory(a, "trl")["peak_mb"]
    out = {"algo": a.algo, "model": os.path.relpath(a.model, ROOT) if a.model.startswith(ROOT) else a.model,
           "device": a.device, "batch_size": a.batch_size, "steps": a.steps,
           "ours_s_per_step": ours["s_per_step"], "trl_s_per_step": trl["s_per_step"],
           "speedup": trl["s_per_step"] / ours["s_per_step"],
           "ours_tokens_per_sec": ours["tokens_per_sec"], "trl_tokens_per_sec": trl["tokens_per_sec"],
           "ours_tokens_per_step": ours["tokens_per_step"], "trl_tokens_per_step": trl["tokens_per_step"],
           "ours_peak_mb": ours["peak_mb"], "trl_peak_mb": trl["peak_mb"],
           "mem_ratio": ours["peak_mb"] / trl["peak_mb"],
           "peak_memory": "CUDA allocated, per step" if a.device.startswith("cuda") else "RSS added by the steps"}
    if a.algo == "dpo":
        out.update(max_len=a.max_len, epochs=a.epochs, precompute_ref=a.precompute_ref)
        if a.epochs > 1 or a.precompute_ref:
            # the run over the benchmark's data: ours = reference pass (once) + steps; TRL = steps
            ours_total = a.epochs * batches * ours["s_per_step"]
            if a.precompute_ref:
                ours_total += precompute_seconds(a)
            out.update(ours_run_s=ours_total, trl_run_s=a.epochs * batches * trl["s_per_step"],
                       speedup=a.epochs * batches * trl["s_per_step"] / ours_total)
    else:
        out.update(num_generations=a.num_generations, max_gen_len=a.max_gen_len)
    m = mfu(a, ours["s_per_step"], ours["tokens_per_step"])
    if m is not None:
        out.update(ours_mfu=m, trl_mfu=mfu(a, trl["s_per_step"], trl["tokens_per_step"]))
    return out


def precompute_seconds(a) -> float:
    """The one reference pass of --precompute_ref 1 over the benchmark's pairs, timed alone."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = dpo_rows(a.batch_size * (a.steps + a.warmup), a.prompt_len, AutoTokenizer.from_pretrained(a.model))
        data = write_jsonl(rows, os.path.join(tmp, "pairs.jsonl"))
        args = train_dpo.parse_args(["--from_weight", a.model, "--data_path", data, "--device", a.device,
                                     "--save_dir", tmp, "--checkpoint_dir", tmp, "--max_seq_len", str(a.max_len)])
        run = Run(args, "dpo", reference="shared")
        items, _ = encode_pairs(load_pairs(data), run.tokenizer, a.max_len, data)
        train_dpo.precompute_reference(run, items, 2 * a.batch_size, "sum")      # warm-up
        t0 = time.perf_counter()
        train_dpo.precompute_reference(run, items, 2 * a.batch_size, "sum")
        return time.perf_counter() - t0


def ppo_memory(a) -> dict:
    """PPO's peak memory against DPO's on the same model and batch (ours only: the PPO target)."""
    spec = importlib.util.spec_from_file_location("peak_memory", os.path.join(ROOT, "bench", "peak_memory.py"))
    pm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pm)
    common = ["--batch_size", str(a.batch_size), "--from_weight", a.model]
    dpo = pm.peak("train_dpo.py", common, a.steps + a.warmup, a.device)["peak_mem_gb"]
    ppo = pm.peak("train_ppo.py", common + ["--num_generations", "1", "--max_gen_len", str(a.max_gen_len),
                                            "--accumulation_steps", "1"],             # the whole batch, as DPO's
                  a.steps + a.warmup, a.device)["peak_mem_gb"]
    return {"algo": "ppo", "model": a.model, "device": a.device, "batch_size": a.batch_size,
            "dpo_peak_mb": dpo * 1024, "ppo_peak_mb": ppo * 1024, "ppo_over_dpo": ppo / dpo}


def scaling(a) -> list[dict]:
    """Seconds per step and peak memory as the sequence length and the batch double."""
    rows = []
    if a.algo == "dpo":
        grid = [("prompt_len", v, ["--prompt_len", str(v), "--max_len", str(2 * v + 64)]) for v in (64, 128, 256)] + \
               [("batch_size", v, ["--batch_size", str(v)]) for v in (4, 8, 16)]
    else:
        grid = [("max_gen_len", v, ["--max_gen_len", str(v)]) for v in (16, 32, 64)] + \
               [("batch_size", v, ["--batch_size", str(v)]) for v in (2, 4, 8)]
    for name, value, extra in grid:
        argv = [sys.executable, os.path.abspath(__file__), "--algo", a.algo, "--model", a.model, "--device", a.device,
                "--steps", str(a.steps), "--warmup", str(a.warmup), "--json", *extra]
        if name != "batch_size":
            argv += ["--batch_size", str(a.batch_size)]
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
        rows.append({"doubling": name, "value": value, **json.loads(proc.stdout.strip().splitlines()[-1])})
    return rows


def main(argv=None):
    a = parse_args(argv)
    a.device = a.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    a.model = os.path.abspath(a.model)
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        print(f"error: --model {a.model}: not a Hugging Face model folder (no config.json); "
              f"make one with python bench/make_model.py", file=sys.stderr)
        sys.exit(2)                     # bad input, as the training scripts report it
    if a.side:
        print(json.dumps(memory_child(a)))
        return
    if a.algo == "ppo":
        result = ppo_memory(a)
        print(json.dumps(result) if a.json else
              f"peak memory, {a.model}, batch {a.batch_size}: DPO {result['dpo_peak_mb']:.0f} MB, "
              f"PPO {result['ppo_peak_mb']:.0f} MB ({result['ppo_over_dpo']:.2f}x)")
        return
    if a.scaling:
        rows = scaling(a)
        print(f"| doubling | value | ours s/step | TRL s/step | speedup | ours tokens/step | ours peak MB | TRL peak MB |\n"
              f"|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['doubling']} | {r['value']} | {r['ours_s_per_step']:.3f} | {r['trl_s_per_step']:.3f} | "
                  f"{r['speedup']:.2f} | {r['ours_tokens_per_step']:.0f} | {r['ours_peak_mb']:.0f} | {r['trl_peak_mb']:.0f} |")
        return
    result = compare(a)
    if a.json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}")


if __name__ == "__main__":
    main()
