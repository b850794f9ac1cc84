"""Judging a response against a prompt's answer, for answer accuracy and the accuracy reward.

Responses in the demo world end with "The answer is X." or "答案是 X。"; the last such
marker wins, so a response that corrects itself is judged by its final word. A real model
answers in its own way: ``--answer_check module:function`` (AnswerCheck) plugs in another
judge, used by eval_align.py, evaluation during training and the accuracy reward alike.
"""
from __future__ import annotations

import importlib
import math
import os
import re
import sys

from core.errors import UserError

_ANSWER_RE = re.compile(r"(?:[Aa]nswer is|答案是)\s*[:：]?\s*\"?([^\s\"。．.，,！!？?]+)")


def extract_answer(text: str) -> str | None:
    """The response's final answer, or None when it states none."""
    found = _ANSWER_RE.findall(text)
    return found[-1].strip() if found else None


def normalize_answer(answer) -> str:
    """Case- and width-insensitive form used to compare answers."""
    s = str(answer).strip().strip("\"'").lower()
    return s.translate({ord(c): ord(c) - 0xFEE0 for c in s if 0xFF01 <= ord(c) <= 0xFF5E})


def is_correct(response: str, answer) -> bool:
    """Whether the response's stated final answer equals ``answer``."""
    got = extract_answer(response)
    return got is not None and normalize_answer(got) == normalize_answer(answer)


# ----------------------------------------------------------------------------- pluggable check
DEFAULT_CHECK = "dataset.answers:demo_check"


def demo_check(response: str, answer, **fields) -> bool:
    """The default --answer_check: ``is_correct``, whatever other fields the prompt line has."""
    return is_correct(response, answer)


def import_function(spec: str, flag: str):
    """The function ``module:function`` names, imported from the working directory or the
    Python path; UserError naming ``flag`` when it cannot be found."""
    if ":" not in spec:
        raise UserError(f"{flag} {spec}: give module:function (e.g. my_scorer:score)")
    module_name, func_name = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise UserError(f"{flag} {spec}: cannot import {module_name} ({e.__class__.__name__}: {e})")
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UserError(f"{flag} {spec}: {module_name} has no function {func_name}")
    return func


class AnswerCheck:
    """How a response is judged against a prompt's ``answer``: ``--answer_check module:function``,
    by default the demo's reader (``demo_check``: "The answer is X." / "答案是 X。").

    The function is called as ``func(response, answer, **fields)`` (fields: the prompt line's
    other columns, e.g. a task's metadata) and returns a bool or a score in [0, 1] (1: right;
    a partial score counts as that share of a correct answer). ``check(response, row)`` takes
    a prompt row as dataset.formats.load_prompts reads it and returns the score as a float;
    ``scores(texts, rows)`` does it for aligned lists.
    """

    def __init__(self, spec: str | None = None):
        self.spec = spec or DEFAULT_CHECK
        self.func = import_function(self.spec, "--answer_check")

    def __call__(self, response: str, row: dict) -> float:
        fields = {k: v for k, v in row.items() if k not in ("prompt", "answer")}
        try:
            value = self.func(response, row["answer"], **fields)
        except Exception as e:
            raise UserError(f"--answer_check {self.spec} failed: {e.__class__.__name__}: {str(e)[:200]} (response "
                            f"{response[:60]!r}, answer {row['answer']!r}); fix the function") from e
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if not 0.0 <= score <= 1.0:       # nan fails too
            raise UserError(f"--answer_check {self.spec} returned {value!r}; it must return a bool or a score in [0, 1]")
        return score

    def scores(self, texts: list[str], rows: list[dict]) -> list[float]:
        """The score of each response against its row, aligned."""
        return [self(t, r) for t, r in zip(texts, rows)]
