"""The GPU path in one prepared check: correctness in bf16 and fp32, the packed attention's
kernel and speed, throughput and MFU on a 0.46B shape, sampling against ``generate``, ratios to TRL.

    python bench/gpu_check.py --out gpu_check.json                 # all of it, sized for about 5 minutes on one H200
    python bench/gpu_check.py --only packed,throughput             # part of it (--only may repeat)
    python bench/gpu_check.py --device cpu --tiny --out /tmp/g.json   # the same code paths in seconds on CPU

Sections (--only): correctness, packed, throughput, trl. A section that fails records its error in
the JSON and the check goes on to the next; the JSON is rewritten after every section, so a run
cut short keeps what it measured. The table printed last holds every figure of the JSON.

1. correctness: every training script (sft, reward, dpo, gpo, grpo, ppo) runs a few steps on the
   shipped demo in bf16 and in fp32, in this process, and once more in fp32 on CPU: the fp32
   first-step loss must equal the CPU's within 1e-4 (the RL scripts sample with --top_k 1, so both
   devices draw the same tokens; LoRA's B starts at 0, so the first step does not depend on the
   device's random init; on --device cpu one run serves all three). Then train_dpo.py runs in a child process that is killed (SIGKILL) once
   it has saved, and --from_resume 1 must continue from the saved step.
2. packed: the tree-mask forward (model.packing) against the plain forward (log-probs within
   bf16 tolerance) and the cached-prompt forward (speed); which sdpa backends take the tree mask
   and which kernel the default lands on; FlexAttention with a block mask for the same tree
   against sdpa with the dense mask.
3. throughput, on a randomly initialised Qwen3 built here (hidden 1024, 24 layers, 16 heads,
   8 KV heads, head dim 64, intermediate 3072, vocabulary 151936: 0.46B parameters): a DPO step
   (train_dpo's own, bf16 autocast, LoRA r=8 on every projection) on 8 pairs of about 512 tokens,
   its tokens per second, peak memory and MFU (formula at dpo_step_flops); a GPO step split into
   sampling and training, sampling tokens per second, and the model's own ``generate`` with a
   static cache (eager, then compiled as transformers does on CUDA) on the same prompts.
4. trl: the same DPO and GPO work through TRL (bench/run.py's builders, alternating steps), as
   ratios; skipped, with the reason, when trl is not installed.

On the device machine (Python 3.12 with its own torch, no internet), the project's pins travel
as wheels (bench/gpu_wheels.txt): once here, ``bash bench/fetch_gpu_wheels.sh``; then one device
call, with carry [".whl"] and timeout 600:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log; python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee $OUT/test_cuda.log

(the check itself, then the CUDA tests; what is left of the 10 minutes is the margin).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Each section imports what it uses inside it: on the device machine (its own torch, the pins as
# wheels) a section whose import fails (no FlexAttention, no trl) records the error in the JSON and
# the other sections still run. The checks before any section need the project's ground floor only.
from core.errors import UserError, run_cli  # noqa: E402
from core.runtime import check_device  # noqa: E402

SECTIONS = ("correctness", "packed", "throughput", "trl")
SCRIPTS = ("train_sft", "train_reward", "train_dpo", "train_gpo", "train_grpo", "train_ppo")
RL_SCRIPTS = ("train_gpo", "train_grpo", "train_ppo")
LOSS_TOLERANCE = 1e-4            # fp32 first-step loss, device against CPU
FIRST_STEP_KEYS = ("loss", "entropy", "values", "completions/mean_length")   # compared where logged
BF16_TOLERANCE = 2e-2            # packed against plain log-probs, ||a - b|| / ||b||, under bf16 autocast
FP32_TOLERANCE = 1e-4            # ... in fp32
LORA_RANK = 8                    # the scripts' default --lora_rank


@dataclass(frozen=True)
class Sizes:
    """Everything the check's work is sized by; FULL on a GPU, TINY (--tiny) in seconds on CPU."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int | None           # None: the project tokenizer's size
    check_steps: int                 # correctness: steps per script run
    check_gen_len: int               # correctness: RL response length
    packed_prompts: int              # packed: P prompts ...
    packed_group: int                # ... G responses each ...
    packed_prompt_len: int           # ... prompts up to this long ...
    packed_response_len: int         # ... responses up to this long
    dpo_pairs: int
    dpo_prompt_len: int              # demo questions joined to about this many tokens
    dpo_max_len: int
    gpo_prompts: int
    num_generations: int
    max_gen_len: int
    gpo_prompt_len: int
    steps: int                       # timed steps (DPO, TRL's DPO), timing repeats
    gpo_steps: int                   # timed GPO steps
    warmup: int


