"""Rewards for PPO / GPO / GRPO: built-in functions, a user's own, and reward models.

A reward function is called once per rollout batch as

    func(prompts, responses, **fields) -> list of floats, one per response

prompts: the chat messages of each sample's prompt; responses: the decoded texts; fields: every
other column of the prompt file, one list per column (e.g. ``answer=[...]``), aligned with the
responses. ``--reward_funcs accuracy,format,my_rewards:brevity`` picks them (``module:function``
is imported from the working directory or the Python path), ``--reward_weights`` weights them,
``--reward_clip`` clips the weighted sum, and ``--reward_model`` adds a model's score.
"""
from __future__ import annotations

import functools
import math
import re

import torch

from core.errors import UserError
from dataset.answers import AnswerCheck, extract_answer, import_function
from model.reward_model import RewardModel

# ------------------------------------------------------------------------------------ built-ins
LENGTH_BUDGET = 200   # characters: the length reward is 1 up to a quarter of this, 0 at it and beyond
_WORD_RE = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")


def accuracy_reward(prompts, responses, answer=None, *, check: AnswerCheck | None = None, **fields):
    """The score ``check`` gives each response against the data's ``answer`` field (an
    AnswerCheck, ``--answer_check``): by default 1.0 when the response's final answer ("The
    answer is X." / "答案是 X。") equals it, else 0.0."""
    if answer is None:
        raise ValueError('the prompt file has no "answer" field')
    check = check or AnswerCheck()
    return [check(r, {"answer": a, **{k: v[i] for k, v in fields.items()}})
            for i, (r, a) in enumerate(zip(responses, answer))]


def format_reward(prompts, responses, **_):
    """1.0 when the response ends by stating its answer in the expected form, 0.5 when it states
    one earlier and then goes on, 0.0 when it states none."""
    out = []
    for r in responses:
        if extract_answer(r) is None:
            out.append(0.0)
        else:
            tail = r.rstrip()
            out.append(1.0 if tail.endswith((".", "。")) and extract_answer(tail[-40:]) is not None else 0.5)
    return out


def length_reward(prompts, responses, **_):
    """1.0 for responses up to LENGTH_BUDGET/4 characters, falling linearly to 0.0 at LENGTH_BUDGET."""
    quarter = LENGTH_BUDGET / 4
    return [max(0.0, min(1.0, (LENGTH_BUDGET - len(r)) / (LENGTH_BUDGET - quarter))) for r in responses]


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the text's n-grams (over words, and single characters of scripts without
    spaces such as Chinese) that already occurred earlier in it; 0 for text with no repeats."""
    tokens = _WORD_RE.findall(text)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def repetition_reward(prompts, responses, **_):
    """1 minus the share of repeated 3-grams: 1.0 for text that never repeats itself."""
    return [1.0 - repeated_ngram_share(r) for r in responses]


BUILTIN_REWARDS = {"accuracy": accuracy_reward, "format": format_reward, "length": length_reward,
                   "repetition": repetition_reward}


def load_reward_function(spec: str, answer_check: AnswerCheck | None = None):
    """A built-in name or ``module:function``; UserError when it cannot be found. The accuracy
    reward judges answers with ``answer_check`` (``--answer_check``; default the demo's reader)."""
    if spec == "accuracy":
        return functools.partial(accuracy_reward, check=answer_check or AnswerCheck())
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise UserError(f"--reward_funcs {spec}: not a built-in ({', '.join(BUILTIN_REWARDS)}) and not module:function")
    return import_function(spec, "--reward_funcs")


class RewardFunctions:
    """The weighted sum of several reward functions (and optionally a reward model), clipped.

    ``__call__`` returns (rewards (N,), breakdown {name: (N,)} of each unweighted component).
    """

    def __init__(self, specs: list[str], weights: list[float] | None = None, clip: float | None = None,
                 reward_model=None, reward_model_weight: float = 1.0, answer_check: AnswerCheck | None = None):
        self.names = list(specs)
        self.funcs = [load_reward_function(s, answer_check) for s in self.names]
        if weights is None:
            weights = [1.0] * len(self.funcs)
        if len(weights) != len(self.funcs):
            raise UserError(f"--reward_weights has {len(weights)} value(s) for {len(self.funcs)} --reward_funcs")
        if not self.funcs and reward_model is None:
            raise UserError("no reward: give --reward_funcs and/or --reward_model")
        self.weights, self.clip = list(weights), clip
        self.reward_model, self.reward_model_weight = reward_model, reward_model_weight

    def score_rollout(self, rows: list[dict], rollout):
        """(rewards (N,), {name: (N,)}) of a rollout's G sampled texts for each prompt row (the
        prompt file's lines, whose other columns reach the functions, each row's once per sample)."""
        G = rollout.num_generations
        return self([r["prompt"] for r in rows for _ in range(G)], rollout.texts, prompt_fields(rows, G))

    def __call__(self, prompts: list, responses: list[str], fields: dict[str, list]):
        n = len(responses)
        total = torch.zeros(n, dtype=torch.float32)
        breakdown = {}
        for name, func, w in zip(self.names, self.funcs, self.weights):
            try:
                values = func(prompts, responses, **fields)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"reward function {name} failed: {e.__class__.__name__}: {str(e)[:200]} (called with "
                                f"{len(responses)} responses; its first: {responses[0][:60]!r}); fix the function, or "
                                f"leave it out of --reward_funcs") from e
            values = self._check(name, values, n)
            breakdown[name] = values
            total += w * values
        if self.reward_model is not None:
            scores = self.reward_model.score(prompts, responses).float().cpu()
            breakdown["reward_model"] = scores
            total += self.reward_model_weight * scores
        if self.clip:
            total = total.clamp(-self.clip, self.clip)
        return total, breakdown

    @staticmethod
    def _check(name: str, values, n: int) -> torch.Tensor:
        try:
            t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise UserError(f"reward function {name} must return numbers, one per response ({e})")
        if t.numel() != n:
            raise UserError(f"reward function {name} returned {t.numel()} value(s) for {n} responses; "
                            f"it must return one float per response")
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"reward function {name} returned {bad} non-finite value(s) (nan or inf)")
        return t


