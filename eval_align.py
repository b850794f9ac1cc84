"""Evaluate a model, with or without an adapter, on the held-out demo files.

    python eval_align.py                                  # the shipped demo SFT model
    python eval_align.py --lora_weight dpo                # out/dpo_192/ merged into the base it records
    python eval_align.py --from_weight out/merged --json  # any model folder, one JSON line

Reports
  pair_acc    share of held-out preference pairs whose chosen response has a higher mean
              log-prob (per token) than the rejected one
  answer_acc  share of held-out prompts whose greedy answer ("The answer is X." / "答案是 X。")
              equals the prompt's "answer" field (another judge: --answer_check module:function)
  mean_len    mean length of the greedy responses in tokens (end token included)

With --reward_model, also rm_pair_acc (held-out pairs the reward model ranks correctly) and,
when there is a start model to compare with (--lora_weight given: its base alone, --from_weight or
the one it records; or --baseline), a head-to-head on the held-out pairs' prompts: the model's greedy answers (or
--eval_samples k sampled ones) against the start model's, both scored by the reward model
  win_rate / tie_rate / loss_rate   a tie when the two rewards differ by less than --tie_margin
  reward, reward_start              mean reward of each side's answers
  gen_len, gen_len_start            mean length of each side's answers in tokens
  beats_rejected(_start)            share of answers scored above the pair's rejected answer
  style_share(_start)               with --style_check module:function, share judged in style
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from core.errors import UserError, check_args, run_cli
from core.files import project_path
from core.runtime import add_device_arg
from dataset.answers import AnswerCheck, import_function
from dataset.encoding import encode_pairs
from dataset.formats import load_pairs, load_prompts
from model.flags import add_inference_model_args
from model.loading import load_for_inference, lora_base, model_name
from model.reward_model import RewardModel
from training.evaluation import (add_answer_check_arg, add_tie_margin_arg, answer_check_problems, answer_sums,
                                 generate_responses, pair_scores, pair_sums, rates, rejected_rewards, scored_answers,
                                 tie_margin_problems, win_sums)


def arg_parser() -> argparse.ArgumentParser:
    """The script's flags (docs/flags.md is made from them)."""
    p = argparse.ArgumentParser(description="Held-out preference and answer accuracy of a model.")
    add_inference_model_args(p, "model: a name, a path, or none")
    p.add_argument("--data", default=project_path("dataset", "heldout_rl.jsonl"),
                   help="prompts with an \"answer\" field (default: the project's dataset/heldout_rl.jsonl)")
    p.add_argument("--pairs", default=project_path("dataset", "heldout_dpo.jsonl"),
                   help="preference pairs (default: the project's dataset/heldout_dpo.jsonl); none: no pair_acc")
    p.add_argument("--max_new_tokens", type=int, default=64, help="longest greedy response in tokens (default: %(default)s)")
    p.add_argument("--max_seq_len", type=int, default=256, help="longest prompt + response when scoring pairs (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=64, help="sequences per forward (default: %(default)s)")
    add_device_arg(p)
    p.add_argument("--reward_model", default=None,
                   help="also report rm_pair_acc: held-out pairs this reward model (a train_reward.py folder or a "
                        "sequence-classification model folder) ranks correctly")
    add_answer_check_arg(p)
    g = p.add_argument_group("answers against the start model's (with --reward_model)")
    g.add_argument("--baseline", default=None,
                   help="the start model whose answers the model's are compared with (default, when --lora_weight is "
                        "given: its base without it, --from_weight or the base it records; otherwise no comparison)")
    add_tie_margin_arg(g)
    g.add_argument("--eval_samples", type=int, default=0,
                   help="k > 0: compare k sampled answers per prompt instead of the greedy one (default: 0)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature with --eval_samples (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampled answers; both sides draw the same stream (default: %(default)s)")
    g.add_argument("--style_check", default=None,
                   help="module:function called as f(response) -> bool: is the answer in the style the pairs' chosen "
                        "answers share? reported as style_share (e.g. dataset.demo_world:on_point for the demo)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    return p


def parse_args(argv=None):
    return arg_parser().parse_args(argv)


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


def compare_with_start(model, tokenizer, start, start_tokenizer, reward_model, pairs: list[dict], args,
                       style=None) -> dict:
    """The head-to-head metrics (see the module doc) of the model against the start model on
    the pairs' prompts, plus a few answers of each side. Each side's sampling (--eval_samples)
    starts from --seed."""
    prompts, k = [p["prompt"] for p in pairs], max(args.eval_samples, 1)
    sides = []
    for m, tok in ((model, tokenizer), (start, start_tokenizer)):
        torch.manual_seed(args.seed)
        sides.append(scored_answers(m, tok, reward_model, prompts, args.max_new_tokens, args.batch_size, args.device,
                                    args.eval_samples, args.temperature))
    (texts, lengths, rewards), (start_texts, start_lengths, start_rewards) = sides
    result = {key: round(v, 4) for key, v in rates(win_sums(rewards, start_rewards, lengths, start_lengths,
                                                           args.tie_margin,
                                                           rejected_rewards(reward_model, pairs, k))).items()}
    if style:
        for key, side in (("style_share", texts), ("style_share_start", start_texts)):
            result[key] = round(sum(bool(style(t)) for t in side) / len(side), 4)
    result["n_compared"] = len(texts)
    result["compared_examples"] = [{"prompt": prompts[i // k][-1]["content"], "start": start_texts[i], "model": texts[i]}
                                   for i in range(0, min(len(texts), 4 * k), k)]
    return result


def evaluate(model, tokenizer, args, check: AnswerCheck | None = None, pairs: list[dict] | None = None) -> dict:
    """The metrics of eval_align.py; check: the --answer_check judge (built from args if None);
    pairs: the --pairs file's rows (read if None; none with --pairs none)."""
    prompts = load_prompts(args.data)
    missing = [i for i, p in enumerate(prompts) if "answer" not in p]
    if missing:
        raise UserError(f"{args.data}: {len(missing)} prompt(s) have no \"answer\" field (first: line {missing[0] + 1})")
    if pairs is None and not no_pairs(args):
        pairs = load_pairs(args.pairs)
    pair_acc, n_pairs = (None, 0) if pairs is None else pair_accuracy(
        model, tokenizer, pairs, args.max_seq_len, args.batch_size, args.device)
    texts, lengths = generate_responses(model, tokenizer, [p["prompt"] for p in prompts], args.max_new_tokens,
                                        args.batch_size, args.device)
    correct = (check or AnswerCheck(args.answer_check)).scores(texts, prompts)
    scores = rates(answer_sums(correct, lengths))
    by_task = defaultdict(list)
    for ok, p in zip(correct, prompts):
        by_task[p.get("task", "all")].append(ok)
    return {
        "pair_acc": None if pair_acc is None else round(pair_acc, 4), "answer_acc": round(scores["answer_acc"], 4),
        "mean_len": round(scores["mean_len"], 2), "n_pairs": n_pairs, "n_prompts": len(prompts),
        "answer_acc_by_task": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_task.items())},
        "examples": [{"prompt": p["prompt"][-1]["content"], "response": t, "answer": p["answer"]}
                     for p, t in list(zip(prompts, texts))[:3]],
    }


def print_comparison(result: dict, args) -> None:
    """The head-to-head lines of the table."""
    print(f"win_rate    {result['win_rate']:.3f}   tie {result['tie_rate']:.3f}, loss {result['loss_rate']:.3f} "
          f"({result['n_compared']} answers against {result['baseline']}'s, tie margin {args.tie_margin})")
    for key, unit in (("reward", ""), ("gen_len", " tokens"), ("beats_rejected", ""), ("style_share", "")):
        if key in result:
            print(f"{key:<11} {result[key]:.3f}{unit}   (start {result[key + '_start']:.3f})")
    for ex in result["compared_examples"]:
        print(f"  Q: {ex['prompt']}\n  start: {ex['start']}\n  model: {ex['model']}")


def no_pairs(args) -> bool:
    """--pairs none: no held-out pairs (answer accuracy only)."""
    return str(args.pairs).lower() == "none"


def eval_problems(args) -> list[str]:
    """What is wrong with the flags, found before any model is loaded: the judges imported too."""
    problems = answer_check_problems(args)
    if args.style_check:
        try:
            import_function(args.style_check, "--style_check")
        except UserError as e:
            problems.append(str(e))
    if args.eval_samples < 0 or args.temperature <= 0:
        problems.append("--eval_samples must be 0 or more and --temperature above 0")
    problems += tie_margin_problems(args)
    if args.baseline and not args.reward_model:
        problems.append("--baseline needs --reward_model: the answers of both models are judged by it")
    if args.reward_model and no_pairs(args):
        problems.append("--reward_model needs --pairs: its pair accuracy and the head-to-head use the held-out pairs")
    return problems


def main(args):
    check_args(args, eval_problems)            # every bad flag stops the run before any model is loaded
    check = AnswerCheck(args.answer_check)
    style = import_function(args.style_check, "--style_check") if args.style_check else None
    model, tokenizer, _ = load_for_inference(args, device=args.device)
    pairs = None if no_pairs(args) else load_pairs(args.pairs)
    result = evaluate(model, tokenizer, args, check, pairs)
    result["model"] = model_name(args)
    start_weight = args.baseline or (lora_base(args) if args.lora_weight else None)
    if args.reward_model:
        rm = RewardModel.load(args.reward_model, device=args.device, save_dir=args.save_dir, batch_size=args.batch_size)
        result["rm_pair_acc"], _ = rm_pair_accuracy(rm, pairs, args.max_seq_len)
        result["rm_pair_acc"] = round(result["rm_pair_acc"], 4)
        if start_weight:
            start, start_tokenizer, _ = load_for_inference(
                argparse.Namespace(**{**vars(args), "from_weight": start_weight, "lora_weight": None}), args.device)
            result["baseline"] = start_weight
            result.update(compare_with_start(model, tokenizer, start, start_tokenizer, rm, pairs, args,
                                             style))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if not k.endswith("examples")}, ensure_ascii=False))
    else:
        print(f"model       {result['model']}")
        if result["pair_acc"] is not None:
            print(f"pair_acc    {result['pair_acc']:.3f}   ({result['n_pairs']} held-out pairs)")
        print(f"answer_acc  {result['answer_acc']:.3f}   ({result['n_prompts']} held-out prompts)")
        print(f"mean_len    {result['mean_len']:.1f} tokens")
        if "rm_pair_acc" in result:
            print(f"rm_pair_acc {result['rm_pair_acc']:.3f}   (reward model {args.reward_model})")
        if "win_rate" in result:
            print_comparison(result, args)
        print("by task     " + "  ".join(f"{k} {v:.2f}" for k, v in result["answer_acc_by_task"].items()))
        for ex in result["examples"]:
            print(f"  Q: {ex['prompt']}\n  A: {ex['response']}   (expected {ex['answer']})")
    return result


if __name__ == "__main__":
    run_cli(main, parse_args)
