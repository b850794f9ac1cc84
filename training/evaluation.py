"""Held-out scoring, for eval_align.py and for evaluation during training (--eval_data).

Two kinds of held-out file: preference pairs (``chosen``/``rejected``) and prompts with an
``answer``. Pairs give pair_acc (share whose chosen response scores higher: the mean log-prob
per token for a language model, the reward for a reward model) and reward_margin (mean chosen
minus rejected score); two models' answers to the same prompts, scored by a reward model, give
win_rate / tie_rate / loss_rate (win_sums); prompts give answer_acc (greedy answer equals ``answer``), mean_len
(greedy response tokens, end token included) and, with k samples per prompt, pass@k (share of
prompts with at least one correct sample among k).

The scoring functions return sums, so the shares of several processes add up (TrainingEval
splits the file across ranks and all-reduces them); eval_align.py calls the same functions on
one process.
"""
from __future__ import annotations

import contextlib
import os

import torch

from core.errors import UserError
from core.runtime import print0, to_device
from dataset.answers import AnswerCheck
from dataset.batches import collate_pairs, pad_with_mask, pair_rows
from dataset.encoding import encode_pairs, encode_prompt, stop_ids
from dataset.formats import load_pairs, load_prompts, read_jsonl
from model.logprobs import last_token_values, model_sequence_logprobs
from model.lora import adapters_disabled
from model.reward_model import RewardModel

PAIR_METRICS = ("pair_acc", "reward_margin")
ANSWER_METRICS = ("answer_acc", "mean_len")
TIE_MARGIN = 0.05      # reward units: two answers whose rewards differ by less are a tie