def parse_reward_args(funcs: str | None, weights: str | None) -> tuple[list[str], list[float] | None]:
    """``--reward_funcs a,b`` and ``--reward_weights 1,0.5`` as lists (UserError on a bad number)."""
    specs = [s.strip() for s in (funcs or "").split(",") if s.strip()]
    if not weights:
        return specs, None
    try:
        values = [float(w) for w in weights.split(",")]
    except ValueError:
        raise UserError(f"--reward_weights {weights}: give comma-separated numbers, one per --reward_funcs entry")
    if any(not math.isfinite(v) for v in values):
        raise UserError(f"--reward_weights {weights}: every weight must be a finite number")
    return specs, values


def check_answers(reward_funcs: str | None, prompts: list[dict], path: str) -> None:
    """The accuracy reward needs an "answer" on every prompt: stop before training if one has none."""
    specs, _ = parse_reward_args(reward_funcs, None)
    if "accuracy" in specs and any("answer" not in p for p in prompts):
        first = next(i for i, p in enumerate(prompts) if "answer" not in p)
        raise UserError(f'{path}: the accuracy reward needs an "answer" field on every prompt '
                        f"(prompt {first + 1} has none); use other --reward_funcs (with --reward_model_path alone, "
                        f"as for MiniMind's RLAIF data: --reward_funcs '') or add the answers")


def rewards_from_args(args, device="cpu", reward_model=None) -> RewardFunctions:
    """The RewardFunctions that --reward_funcs, --reward_weights, --reward_clip and
    --reward_model (see rl.args.add_reward_args) describe. reward_model: the --reward_model
    already loaded (PPO runs one on the policy's own base weights); otherwise it is loaded here."""
    specs, weights = parse_reward_args(args.reward_funcs, args.reward_weights)
    if args.reward_model and reward_model is None:
        reward_model = RewardModel.load(args.reward_model, device=device, save_dir=getattr(args, "save_dir", "out"),
                                        trust_remote_code=bool(args.trust_remote_code))
    return RewardFunctions(specs, weights, clip=args.reward_clip or None, reward_model=reward_model,
                           reward_model_weight=args.reward_model_weight,
                           answer_check=AnswerCheck(getattr(args, "answer_check", None)))


def prompt_fields(rows: list[dict], G: int) -> dict[str, list]:
    """The prompt file's other columns, one value per sample (each row's repeated G times)."""
    keys = sorted({k for r in rows for k in r if k != "prompt"})
    return {k: [r.get(k) for r in rows for _ in range(G)] for k in keys}