FULL = Sizes(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
             intermediate_size=3072, vocab_size=151936, check_steps=3, check_gen_len=16,
             packed_prompts=16, packed_group=4, packed_prompt_len=384, packed_response_len=128,
             dpo_pairs=8, dpo_prompt_len=470, dpo_max_len=640, gpo_prompts=8, num_generations=8, max_gen_len=128,
             gpo_prompt_len=64, steps=5, gpo_steps=2, warmup=2)
TINY = Sizes(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=192, vocab_size=None, check_steps=2, check_gen_len=6,
             packed_prompts=3, packed_group=2, packed_prompt_len=24, packed_response_len=8,
             dpo_pairs=2, dpo_prompt_len=32, dpo_max_len=96, gpo_prompts=2, num_generations=2, max_gen_len=6,
             gpo_prompt_len=0, steps=2, gpo_steps=1, warmup=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", action="append", default=None,
                   help=f"sections to run, comma-separated or repeated: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--device", default="cuda:0", help="the device checked (default: %(default)s)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the same code paths in seconds (for CPU tests)")
    p.add_argument("--out", default="gpu_check.json", help="the JSON of every figure (default: %(default)s)")
    a = p.parse_args(argv)
    a.sections = [s.strip() for arg in (a.only or [",".join(SECTIONS)]) for s in arg.split(",") if s.strip()]
    return a


def validate(a) -> None:
    """Bad input stops here, as one UserError, before any work: unknown sections, a device this
    machine lacks, an --out that cannot be written."""
    unknown = [s for s in a.sections if s not in SECTIONS]
    if unknown or not a.sections:
        raise UserError(f"--only {','.join(unknown) or repr('')}: unknown section; choose from {', '.join(SECTIONS)}")
    check_device(a.device)
    folder = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(folder):
        raise UserError(f"--out {a.out}: the folder {folder} does not exist")


