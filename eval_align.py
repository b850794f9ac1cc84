"""Evaluate a model, with or without an adapter, on the held-out demo files.

    python eval_align.py                                  # the shipped demo SFT model
    python eval_align.py --lora_weight dpo                # ... plus out/dpo_128/ merged in
    python eval_align.py --from_weight out/merged --json  # any model folder, one JSON line

Reports
  pair_acc    share of held-out preference pairs whose chosen response has a higher mean
              log-prob (per token) than the rejected one
  answer_acc  share of held-out prompts whose greedy answer ("The answer is X." / "答案是 X。")
              equals the prompt's "answer" field (another judge: --answer_check module:function)
  mean_len    mean length of the greedy responses in tokens (end token included)
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from dataset.answers import AnswerCheck
from dataset.data import encode_pairs, load_pairs, load_prompts
from model.loading import load_for_inference
from model.value_head import RewardModel
from utils.args import add_model_args, project_path
from utils.errors import UserError, run_cli
from utils.evaluation import add_answer_check_arg, answer_sums, generate_responses, pair_scores, pair_sums, rates
from utils.runtime import default_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Held-out preference and answer accuracy of a model.")
    add_model_args(p, "full_sft", "model: a name, a path, or none (the default is the shipped demo SFT)")
    p.add_argument("--lora_weight", default=None, help="adapter (name or folder) merged on top of --from_weight")
    p.add_argument("--save_dir", default="out", help="where names are looked up first, then the shipped demo (default: %(default)s)")
    p.add_argument("--data", default=project_path("dataset", "heldout_rl.jsonl"),
                   help="prompts with an \"answer\" field (default: the project's dataset/heldout_rl.jsonl)")
    p.add_argument("--pairs", default=project_path("dataset", "heldout_dpo.jsonl"),
                   help="preference pairs (default: the project's dataset/heldout_dpo.jsonl)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="longest greedy response in tokens (default: %(default)s)")
    p.add_argument("--max_seq_len", type=int, default=256, help="longest prompt + response when scoring pairs (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=64, help="sequences per forward (default: %(default)s)")
    p.add_argument("--device", default=default_device(), help="cpu or cuda:N (default: %(default)s)")
    p.add_argument("--reward_model", default=None,
                   help="also report rm_pair_acc: held-out pairs this reward model (a train_reward.py folder or a "
                        "sequence-classification model folder) ranks correctly")
    add_answer_check_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    return p.parse_args(argv)


def pair_accuracy(model, tokenizer, pairs: list[dict], max_seq_len: int, batch_size: int, device) -> tuple[float, int]:
    """(share of pairs whose chosen response has the higher mean log-prob, pairs scored)."""
    sums = pair_sums(*pair_scores(model, tokenizer, pairs, max_seq_len, batch_size, device))
    if not sums["pairs"]:
        raise UserError("no preference pair fits --max_seq_len; raise it")
    return rates(sums)["pair_acc"], int(sums["pairs"])


@torch.no_grad()
def rm_pair_accuracy(reward_model, pairs: list[dict], max_seq_len: int) -> tuple[float, int]:
    """(share of pairs whose chosen response the reward model scores higher, pairs scored)."""
    items, _ = encode_pairs(pairs, reward_model.tokenizer, max_seq_len)
    if not items:
        raise UserError("no preference pair fits --max_seq_len; raise it")
    chosen = reward_model.score_batched([p + c for p, c, _ in items])
    rejected = reward_model.score_batched([p + r for p, _, r in items])
    return float((chosen > rejected).float().mean()), len(items)


def evaluate(model, tokenizer, args, check: AnswerCheck | None = None) -> dict:
    """The metrics of eval_align.py; check: the --answer_check judge (built from args if None)."""
    pairs, prompts = load_pairs(args.pairs), load_prompts(args.data)
    missing = [i for i, p in enumerate(prompts) if "answer" not in p]
    if missing:
        raise UserError(f"{args.data}: {len(missing)} prompt(s) have no \"answer\" field (first: line {missing[0] + 1})")
    pair_acc, n_pairs = pair_accuracy(model, tokenizer, pairs, args.max_seq_len, args.batch_size, args.device)
    texts, lengths = generate_responses(model, tokenizer, [p["prompt"] for p in prompts], args.max_new_tokens,
                                        args.batch_size, args.device)
    correct = (check or AnswerCheck(args.answer_check)).scores(texts, prompts)
    scores = rates(answer_sums(correct, lengths))
    by_task = defaultdict(list)
    for ok, p in zip(correct, prompts):
        by_task[p.get("task", "all")].append(ok)
    return {
        "pair_acc": round(pair_acc, 4), "answer_acc": round(scores["answer_acc"], 4),
        "mean_len": round(scores["mean_len"], 2), "n_pairs": n_pairs, "n_prompts": len(prompts),
        "answer_acc_by_task": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_task.items())},
        "examples": [{"prompt": p["prompt"][-1]["content"], "response": t, "answer": p["answer"]}
                     for p, t in list(zip(prompts, texts))[:3]],
    }


def main(args):
    check = AnswerCheck(args.answer_check)     # a bad --answer_check stops before any model is loaded
    model, tokenizer, _ = load_for_inference(args, device=args.device)
    result = evaluate(model, tokenizer, args, check)
    result["model"] = args.from_weight + (f" + {args.lora_weight}" if args.lora_weight else "")
    if args.reward_model:
        rm = RewardModel.load(args.reward_model, device=args.device, save_dir=args.save_dir, batch_size=args.batch_size)
        result["rm_pair_acc"], _ = rm_pair_accuracy(rm, load_pairs(args.pairs), args.max_seq_len)
        result["rm_pair_acc"] = round(result["rm_pair_acc"], 4)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}, ensure_ascii=False))
    else:
        print(f"model       {result['model']}")
        print(f"pair_acc    {result['pair_acc']:.3f}   ({result['n_pairs']} held-out pairs)")
        print(f"answer_acc  {result['answer_acc']:.3f}   ({result['n_prompts']} held-out prompts)")
        print(f"mean_len    {result['mean_len']:.1f} tokens")
        if "rm_pair_acc" in result:
            print(f"rm_pair_acc {result['rm_pair_acc']:.3f}   (reward model {args.reward_model})")
        print("by task     " + "  ".join(f"{k} {v:.2f}" for k, v in result["answer_acc_by_task"].items()))
        for ex in result["examples"]:
            print(f"  Q: {ex['prompt']}\n  A: {ex['response']}   (expected {ex['answer']})")
    return result


if __name__ == "__main__":
    run_cli(main, parse_args)
