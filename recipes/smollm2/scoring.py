"""The judge of the SmolLM2 recipe: reasoning-gym's own scorer of the prompt line's task.

    --answer_check recipes.smollm2.scoring:score                         (eval_align.py, --eval_data)
    --reward_funcs accuracy --answer_check recipes.smollm2.scoring:score  (PPO, GPO, GRPO)

The prompts (recipes.smollm2.prepare) ask for "The answer is X." at the end of the reply; a reply
that uses reasoning-gym's own convention, <answer>X</answer>, is read that way instead. The
extracted text goes to the task's ``score_answer(answer, entry)`` with the line's ``answer`` and
``metadata``, so the score is reasoning-gym's (1 for a right answer; some tasks give partial
credit, e.g. 0.5 for "16" against "6", as the fraction of the text that is the answer).
"""
from __future__ import annotations

import functools
import re

ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)     # reasoning_gym.utils.extract_answer's
ANSWER_IS = re.compile(r"answer is\s*[:：]?", re.IGNORECASE)
TRIM = " \t*`\"'$"          # markdown bold, code, quotes, a dollar sign around the answer


def final_answer(response: str) -> str | None:
    """The reply's final answer: the last <answer>...</answer>, else the rest of the line after
    the last "answer is" without a closing full stop, quotes or markdown; None when neither."""
    tags = ANSWER_TAG.findall(response)
    if tags:
        return tags[-1].strip()
    found = list(ANSWER_IS.finditer(response))
    if not found:
        return None
    text = response[found[-1].end():].split("\n", 1)[0].strip(TRIM)
    if text.endswith((".", "。")) and not text[:-1].endswith("."):
        text = text[:-1]
    return text.strip(TRIM) or None


@functools.lru_cache(maxsize=None)
def _scorer(task: str):
    try:
        import reasoning_gym
    except ImportError:
        raise ImportError("reasoning_gym is not installed: pip install -r recipes/smollm2/requirements.txt "
                          "(see recipes/smollm2/README.md)") from None
    return reasoning_gym.get_score_answer_fn(task)


def score(response: str, answer, task: str = None, metadata: dict | None = None, **fields) -> float:
    """reasoning-gym's score in [0, 1] of the reply's final answer for the line's task."""
    if not task:
        raise ValueError('the prompt line has no "task" field (the reasoning-gym task name); '
                         "write the prompts with python -m recipes.smollm2.prepare")
    entry = {"question": None, "answer": str(answer), "metadata": metadata or {}}
    return float(_scorer(task)(final_answer(response), entry))
