"""The data files of every script, read and checked.

Formats (JSON lines):
  conversations  MiniMind SFT / prompt format: {"conversations": [{"role", "content"}, ...]}
  pairs          MiniMind DPO format {"chosen": [messages], "rejected": [messages]} (the same
                 prompt turns, then one assistant turn each), or {"prompt", "chosen", "rejected"}
                 with strings or messages; an optional number "margin" (for reward models)
  prompts        {"conversations": [...]} (a trailing assistant turn is dropped) or {"prompt": ...};
                 every other field (e.g. "answer") is kept for reward functions and evaluation

A bad line stops the run before training with ``file:line: reason``.
"""
from __future__ import annotations

import json
import os

from core.errors import UserError

ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------- reading
def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; UserError on a missing, empty,
    non-UTF-8 or invalid-JSON file, naming the line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such data file; check --data_path")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}); save the file as UTF-8")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            rows.append((lineno, obj))
    if not rows:
        raise UserError(f"{path}: the file is empty; it needs one JSON object per line")
    return rows


def check_messages(msgs, where: str, field: str) -> list[dict]:
    """A validated message list: an optional system turn, then user/assistant alternating from user."""
    if isinstance(msgs, str):
        raise UserError(f"{where}: \"{field}\" must be a list of messages here, got a string")
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: \"{field}\" must be a non-empty list of {{\"role\", \"content\"}} messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: \"{field}\"[{i}] must be an object with \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: \"{field}\"[{i}] has role {m['role']!r}; use system, user or assistant")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: \"{field}\"[{i}] content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    turns = out[1:] if out[0]["role"] == "system" else out
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise UserError(f"{where}: \"{field}\" has {m['role']} where {want} should be "
                            f"(wrong role order: an optional system turn, then user and assistant alternating)")
    return out


def _as_prompt(value, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: \"{field}\" is empty")
        return [{"role": "user", "content": value}]
    msgs = check_messages(value, where, field)
    if msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise UserError(f"{where}: \"{field}\" has no user turn to answer")
    return msgs


def _response_text(value, where: str, field: str) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict) and "content" in value:
        text = value["content"]
    elif isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        text = value[-1].get("content")
    else:
        raise UserError(f"{where}: \"{field}\" must be a string or end with an assistant message")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: \"{field}\" has an empty response")
    return text


def load_sft(path: str) -> list[list[dict]]:
    """Conversations that end with a non-empty assistant turn."""
    return parse_rows(path, conversation_row)


def load_pairs(path: str) -> list[dict]:
    """Preference pairs as {"prompt": messages, "chosen": text, "rejected": text[, "margin": number]}."""
    return parse_rows(path, pair_row)


def load_prompts(path: str) -> list[dict]:
    """Prompts as {"prompt": messages, **other fields of the line}."""
    return parse_rows(path, prompt_row)


def parse_rows(path: str, parse) -> list:
    """``parse(row, where)`` of every line of the file; ``where`` ("file:line") names it in errors."""
    return [parse(row, f"{path}:{lineno}") for lineno, row in read_jsonl(path)]


def conversation_row(row: dict, where: str) -> list[dict]:
    if "conversations" not in row:
        raise UserError(f"{where}: missing field \"conversations\"")
    msgs = check_messages(row["conversations"], where, "conversations")
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"{where}: the conversation must end with an assistant turn")
    for m in msgs:
        if m["role"] == "assistant" and not m["content"].strip():
            raise UserError(f"{where}: empty assistant response")
    return msgs


def pair_row(row: dict, where: str) -> dict:
    for field in ("chosen", "rejected"):
        if field not in row:
            raise UserError(f"{where}: missing field \"{field}\"")
    if "prompt" in row:
        prompt = _as_prompt(row["prompt"], where, "prompt")
    else:
        chosen = check_messages(row["chosen"], where, "chosen")
        rejected = check_messages(row["rejected"], where, "rejected")
        for field, msgs in (("chosen", chosen), ("rejected", rejected)):
            if msgs[-1]["role"] != "assistant":
                raise UserError(f"{where}: \"{field}\" must end with an assistant turn")
        if chosen[:-1] != rejected[:-1]:
            raise UserError(f"{where}: \"chosen\" and \"rejected\" must share the same turns before the last")
        prompt = chosen[:-1]
    pair = {"prompt": prompt,
            "chosen": _response_text(row["chosen"], where, "chosen"),
            "rejected": _response_text(row["rejected"], where, "rejected")}
    if "margin" in row:  # how much better chosen is, for a reward model's margin loss
        if isinstance(row["margin"], bool) or not isinstance(row["margin"], (int, float)):
            raise UserError(f"{where}: \"margin\" must be a number")
        pair["margin"] = float(row["margin"])
    return pair


def prompt_row(row: dict, where: str) -> dict:
    if "conversations" in row:
        prompt = _as_prompt(row["conversations"], where, "conversations")
    elif "prompt" in row:
        prompt = _as_prompt(row["prompt"], where, "prompt")
    else:
        raise UserError(f"{where}: missing field \"conversations\" or \"prompt\"")
    return {"prompt": prompt, **{k: v for k, v in row.items() if k not in ("conversations", "prompt")}}