@torch.no_grad()
def pair_scores(model, tokenizer, pairs: list[dict], max_seq_len: int, batch_size: int, device,
                value_model: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen (n,), rejected (n,)) scores of the pairs that fit max_seq_len: the mean log-prob
    per response token, or with value_model the value at the last token (a reward model)."""
    items, _ = encode_pairs(pairs, tokenizer, max_seq_len)
    chosen, rejected = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = to_device(collate_pairs(chunk, tokenizer.pad_token_id), device)
        if value_model:
            values = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])     # (2n, T)
            scores = last_token_values(values, batch["attention_mask"])
        else:
            scores = model_sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        for side, rows in zip((chosen, rejected), pair_rows(scores.float().cpu())):
            side.append(rows)
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)


def pair_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """{wins, margin, pairs}: pairs whose chosen score is higher, the summed margin, the count."""
    return {"wins": float((chosen > rejected).sum()), "margin": float((chosen - rejected).sum()),
            "pairs": float(chosen.numel())}


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int, device,
                       samples: int = 0, temperature: float = 1.0) -> tuple[list[str], list[int]]:
    """(texts, lengths in tokens, end token included) of one greedy response per prompt, or with
    samples k > 0 of k sampled ones (temperature, no top-k / top-p), prompt i's at i*k..i*k+k-1."""
    texts, lengths = [], []
    stops, pad = stop_ids(tokenizer), tokenizer.pad_token_id        # the turn end, eos, the model's own
    k = max(samples, 1)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0,
                "num_return_sequences": k} if samples else {"do_sample": False}
    for start in range(0, len(prompts), max(1, batch_size // k)):
        encoded = [encode_prompt(tokenizer, m) for m in prompts[start:start + max(1, batch_size // k)]]
        input_ids, attention_mask = (t.to(device) for t in pad_with_mask(encoded, pad, side="left"))
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=pad, **sampling)
        for row in out[:, input_ids.shape[1]:].tolist():
            n = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
            lengths.append(n)
    return texts, lengths


def scored_answers(model, tokenizer, reward_model, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
                   device, samples: int = 0, temperature: float = 1.0) -> tuple[list[str], list[int], torch.Tensor]:
    """(texts, lengths, rewards (N*k,)) of the model's answers (generate_responses: greedy, or k
    sampled per prompt, prompt i's at i*k..i*k+k-1), each scored by reward_model."""
    texts, lengths = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size, device, samples,
                                        temperature)
    k = max(samples, 1)
    return texts, lengths, reward_model.score([m for m in prompts for _ in range(k)], texts)


def rejected_rewards(reward_model, pairs: list[dict], samples: int = 0) -> torch.Tensor:
    """(N*k,) reward_model's score of each pair's rejected answer, repeated for its k answers."""
    return reward_model.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs]).repeat_interleave(
        max(samples, 1))


def answer_sums(scores: list[float], lengths: list[int]) -> dict[str, float]:
    """{correct, length, prompts} of greedy responses, one per prompt: correct sums the scores
    an AnswerCheck (--answer_check) gave them (AnswerCheck.scores), length their token counts."""
    return {"correct": float(sum(scores)), "length": float(sum(lengths)), "prompts": float(len(scores))}


def pass_sums(prompts: list[dict], texts: list[str], k: int, check: AnswerCheck | None = None) -> dict[str, float]:
    """{passed}: prompts with at least one fully correct answer (score 1) among their k samples."""
    check = check or AnswerCheck()
    return {"passed": float(sum(any(check(t, p) >= 1.0 for t in texts[i * k:(i + 1) * k])
                                for i, p in enumerate(prompts)))}


def win_sums(rewards: torch.Tensor, start_rewards: torch.Tensor, lengths: list[int], start_lengths: list[int],
             tie_margin: float = TIE_MARGIN, rejected_rewards: torch.Tensor | None = None) -> dict[str, float]:
    """Sums of a head-to-head comparison, answer i of the model against answer i of the start
    model, both scored by one reward model (N,): {won, tied, compared} (a tie when the rewards
    differ by less than tie_margin, a win when the model's is higher by at least that), the
    summed rewards and lengths of each side, and with rejected_rewards (N,) the answers of each
    side scored above the rejected answer of their pair ({beats_rejected, beats_rejected_start})."""
    if not rewards.shape == start_rewards.shape == (len(lengths),) == (len(start_lengths),):
        raise ValueError(f"win_sums: shapes {tuple(rewards.shape)}, {tuple(start_rewards.shape)}, "
                         f"{len(lengths)} and {len(start_lengths)} lengths differ")
    gap = rewards - start_rewards
    sums = {"won": float((gap >= tie_margin).sum()), "tied": float((gap.abs() < tie_margin).sum()),
            "compared": float(rewards.numel()), "reward": float(rewards.sum()),
            "reward_start": float(start_rewards.sum()), "gen_length": float(sum(lengths)),
            "gen_length_start": float(sum(start_lengths))}
    if rejected_rewards is not None:
        sums["beats_rejected"] = float((rewards > rejected_rewards).sum())
        sums["beats_rejected_start"] = float((start_rewards > rejected_rewards).sum())
    return sums


def add_answer_check_arg(group) -> None:
    """--answer_check: how answers are judged (eval_align.py, --eval_data, the accuracy reward)."""
    group.add_argument("--answer_check", default=None,
                       help="module:function judging a response against a prompt's \"answer\": called as "
                            "f(response, answer, **other_fields_of_the_line), returns a bool or a score in [0, 1]; "
                            "used for answer_acc and by the accuracy reward (default: the demo's reader of "
                            "\"The answer is X.\")")


def rates(sums: dict[str, float], k: int = 0) -> dict[str, float]:
    """The metrics of summed counts (pair_sums, answer_sums, pass_sums, over any number of processes)."""
    out = {}
    if sums.get("pairs"):
        out["pair_acc"], out["reward_margin"] = sums["wins"] / sums["pairs"], sums["margin"] / sums["pairs"]
    if sums.get("prompts"):
        out["answer_acc"], out["mean_len"] = sums["correct"] / sums["prompts"], sums["length"] / sums["prompts"]
        if k and "passed" in sums:
            out[f"pass@{k}"] = sums["passed"] / sums["prompts"]
    if sums.get("compared"):
        n = sums["compared"]
        out["win_rate"], out["tie_rate"] = sums["won"] / n, sums["tied"] / n
        out["loss_rate"] = 1.0 - out["win_rate"] - out["tie_rate"]
        for key in ("reward", "reward_start", "beats_rejected", "beats_rejected_start"):
            if key in sums:
                out[key] = sums[key] / n
        out["gen_len"], out["gen_len_start"] = sums["gen_length"] / n, sums["gen_length_start"] / n
    return out


# ------------------------------------------------------------------------- during training
def add_eval_args(parser) -> None:
    """--eval_data and its companions (every training script)."""
    g = parser.add_argument_group("evaluation during training")
    g.add_argument("--eval_data", default=None,
                   help="held-out preference pairs (chosen/rejected) or prompts with an \"answer\", scored every "
                        "--eval_interval steps and at the end, logged as eval/* (default: none, off)")
    g.add_argument("--eval_interval", type=int, default=50, help="steps between evaluations (default: %(default)s)")
    g.add_argument("--eval_samples", type=int, default=0,
                   help="k > 0: also k sampled answers per held-out prompt, logged as eval/pass@k (default: 0)")
    g.add_argument("--eval_max_new_tokens", type=int, default=64,
                   help="longest held-out response in tokens (default: %(default)s)")
    g.add_argument("--save_best", type=int, choices=[0, 1], default=0,
                   help="1: keep the weights of the best evaluation as {save_weight}_best_{hidden_size}[_moe] (default: 0)")
    g.add_argument("--best_metric", default=None,
                   help="what --save_best maximises: pair_acc or reward_margin for pairs, answer_acc or pass@k for "
                        "prompts (default: pair_acc or answer_acc)")
    g.add_argument("--eval_reward_model", default=None,
                   help="with held-out pairs: also the model's greedy answers to their prompts against the start "
                        "model's, scored by this reward model (a train_reward.py folder or a sequence-classification "
                        "model), logged as eval/win_rate, eval/tie_rate, eval/reward, eval/beats_rejected, ... "
                        "as eval_align.py reports them (default: none)")
    add_tie_margin_arg(g)
    add_answer_check_arg(g)


def add_tie_margin_arg(group) -> None:
    """--tie_margin: when two answers' rewards count as a tie (eval_align.py, --eval_reward_model)."""
    group.add_argument("--tie_margin", type=float, default=TIE_MARGIN,
                       help="a tie when two answers' rewards differ by less (default: %(default)s)")


def tie_margin_problems(args) -> list[str]:
    """--tie_margin's check (eval_align.py and --eval_reward_model)."""
    margin = getattr(args, "tie_margin", 0)
    return [f"--tie_margin must be 0 or more (got {margin})"] if margin < 0 else []


def eval_kind(path: str) -> str:
    """"pairs" or "prompts": what the first line of a held-out file holds."""
    rows = read_jsonl(path)                     # a missing or empty file stops here, with its reason
    return "pairs" if {"chosen", "rejected"} <= set(rows[0][1]) else "prompts"


def answer_check_problems(args) -> list[str]:
    """What is wrong with --answer_check: a judge that cannot be imported."""
    try:
        AnswerCheck(getattr(args, "answer_check", None))    # imports it
    except UserError as e:
        return [str(e)]
    return []


def eval_arg_problems(args) -> list[str]:
    """What is wrong with the evaluation flags (the file is read, not the model)."""
    problems = answer_check_problems(args)
    if not getattr(args, "eval_data", None):
        return problems + [f"{flag} needs --eval_data" for flag, on in
                           (("--save_best 1", getattr(args, "save_best", 0)),
                            ("--eval_reward_model", getattr(args, "eval_reward_model", None))) if on]
    if args.eval_interval < 1:
        problems.append(f"--eval_interval must be at least 1 (got {args.eval_interval})")
    if args.eval_samples < 0 or args.eval_max_new_tokens < 1:
        problems.append("--eval_samples must be 0 or positive and --eval_max_new_tokens at least 1")
    if not os.path.isfile(args.eval_data):
        return problems + [f"--eval_data {args.eval_data}: no such file"]
    try:
        kind = eval_kind(args.eval_data)
        if kind == "prompts":
            missing = [i for i, p in enumerate(load_prompts(args.eval_data)) if "answer" not in p]
            if missing:
                problems.append(f'--eval_data {args.eval_data}: prompt {missing[0] + 1} has no "answer" field; '
                                f"held-out prompts are scored by their answers")
        else:
            load_pairs(args.eval_data)
    except UserError as e:         # a bad line of the file
        return problems + [str(e)]
    reward_model = getattr(args, "eval_reward_model", None)
    if reward_model and kind != "pairs":
        problems.append(f"--eval_reward_model compares answers to the prompts of held-out pairs; {args.eval_data} "
                        f"holds prompts")
    elif reward_model and not (getattr(args, "use_lora", 1) or getattr(args, "ref_model", None) == "copy"):
        problems.append("--eval_reward_model compares with the start model: train LoRA adapters (--use_lora 1) "
                        "or keep a copy (--ref_model copy)")
    if reward_model and not os.path.isdir(reward_model):
        problems.append(f"--eval_reward_model {reward_model}: no such folder")
    problems += tie_margin_problems(args)
    allowed = PAIR_METRICS + (("win_rate",) if reward_model else ()) if kind == "pairs" else ("answer_acc",) + ((f"pass@{args.eval_samples}",)
                                                                       if args.eval_samples else ())
    if args.best_metric is not None and args.best_metric not in allowed:
        problems.append(f"--best_metric {args.best_metric}: the {kind} in {args.eval_data} give {', '.join(allowed)}")
    return problems


class TrainingEval:
    """Scores --eval_data with the model being trained; run_steps calls it every --eval_interval
    steps and at the end. Each rank scores its share of the file (every world_size-th item) and
    the sums are all-reduced. Sampling (pass@k) draws from its own generator, seeded by --seed and
    the step, inside torch.random.fork_rng: the training's random state is as it was, so a run
    with evaluation trains exactly as one without, and resumes exactly."""

    def __init__(self, run):
        args = self.args = run.args
        self.run, self.kind = run, eval_kind(args.eval_data)
        rank, world = run.dist.rank, run.dist.world_size
        if self.kind == "pairs":
            self.items = load_pairs(args.eval_data)[rank::world]
        else:
            self.items = load_prompts(args.eval_data)[rank::world]
        self.value_model = getattr(run.base_model, "is_reward_model", False)     # scores pairs by its values
        self.metric = args.best_metric or ("pair_acc" if self.kind == "pairs" else "answer_acc")
        self.check = AnswerCheck(getattr(args, "answer_check", None))
        self.best_stem = f"{args.save_weight}_best"
        self.reward_model, self.start = None, None
        if getattr(args, "eval_reward_model", None):
            self.reward_model = RewardModel.load(args.eval_reward_model, device=run.device, save_dir=args.save_dir,
                                                 batch_size=max(1, args.batch_size))

    def __call__(self, step: int) -> dict[str, float]:
        run, args = self.run, self.args
        model = run.base_model if self.value_model else run.lm
        was_training = model.training
        model.eval()
        devices = [run.device] if run.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), run.autocast():
                torch.manual_seed(args.seed * 1000003 + step)
                sums = self.sums(model)
        finally:
            model.train(was_training)
        names = sorted(sums)
        total = run.dist.all_sum(torch.tensor([sums[k] for k in names], dtype=torch.float64, device=run.device))
        return {f"eval/{k}": v for k, v in rates(dict(zip(names, total.tolist())), args.eval_samples).items()}

    def sums(self, model) -> dict[str, float]:
        args, tok, dev = self.args, self.run.tokenizer, self.run.device
        bs = max(1, args.batch_size)
        if self.kind == "pairs":
            sums = pair_sums(*pair_scores(model, tok, self.items, args.max_seq_len, bs, dev, self.value_model))
            return sums | (self.comparison_sums(model) if self.reward_model is not None else {})
        prompts = [p["prompt"] for p in self.items]
        texts, lengths = generate_responses(model, tok, prompts, args.eval_max_new_tokens, bs, dev)
        sums = answer_sums(self.check.scores(texts, self.items), lengths)
        if args.eval_samples:
            texts, _ = generate_responses(model, tok, prompts, args.eval_max_new_tokens, bs * args.eval_samples, dev,
                                          args.eval_samples, getattr(args, "temperature", 1.0))
            sums.update(pass_sums(self.items, texts, args.eval_samples, self.check))
        return sums

    def comparison_sums(self, model) -> dict[str, float]:
        """win_sums of the model's greedy answers to the pairs' prompts against the start model's
        (the reference, or the policy with its adapters off), both scored by --eval_reward_model;
        the start's answers and rewards are computed once."""
        args, tok, dev, rm = self.args, self.run.tokenizer, self.run.device, self.reward_model
        prompts, bs = [p["prompt"] for p in self.items], max(1, args.batch_size)
        if self.start is None:
            with self.start_model() as start:
                _, lengths, rewards = scored_answers(start, tok, rm, prompts, args.eval_max_new_tokens, bs, dev)
            self.start = (rewards, lengths, rejected_rewards(rm, self.items))
        _, lengths, rewards = scored_answers(model, tok, rm, prompts, args.eval_max_new_tokens, bs, dev)
        start_rewards, start_lengths, rejected = self.start
        return win_sums(rewards, start_rewards, lengths, start_lengths, args.tie_margin, rejected)

    @contextlib.contextmanager
    def start_model(self):
        """The model as training found it: the reference if the run keeps one, else the policy
        with every adapter off."""
        run = self.run
        if run.reference is not None:
            with run.reference_model() as ref:
                yield ref
            return
        with torch.no_grad(), adapters_disabled(run.lm):
            yield run.lm

    def keep_if_best(self, state, metrics: dict[str, float]) -> None:
        """--save_best 1: save the weights as {save_weight}_best_... when eval/<best_metric> beats
        every earlier evaluation of the run (the best so far lives in the resume file)."""
        value = metrics.get(f"eval/{self.metric}")
        if not self.args.save_best or value is None:
            return
        best = state.extra.get("best_eval")
        if best is not None and value <= best:
            return
        state.extra["best_eval"] = value
        if self.run.is_main:
            self.run.save_weights(stem=self.best_stem)
        print0(f"eval/{self.metric} {value:.4f} at step {state.step}: the best so far, saved to "
               f"{self.run.weights_dir_for(self.best_stem)}")