# ---------------------------------------------------------------- shared helpers
def bench_module(name: str):
    """bench/<name>.py as a module, loaded once (bench/ is a folder of scripts, not a package)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, os.path.join(ROOT, "bench", f"{name}.py"))
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


def bench_run():
    """bench/run.py: its data, builders, Meter and TRL sides are reused here."""
    return bench_module("run")


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn, device: str, warmup: int, reps: int) -> float:
    """Median wall seconds of fn() over ``reps`` calls after ``warmup``, synchronised on CUDA."""
    times = []
    for i in range(warmup + reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attempt(fn, *args) -> dict:
    """fn(*args), or {"error": ..., "traceback": ...} when it raises: a failure is a result too."""
    try:
        return fn(*args)
    except Exception as e:                     # noqa: BLE001 - recorded, and the check goes on
        return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@contextlib.contextmanager
def quiet(log_path: str):
    """stdout and stderr of the block (a training script's bar and lines) into ``log_path``."""
    with open(log_path, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def log_tail(path: str, n: int = 1500) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]


class Context:
    """What sections share: the options, a scratch folder, the bench model (built on first use)."""

    def __init__(self, a, work: str):
        self.a, self.work, self.sizes = a, work, TINY if a.tiny else FULL
        self.device, self.cuda = a.device, a.device.startswith("cuda")
        self._model_dir = None
        self.runs = {}              # (script, device, dtype) -> its metrics (see short_run)

    @property
    def model_dir(self) -> str:
        """A Hugging Face folder of the random Qwen3 of the sizes' shape."""
        if self._model_dir is None:
            s, out = self.sizes, os.path.join(self.work, "bench_model")
            bench_module("make_model").save_random_model(out, s.hidden_size, s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
                                 num_key_value_heads=s.num_key_value_heads, intermediate_size=s.intermediate_size,
                                 vocab_size=s.vocab_size)
            self._model_dir = out
        return self._model_dir

    def load_model(self, lora: bool = False):
        """(model, tokenizer): the bench model on the device, fp32, eval mode; with LoRA adapters."""
        from model import LMConfig, apply_lora, init_model
        model, tok = init_model(LMConfig(), self.model_dir, device=self.device)
        if lora:
            apply_lora(model, rank=LORA_RANK, alpha=16)
        return model, tok

    def autocast(self, dtype: str = "bfloat16"):
        import torch
        from core.runtime import autocast_context
        return autocast_context(torch.device(self.device), dtype)


# ---------------------------------------------------------------- 1. correctness
DEMO_DATA = {"train_sft": "sft.jsonl", "train_reward": "dpo.jsonl", "train_dpo": "dpo.jsonl",
             "train_gpo": "rl.jsonl", "train_grpo": "rl.jsonl", "train_ppo": "rl.jsonl"}
DEMO_LINES = 64       # the first lines of each demo file: a few steps need no more, and loading all costs


def demo_slice(work: str, name: str) -> str:
    """The first DEMO_LINES lines of script ``name``'s demo data file, copied into ``work``."""
    dest = os.path.join(work, f"demo_{DEMO_DATA[name]}")
    if not os.path.exists(dest):
        with open(os.path.join(ROOT, "dataset", DEMO_DATA[name]), encoding="utf-8") as f:
            lines = [line for _, line in zip(range(DEMO_LINES), f)]
        with open(dest, "w", encoding="utf-8") as f:
            f.writelines(lines)
    return dest


def script_argv(name: str, device: str, dtype: str, out: str, sizes: Sizes) -> list[str]:
    """A short run of training script ``name`` on (a slice of) the shipped demo, writing under ``out``."""
    argv = ["--device", device, "--dtype", dtype, "--max_steps", str(sizes.check_steps), "--log_interval", "1",
            "--save_interval", str(10 ** 6), "--save_dir", out, "--checkpoint_dir", out, "--batch_size", "2",
            "--from_weight", "full_sft", "--seed", "0", "--epochs", "1", "--data_path", demo_slice(os.path.dirname(out), name)]
    if name in RL_SCRIPTS:   # greedy (--top_k 1): CPU and the GPU draw the same tokens
        argv += ["--num_generations", "2", "--max_gen_len", str(sizes.check_gen_len), "--top_k", "1"]
    return argv


def metrics_lines(out: str) -> list[dict]:
    """The metrics file a run wrote in ``out``, one dict per logged step."""
    name = next(f for f in sorted(os.listdir(out)) if f.endswith("_metrics.jsonl"))
    with open(os.path.join(out, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_script(name: str, argv: list[str], log: str) -> str:
    """``name``'s main(parse_args(argv)) in this process, its output into ``log``; what it printed."""
    module = importlib.import_module(name)
    start = os.path.getsize(log) if os.path.exists(log) else 0
    try:
        with quiet(log):
            module.main(module.parse_args(argv))
    except BaseException as e:              # a UserError's SystemExit too: report it with the log
        raise RuntimeError(f"{name} {' '.join(argv)} failed ({type(e).__name__}: {e}); log: {log_tail(log)}") from None
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        return f.read()


def short_run(ctx: Context, name: str, device: str, dtype: str) -> list[dict]:
    """The metrics of each step of a short run of ``name`` on ``device`` in ``dtype``. A CPU run is
    fp32 whatever --dtype says (core.runtime), so on CPU each script runs once and its figures
    serve bf16, fp32 and the CPU reference alike: the comparisons still run, on equal numbers."""
    key = (name, device, dtype if device.startswith("cuda") else "float32")
    if key not in ctx.runs:
        out = tempfile.mkdtemp(dir=ctx.work, prefix=f"{name}_{device.replace(':', '')}_{dtype}_")
        run_script(name, script_argv(name, device, dtype, out, ctx.sizes), os.path.join(out, "log.txt"))
        ctx.runs[key] = metrics_lines(out)
    return ctx.runs[key]


def check_script(ctx: Context, name: str) -> dict:
    """bf16 and fp32 on the device, fp32 on CPU: finite losses; the fp32 first step's loss (and,
    where the script logs them, entropy, critic values and response length) equal to the CPU's
    within LOSS_TOLERANCE (relative to the value once it is above 1)."""
    runs = {dtype: short_run(ctx, name, ctx.device, dtype) for dtype in ("bfloat16", "float32")}
    cpu, fp32 = short_run(ctx, name, "cpu", "float32")[0], runs["float32"][0]
    diffs = {k: abs(fp32[k] - cpu[k]) for k in FIRST_STEP_KEYS if k in cpu}
    losses = {dtype: [m["loss"] for m in lines] for dtype, lines in runs.items()}
    finite = all(math.isfinite(x) for v in losses.values() for x in v)
    return {"bf16_losses": losses["bfloat16"], "fp32_losses": losses["float32"], "cpu_first_loss": cpu["loss"],
            "fp32_vs_cpu_first_loss": diffs["loss"], "fp32_vs_cpu_first_step": diffs,
            "bf16_vs_fp32_first_loss": abs(losses["bfloat16"][0] - losses["float32"][0]), "all_finite": finite,
            "ok": finite and all(d <= LOSS_TOLERANCE * max(1.0, abs(cpu[k])) for k, d in diffs.items())}


def resume_round_trip(ctx: Context) -> dict:
    """train_dpo.py in a child process, killed (SIGKILL) once its first resume file is whole,
    then --from_resume 1 in this process: it must resume at the saved step and log the next."""
    from training.checkpoint import load_latest_resume
    out = tempfile.mkdtemp(dir=ctx.work, prefix="resume_")
    argv = script_argv("train_dpo", ctx.device, "float32", out, ctx.sizes)
    log = os.path.join(out, "log.txt")
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_dpo.py"), *argv, "--max_steps", "100000",
                                 "--save_interval", "1"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    resume_files = []
    while not resume_files and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        resume_files = [f for f in os.listdir(out) if f.endswith("_resume.pth")]
    proc.kill()
    code = proc.wait()
    if not resume_files:
        raise RuntimeError(f"train_dpo.py saved no resume file (exit {code}); log: {log_tail(log)}")
    saved = load_latest_resume(os.path.join(out, resume_files[0]), say=lambda *_: None)[0]["step"]
    printed = run_script("train_dpo", argv + ["--max_steps", "100000", "--from_resume", "1",
                                              "--stop_after_steps", str(saved + 2)], log)
    found = re.search(r"resumed from .* at step (\d+)/", printed)
    resumed_at = int(found.group(1)) if found else None
    next_step = metrics_lines(out)[-2]["step"] if len(metrics_lines(out)) >= 2 else None
    return {"killed_exit_code": code, "saved_step": saved, "resumed_at": resumed_at, "next_logged_step": next_step,
            "ok": code != 0 and resumed_at == saved and next_step == saved + 1}


def check_correctness(ctx: Context) -> dict:
    """Section 1: every script in bf16 and fp32 against CPU, and the kill-and-resume round trip."""
    results = {name: attempt(check_script, ctx, name) for name in SCRIPTS}
    results["resume"] = attempt(resume_round_trip, ctx)
    results["ok"] = all(r.get("ok") is True for r in results.values())
    results["loss_tolerance"] = LOSS_TOLERANCE
    return results


# ---------------------------------------------------------------- 2. packed tree-mask forward
def random_groups(ctx: Context, vocab: int) -> dict:
    """P left-padded prompts and G right-padded responses each, of random lengths and tokens."""
    import torch
    s = ctx.sizes
    P, G, Tp, Lr = s.packed_prompts, s.packed_group, s.packed_prompt_len, s.packed_response_len
    g = torch.Generator().manual_seed(0)
    plen = torch.randint(Tp // 2, Tp + 1, (P,), generator=g)
    rlen = torch.randint(max(1, Lr // 4), Lr + 1, (P * G,), generator=g)
    prompt_mask = (torch.arange(Tp)[None] >= Tp - plen[:, None]).long()
    response_mask = (torch.arange(Lr)[None] < rlen[:, None]).long()
    prompts = torch.randint(3, vocab, (P, Tp), generator=g) * prompt_mask
    responses = torch.randint(3, vocab, (P * G, Lr), generator=g) * response_mask
    batch = {"prompts": prompts, "prompt_mask": prompt_mask, "responses": responses, "response_mask": response_mask}
    return {k: v.to(ctx.device) for k, v in batch.items()}


def group_forwards(model, b: dict, G: int) -> dict:
    """{"plain", "packed", "cached"}: fn(grad) -> (N, Tp+Lr-1) response log-probs of the batch,
    through model.logprobs.grouped_token_logprobs as the training scripts call it."""
    import torch
    from model.logprobs import grouped_token_logprobs
    sequences = torch.cat([b["prompts"].repeat_interleave(G, 0), b["responses"]], 1)
    attention_mask = torch.cat([b["prompt_mask"].repeat_interleave(G, 0), b["response_mask"]], 1)
    keep = torch.cat([torch.zeros_like(b["prompt_mask"]).repeat_interleave(G, 0), b["response_mask"]], 1)[:, 1:]
    Tp = b["prompts"].shape[1]

    def forward(group, packed):
        def fn(grad=False):
            with torch.set_grad_enabled(grad):
                return grouped_token_logprobs(model, sequences, attention_mask, Tp, group, packed=packed)[0] * keep
        return fn
    return {"plain": forward(1, None), "packed": forward(G, True), "cached": forward(G, False)}


def sdpa_backends(ctx: Context, forward) -> dict:
    """Which sdpa backends run the packed forward when it is restricted to each alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            out[name.lower()] = "not in this torch"
            continue
        try:
            with sdpa_kernel([backend]), ctx.autocast():
                forward()
            out[name.lower()] = "ok"
        except Exception as e:             # noqa: BLE001 - the answer is which backends refuse, and why
            out[name.lower()] = f"refused: {str(e).splitlines()[0][:200]}"
    return out


def attention_kernels(ctx: Context, forward) -> list[str]:
    """The attention ops and kernels the packed forward runs by default (profiler names)."""
    import torch
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if ctx.cuda else [])
    with torch.profiler.profile(activities=activities) as prof, ctx.autocast():
        forward()
        sync(ctx.device)
    pattern = re.compile(r"scaled_dot_product|flash|fmha|cudnn|efficient_attention|attention", re.I)
    return sorted({e.key for e in prof.key_averages() if pattern.search(e.key)})


def forward_timings(ctx: Context, forwards: dict) -> dict:
    """Median seconds of each path's forward (no grad) and forward + backward, bf16 autocast."""
    s, out = ctx.sizes, {}
    for name, fn in forwards.items():
        def fwd():
            with ctx.autocast():
                fn()

        def fwd_bwd():
            with ctx.autocast():
                logps = fn(grad=True)
            logps.sum().backward()
        out[f"{name}_forward_s"] = median_seconds(fwd, ctx.device, s.warmup, s.steps)
        out[f"{name}_forward_backward_s"] = median_seconds(fwd_bwd, ctx.device, s.warmup, s.steps)
    out["packed_over_cached_forward_backward"] = out["packed_forward_backward_s"] / out["cached_forward_backward_s"]
    return out


def flex_against_sdpa(ctx: Context, mask, heads: int, head_dim: int) -> dict:
    """The tree's attention alone: sdpa with the dense (R, 1, L, L) mask against FlexAttention with
    a block mask of the same tree: equal outputs, the block mask's sparsity, and on CUDA each one's
    median seconds forward + backward, flex compiled (on CPU flex has no backward and runs
    uncompiled, so only the outputs are compared)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    R, L = mask.shape[0], mask.shape[-1]
    dense = mask[:, 0]
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    g = torch.Generator(device=ctx.device).manual_seed(0)
    q, k, v = (torch.randn(R, heads, L, head_dim, device=ctx.device, dtype=dtype, generator=g)
               .requires_grad_(ctx.cuda) for _ in range(3))

    def tree(b, h, q_idx, kv_idx):
        return dense[b, q_idx, kv_idx]
    block = create_block_mask(tree, R, None, L, L, device=ctx.device)
    flex = torch.compile(flex_attention) if ctx.cuda else flex_attention
    ref, got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask), flex(q, k, v, block_mask=block)
    out = {"shape": [R, heads, L, head_dim], "dtype": str(dtype), "compiled": ctx.cuda,
           "tree_mask_density": float(mask.float().mean()), "relative_error": relative_error(got, ref),
           "block_sparsity_pct": float(block.sparsity()) if L >= 128 else None}     # blocks are 128 x 128
    if not ctx.cuda:
        return {**out, "timing_skipped": "timed on CUDA only: on CPU FlexAttention has no backward"}

    def run(fn):
        def step():
            fn().sum().backward()
        return median_seconds(step, ctx.device, ctx.sizes.warmup, ctx.sizes.steps)
    sdpa_s = run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    flex_s = run(lambda: flex(q, k, v, block_mask=block))
    return {**out, "sdpa_forward_backward_s": sdpa_s, "flex_forward_backward_s": flex_s,
            "flex_speedup": sdpa_s / flex_s}


def check_packed(ctx: Context) -> dict:
    """Section 2: the packed tree-mask forward on the bench model (LoRA adapters on, as in training)."""
    from model.packing import pack_groups
    model, tok = ctx.load_model(lora=True)
    G = ctx.sizes.packed_group
    b = random_groups(ctx, len(tok))
    forwards = group_forwards(model, b, G)
    out = {"groups": {"prompts": ctx.sizes.packed_prompts, "G": G, "prompt_len_max": ctx.sizes.packed_prompt_len,
                      "response_len_max": ctx.sizes.packed_response_len},
           "autocast": "bfloat16" if ctx.cuda else "none (CPU runs fp32)"}
    for dtype, tolerance in (("bfloat16", BF16_TOLERANCE), ("float32", FP32_TOLERANCE)):
        with ctx.autocast(dtype):
            plain, packed, cached = (forwards[k]() for k in ("plain", "packed", "cached"))
        out[f"{dtype}_packed_vs_plain"] = relative_error(packed, plain)
        out[f"{dtype}_cached_vs_plain"] = relative_error(cached, plain)
        out[f"{dtype}_ok"] = out[f"{dtype}_packed_vs_plain"] <= tolerance
    out["sdpa_backends"] = attempt(sdpa_backends, ctx, forwards["packed"])
    out["default_attention_ops"] = attempt(attention_kernels, ctx, forwards["packed"])
    out["timings"] = attempt(forward_timings, ctx, forwards)
    packed = pack_groups(b["prompts"], b["prompt_mask"], b["responses"], b["response_mask"])
    cfg = model.config
    out["flex_attention"] = attempt(flex_against_sdpa, ctx, packed.attention_mask, cfg.num_attention_heads,
                                    cfg.head_dim)
    return out


# ---------------------------------------------------------------- 3. throughput and MFU
def model_counts(model_dir: str, lora_rank: int) -> dict:
    """Parameter counts the FLOP formula needs, from the config alone (a meta-device model):
    body = every weight of the transformer layers, head = the output matrix (tied or not),
    lora = r x (in + out) summed over the adapted projections (all Linear layers of the body)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    layers = model.model.layers
    linears = [m for m in layers.modules() if isinstance(m, torch.nn.Linear)]
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "body": sum(p.numel() for p in layers.parameters()),
            "head": model.get_output_embeddings().weight.numel(),
            "lora": sum(lora_rank * (m.in_features + m.out_features) for m in linears),
            "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "head_dim": cfg.head_dim}


def dpo_step_flops(counts: dict, pairs: list[tuple[int, int, int]]) -> float:
    """FLOPs one DPO step computes on pairs of (prompt, chosen, rejected) token counts.

    With the packed forward a pair runs T = p + c + r tokens (its prompt once), the head runs
    on the K = c + r positions that predict a response token, and attention covers
    A = p(p+1)/2 + c(c+1)/2 + r(r+1)/2 + (c + r) p query-key pairs per head and layer (the
    tree mask's true entries). With N_body the layers' weights, N_head the output matrix, N_lora
    the adapters' weights, n_l layers, n_h heads of dimension d:
        fwd_base = 2 N_body T + 2 N_head K + 4 n_l n_h d A
        policy forward   = fwd_base + 2 N_lora T
        policy backward  = (2 N_body T + 2 N_head K)  activation gradients through the frozen base
                           + 8 n_l n_h d A             attention backward (dQ, dK, dV, dP)
                           + 4 N_lora T                LoRA activation and weight gradients
        reference forward = fwd_base                   (adapters off, no grad)
        total = 6 N_body T + 6 N_head K + 16 n_l n_h d A + 6 N_lora T
    No weight gradient of the frozen base is computed, so this is below the full fine-tune's 6 N T
    plus the reference's 2 N T."""
    c = counts
    total = 0.0
    for p, ch, rj in pairs:
        T, K = p + ch + rj, ch + rj
        A = p * (p + 1) / 2 + ch * (ch + 1) / 2 + rj * (rj + 1) / 2 + (ch + rj) * p
        total += 6 * c["body"] * T + 6 * c["head"] * K + 16 * c["layers"] * c["heads"] * c["head_dim"] * A \
            + 6 * c["lora"] * T
    return total


def matmul_ceiling(ctx: Context) -> float:
    """FLOP/s of a large matrix product on the device (bf16 8192^3 on CUDA, fp32 512^3 on CPU)."""
    import torch
    n, dtype = (8192, torch.bfloat16) if ctx.cuda else (512, torch.float32)
    x, y = torch.randn(n, n, device=ctx.device, dtype=dtype), torch.randn(n, n, device=ctx.device, dtype=dtype)
    return 2 * n ** 3 / median_seconds(lambda: x @ y, ctx.device, 3, 10)


def bench_args(ctx: Context, algo: str, side: str | None) -> SimpleNamespace:
    """bench/run.py's options for ``algo`` at the check's sizes."""
    s = ctx.sizes
    dpo = algo == "dpo"
    return SimpleNamespace(algo=algo, model=ctx.model_dir, device=ctx.device, side=side, learning_rate=1e-4,
                           steps=s.steps if dpo else s.gpo_steps, warmup=s.warmup if dpo else 1,
                           batch_size=s.dpo_pairs if dpo else s.gpo_prompts, max_len=s.dpo_max_len,
                           prompt_len=s.dpo_prompt_len if dpo else s.gpo_prompt_len, epochs=1, precompute_ref=0,
                           num_generations=s.num_generations, max_gen_len=s.max_gen_len)


def timed_ours(ctx: Context, ba) -> "object":
    """bench/run.py's Meter over our step for ``ba`` (warmup, then timed steps)."""
    br = bench_run()
    with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
        step, _ = br.build_sides(ba, tmp)["ours"]
        meter = br.Meter(ctx.device)
        for i in range(ba.warmup + ba.steps):
            meter.run(step, timed=i >= ba.warmup)
    return meter


def dpo_pair_lengths(ctx: Context, ba) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of the pairs the DPO bench trains on."""
    from dataset.encoding import encode_pair
    from model import load_tokenizer
    br, tok = bench_run(), load_tokenizer(ctx.model_dir)
    rows = br.dpo_rows(ba.batch_size * (ba.steps + ba.warmup), ba.prompt_len, tok)
    items = [encode_pair({"prompt": r["prompt"], "chosen": r["chosen"][0]["content"],
                          "rejected": r["rejected"][0]["content"]}, tok, ba.max_len) for r in rows]
    return [(len(p), len(c), len(r)) for p, c, r in (it for it in items if it is not None)]


def dpo_throughput(ctx: Context, peaks: dict) -> dict:
    """A DPO step of train_dpo (bf16 autocast): seconds, tokens per second, MFU, peak memory."""
    ba = bench_args(ctx, "dpo", "ours")
    s = timed_ours(ctx, ba).summary()
    lengths = dpo_pair_lengths(ctx, ba)
    per_pair = dpo_step_flops(model_counts(ctx.model_dir, LORA_RANK), lengths) / len(lengths)
    flops = per_pair * ba.batch_size
    out = {"pairs": ba.batch_size, "mean_sequence_tokens": statistics.mean(p + (c + r) / 2 for p, c, r in lengths),
           "s_per_step": s["s_per_step"], "tokens_per_step": s["tokens_per_step"],
           "tokens_per_sec": s["tokens_per_sec"], "tokens": "prompt + response of every chosen and rejected row",
           "flops_per_step": flops, "flops_formula": "6 N_body T + 6 N_head K + 16 n_l n_h d A + 6 N_lora T "
           "(gpu_check.dpo_step_flops)", "peak_mb": s["peak_mb"]}
    for name, peak in peaks.items():
        if peak:
            out[f"mfu_{name}"] = flops / s["s_per_step"] / peak
    return out


@contextlib.contextmanager
def sampling_clock(device: str):
    """Times every HFRolloutEngine.generate while inside: yields the list of (seconds, tokens)."""
    from rl.rollout import HFRolloutEngine
    calls, original = [], HFRolloutEngine.generate

    def timed(self, prompt_ids, num_generations):
        sync(device)
        t0 = time.perf_counter()
        rollout = original(self, prompt_ids, num_generations)
        sync(device)
        calls.append((time.perf_counter() - t0, int(rollout.response_mask.sum())))
        return rollout
    HFRolloutEngine.generate = timed
    try:
        yield calls
    finally:
        HFRolloutEngine.generate = original


def gpo_throughput(ctx: Context) -> dict:
    """A GPO step of train_gpo split into sampling (HFRolloutEngine.generate) and the rest."""
    ba = bench_args(ctx, "gpo", "ours")
    with sampling_clock(ctx.device) as calls:
        meter = timed_ours(ctx, ba)
    timed = calls[-len(meter.times):]
    sampling = statistics.median(t for t, _ in timed)
    training = statistics.median(step - t for step, (t, _) in zip(meter.times, timed))
    tokens = statistics.median(n for _, n in timed)
    return {"prompts": ba.batch_size, "G": ba.num_generations, "max_gen_len": ba.max_gen_len,
            "s_per_step": meter.summary()["s_per_step"], "sampling_s": sampling, "training_s": training,
            "sampling_share": sampling / (sampling + training), "sampled_tokens": tokens,
            "sampling_tokens_per_sec": tokens / sampling, "peak_mb": meter.summary()["peak_mb"]}


def sampling_prompts(ctx: Context, tok):
    """The GPO bench's prompts, left-padded on the device: (ids (P, Tp), mask (P, Tp))."""
    from dataset.batches import pad_with_mask
    from dataset.encoding import encode_prompts
    s = ctx.sizes
    rows = bench_run().group_rows(s.gpo_prompts, s.gpo_prompt_len, tok)
    ids = encode_prompts(tok, rows, 10 ** 6)
    return tuple(t.to(ctx.device) for t in pad_with_mask(ids, tok.pad_token_id, side="left"))


def decoding_throughput(ctx: Context) -> dict:
    """Tokens per second of our decoding loop (rl.rollout.decode, fp32 weights under bf16
    autocast, as the scripts sample) and of the model's own ``generate`` with a static cache, eager
    and (on CUDA) compiled, on a bf16 copy of the weights (how ``generate`` is usually run, and
    the stronger baseline); same prompts, G and length, sampling at temperature 1, tokens counted
    up to each row's end token."""
    import copy
    import torch
    from dataset.encoding import stop_ids
    from rl.rollout import decode, response_mask_after_prompt, token_sampler
    model, tok = ctx.load_model()
    plain = copy.deepcopy(model).to(torch.bfloat16) if ctx.cuda else model
    prompts, mask = sampling_prompts(ctx, tok)
    s, Tp = ctx.sizes, prompts.shape[1]
    pick = token_sampler(1.0)

    def count(responses):
        return int(response_mask_after_prompt(responses, stop_ids(tok))[0].sum())

    def ours():
        with ctx.autocast():
            return count(decode(model, prompts, mask, s.num_generations, s.max_gen_len, stop_ids(tok),
                                tok.pad_token_id, pick)[0])

    def generate(compiled):
        def fn():
            with torch.no_grad():
                out = plain.generate(input_ids=prompts, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                     top_p=1.0, max_new_tokens=s.max_gen_len, min_new_tokens=0,
                                     num_return_sequences=s.num_generations, cache_implementation="static",
                                     disable_compile=not compiled, pad_token_id=tok.pad_token_id,
                                     eos_token_id=stop_ids(tok))
            return count(out[:, Tp:])
        return fn

    out = {"rows": prompts.shape[0] * s.num_generations, "max_new_tokens": s.max_gen_len, "prompt_len": Tp}
    variants = {"ours_decode": ours, "generate_static": generate(False)}
    if ctx.cuda:
        variants["generate_static_compiled"] = generate(True)
    for name, fn in variants.items():
        out[name] = attempt(time_decoding, ctx, fn)
    base = out["generate_static"].get("tokens_per_sec")
    if base and "tokens_per_sec" in out["ours_decode"]:
        out["ours_over_generate_static"] = out["ours_decode"]["tokens_per_sec"] / base
    return out


def time_decoding(ctx: Context, fn) -> dict:
    """A decoding fn() -> tokens: first call (compiles, if it does) timed apart, then the median."""
    sync(ctx.device)
    t0 = time.perf_counter()
    fn()
    sync(ctx.device)
    first = time.perf_counter() - t0
    tokens = []
    seconds = median_seconds(lambda: tokens.append(fn()), ctx.device, 0, max(2, ctx.sizes.gpo_steps))
    return {"first_call_s": first, "s": seconds, "tokens": statistics.median(tokens),
            "tokens_per_sec": statistics.median(tokens) / seconds}


def check_throughput(ctx: Context) -> dict:
    """Section 3: DPO and GPO steps on the bench model, against the chip's peaks and generate."""
    from core.runtime import print0
    br = bench_run()
    counts = model_counts(ctx.model_dir, LORA_RANK)
    measured = attempt(matmul_ceiling, ctx)
    datasheet = br.dense_bf16_peak(ctx.device)
    peaks = {"datasheet": datasheet, "measured_matmul": measured if isinstance(measured, float) else None}
    print0(f"bench model: {counts['parameters'] / 1e6:.1f}M parameters")
    return {"model": {**counts, "hidden_size": ctx.sizes.hidden_size, "intermediate_size": ctx.sizes.intermediate_size,
                      "kv_heads": ctx.sizes.num_key_value_heads},
            "peak_flops": {"datasheet_dense_bf16": datasheet, "measured_matmul": peaks["measured_matmul"],
                           "datasheet_source": "H100/H200 SXM dense bf16, 989 TFLOP/s (vendor datasheet)"},
            "peak_memory": "CUDA memory allocated by tensors, per step" if ctx.cuda else "not measured on CPU",
            "dpo": attempt(dpo_throughput, ctx, peaks),
            "gpo": attempt(gpo_throughput, ctx),
            "decoding": attempt(decoding_throughput, ctx)}


# ---------------------------------------------------------------- 4. TRL
def check_trl(ctx: Context) -> dict:
    """Section 4: bench/run.py's ours-against-TRL steps for DPO and GPO on the bench model."""
    if importlib.util.find_spec("trl") is None:
        return {"skipped": "trl is not installed (pip install -r bench/requirements.txt; on the device machine "
                           "it travels as a wheel, bench/gpu_wheels.txt)"}
    return {algo: attempt(trl_ratio, ctx, algo) for algo in ("dpo", "gpo")}


def trl_ratio(ctx: Context, algo: str) -> dict:
    ours, trl, _ = bench_run().measure_sides(bench_args(ctx, algo, None))
    return {"ours_s_per_step": ours["s_per_step"], "trl_s_per_step": trl["s_per_step"],
            "speedup": trl["s_per_step"] / ours["s_per_step"], "ours_tokens_per_sec": ours["tokens_per_sec"],
            "trl_tokens_per_sec": trl["tokens_per_sec"], "ours_peak_mb": ours["peak_mb"], "trl_peak_mb": trl["peak_mb"]}


# ---------------------------------------------------------------- 5. the JSON and the table
CHECKS = {"correctness": check_correctness, "packed": check_packed, "throughput": check_throughput, "trl": check_trl}


def environment(ctx: Context) -> dict:
    """What the figures were measured on."""
    import torch
    versions = {}
    for name in ("transformers", "peft", "trl"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(torch.device(ctx.device)) if ctx.cuda else None
    return {"device": ctx.device, "gpu": gpu, "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, **versions,
            "tiny": ctx.a.tiny, "sizes": asdict(ctx.sizes)}


def flat_figures(tree, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted name, value) of every number, string and flag in the results, lists of them as one
    string (tracebacks left out)."""
    if isinstance(tree, dict):
        return [row for k, v in tree.items() if k != "traceback" for row in flat_figures(v, f"{prefix}{k}.")]
    if isinstance(tree, list) and all(isinstance(x, (int, float, str)) for x in tree):
        return [(prefix[:-1], ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in tree))]
    if isinstance(tree, (int, float, str, bool)) or tree is None:
        return [(prefix[:-1], tree)]
    return []


def print_table(results: dict) -> None:
    print("| figure | value |\n|---|---|")
    for name, value in flat_figures(results["sections"]):
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"| {name} | {shown[:160]} |")


def write_json(results: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def main(a) -> dict:
    validate(a)
    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = Context(a, work)
        results = {"environment": environment(ctx), "sections": {}, "seconds": {}}
        for name in a.sections:
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            results["sections"][name] = attempt(CHECKS[name], ctx)
            results["seconds"][name] = time.perf_counter() - t0
            write_json(results, a.out)
    print_table(results)
    print(f"figures in {a.out}; seconds per section: "
          + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()), flush=True)
    return results


if __name__ == "__main__":
    run_cli(main, parse_args)
