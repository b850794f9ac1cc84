"""Reading a final answer out of a response, for answer accuracy and the accuracy reward.

Responses in the demo world end with "The answer is X." or "答案是 X。"; the last such
marker wins, so a response that corrects itself is judged by its final word.
"""
from __future__ import annotations

import re

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
