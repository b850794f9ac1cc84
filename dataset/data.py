"""Reading, checking and tokenizing the data files of every script.

Formats (JSON lines):
  conversations  MiniMind SFT / prompt format: {"conversations": [{"role", "content"}, ...]}
  pairs          MiniMind DPO format {"chosen": [messages], "rejected": [messages]} (the same
                 prompt turns, then one assistant turn each), or {"prompt", "chosen", "rejected"}
                 with strings or messages; an optional number "margin" (for reward models)
  prompts        {"conversations": [...]} (a trailing assistant turn is dropped) or {"prompt": ...};
                 every other field (e.g. "answer") is kept for reward functions and evaluation

A bad line stops the run before training with ``file:line: reason``. Tokenization follows the
tokenizer's chat template: a response is the assistant text as tokenized after the generation
prompt, followed by the template's own end-of-turn token (``find_turn_end``), exactly as
generation produces it; what the template writes after that token (a newline) is not part of it.
"""
from __future__ import annotations

import json
import os

import torch

from utils.errors import UserError
from utils.runtime import print0

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
    out = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "conversations" not in row:
            raise UserError(f"{where}: missing field \"conversations\"")
        msgs = check_messages(row["conversations"], where, "conversations")
        if msgs[-1]["role"] != "assistant":
            raise UserError(f"{where}: the conversation must end with an assistant turn")
        for m in msgs:
            if m["role"] == "assistant" and not m["content"].strip():
                raise UserError(f"{where}: empty assistant response")
        out.append(msgs)
    return out


def load_pairs(path: str) -> list[dict]:
    """Preference pairs as {"prompt": messages, "chosen": text, "rejected": text}."""
    out = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
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
        out.append(pair)
    return out


def load_prompts(path: str) -> list[dict]:
    """Prompts as {"prompt": messages, **other fields of the line}."""
    out = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "conversations" in row:
            prompt = _as_prompt(row["conversations"], where, "conversations")
        elif "prompt" in row:
            prompt = _as_prompt(row["prompt"], where, "prompt")
        else:
            raise UserError(f"{where}: missing field \"conversations\" or \"prompt\"")
        extra = {k: v for k, v in row.items() if k not in ("conversations", "prompt")}
        out.append({"prompt": prompt, **extra})
    return out


# ----------------------------------------------------------------------------- tokenizing
def encode_prompt(tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    """Token ids of the chat-rendered prompt, ending with the opening of an assistant turn;
    ``template_kwargs`` go to the chat template (e.g. ``enable_thinking=True``)."""
    return text_ids(tokenizer, render_prompt(tokenizer, messages, **template_kwargs))


THINKING_SWITCHES = ("enable_thinking", "open_thinking")   # Qwen3's and MiniMind's template variables


def thinking_switch(tokenizer) -> str | None:
    """The chat template's thinking switch: the first of THINKING_SWITCHES whose True and False
    render a prompt differently; None when the template has none (it ignores both)."""
    probe = [{"role": "user", "content": "hi"}]
    for name in THINKING_SWITCHES:
        on, off = (render_prompt(tokenizer, probe, **{name: value}) for value in (True, False))
        if on != off:
            return name
    return None


PROBE = "\u2063MINIALIGN\u2063"          # an assistant turn's content, to find what the template puts after it


def find_turn_end(tokenizer) -> str:
    """The token that ends an assistant turn in the tokenizer's chat template: the first special
    token the template writes after an assistant message's content (``<|im_end|>`` for ChatML,
    ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma, ``<|end|>`` for Phi-3, ``</s>`` for
    Mistral), else the tokenizer's eos token."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}],
                                             tokenize=False)
    except Exception:  # a template that refuses this exchange: nothing to read
        return tokenizer.eos_token
    if PROBE not in text:
        return tokenizer.eos_token
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    after = tokenizer(text.split(PROBE, 1)[1], add_special_tokens=False)["input_ids"]
    return next((tokenizer.convert_ids_to_tokens(i) for i in after if i in special), tokenizer.eos_token)


def turn_end_id(tokenizer) -> int:
    """The id of the token that closes an assistant turn: the one ``init_model`` recorded
    (``--eos_token``, or read off the chat template), else ``find_turn_end``'s."""
    if getattr(tokenizer, "turn_end_id", None) is None:
        tokenizer.turn_end_id = tokenizer.convert_tokens_to_ids(find_turn_end(tokenizer))
    return tokenizer.turn_end_id


def stop_ids(tokenizer, also=()) -> list[int]:
    """Every token that ends a response: the turn end, the tokenizer's eos and the model's own
    stop list (``generation_config.eos_token_id``), as ``init_model`` recorded them; where none
    was recorded, the turn end, eos and ``also``, in that order."""
    recorded = getattr(tokenizer, "stop_ids", None)
    return list(recorded) if recorded else list(dict.fromkeys(
        i for i in (turn_end_id(tokenizer), tokenizer.eos_token_id, *also) if i is not None))


def render_prompt(tokenizer, messages: list[dict], **template_kwargs) -> str:
    """The chat-rendered prompt, ending with the opening of an assistant turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as it stands (special tokens written in it included, none added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, text: str, prompt_text: str = "", prompt_ids: list[int] | None = None) -> list[int]:
    """Token ids of an assistant response, closed by the end-of-turn token: the ids the content
    has when tokenized right after ``prompt_text`` (the rendered prompt, whose ids are
    ``prompt_ids`` when the caller has them), as the model produces it and as
    ``tokenizer(prompt_text + text)`` splits it, where the prompt's own ids stay a prefix of
    that; else the content tokenized alone."""
    ids = None
    if prompt_text:
        prompt_ids = text_ids(tokenizer, prompt_text) if prompt_ids is None else prompt_ids
        whole = text_ids(tokenizer, prompt_text + text)
        if whole[:len(prompt_ids)] == prompt_ids:
            ids = whole[len(prompt_ids):]
    return (text_ids(tokenizer, text) if ids is None else ids) + [turn_end_id(tokenizer)]


def encode_exchange(tokenizer, messages: list[dict], text: str) -> list[int]:
    """Token ids of a prompt (messages) and its response ``text``, closed by the turn end."""
    prompt_text = render_prompt(tokenizer, messages)
    prompt_ids = text_ids(tokenizer, prompt_text)
    return prompt_ids + encode_response(tokenizer, text, prompt_text, prompt_ids)


def fit(prompt_ids: list[int], response_ids: list[int], max_len: int, min_prompt: int = 1):
    """Prompt and response cut to ``max_len`` tokens: the response is kept whole and the prompt
    loses its start. None when even ``min_prompt`` prompt tokens do not fit beside the response."""
    room = max_len - len(response_ids)
    if room < min(min_prompt, len(prompt_ids)) or room <= 0:
        return None
    return prompt_ids[-room:], response_ids


def encode_conversation(tokenizer, messages: list[dict], max_len: int):
    """(input_ids, loss_mask) of a whole conversation: every assistant response (and its end
    token) is trained on, everything else is context. Cut from the left to ``max_len``; None when
    the last response does not fit."""
    ids, mask = [], []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt_text = render_prompt(tokenizer, messages[:i])
        prefix = text_ids(tokenizer, prompt_text)
        if prefix[: len(ids)] == ids:      # the usual case: the template extends what we have
            mask += [0] * (len(prefix) - len(ids))
        else:                              # a template that re-renders earlier turns: context only
            mask = [0] * len(prefix)
        resp = encode_response(tokenizer, m["content"], prompt_text, prefix)
        ids, mask = prefix + resp, mask + [1] * len(resp)
    if len(resp) >= max_len:  # the last response (conversations end with one) cannot fit
        return None
    return ids[-max_len:], mask[-max_len:]


def pad_batch(seqs: list[list[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """(B, T) tensor of the sequences padded to the longest one."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        else:
            out[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
    return out


def pad_with_mask(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T)): the sequences padded to the longest one, and 1 on their real tokens."""
    return pad_batch(seqs, pad_id, side), pad_batch([[1] * len(s) for s in seqs], 0, side)


class SFTDataset(torch.utils.data.Dataset):
    """Tokenized conversations; ``skipped`` counts those too long for ``max_len``."""

    def __init__(self, conversations: list[list[dict]], tokenizer, max_len: int):
        self.items, self.skipped = [], 0
        for msgs in conversations:
            enc = encode_conversation(tokenizer, msgs, max_len)
            if enc is None:
                self.skipped += 1
            else:
                self.items.append(enc)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate_sft(batch, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids (B, T), attention_mask (B, T) and loss_mask (B, T)."""
    input_ids, attention_mask = pad_with_mask([b[0] for b in batch], pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": pad_batch([b[1] for b in batch], 0),
    }


def encode_pair(pair: dict, tokenizer, max_len: int):
    """(prompt_ids, chosen_ids, rejected_ids) of one pair, the prompt cut from the left so that
    both responses fit; None when they cannot."""
    prompt_text = render_prompt(tokenizer, pair["prompt"])
    prompt = text_ids(tokenizer, prompt_text)
    chosen, rejected = (encode_response(tokenizer, pair[k], prompt_text, prompt) for k in ("chosen", "rejected"))
    fc, fr = fit(prompt, chosen, max_len), fit(prompt, rejected, max_len)
    if fc is None or fr is None:
        return None
    keep = min(len(fc[0]), len(fr[0]))  # the same prompt for both
    return prompt[-keep:], chosen, rejected


def encode_pairs(pairs: list[dict], tokenizer, max_len: int):
    """(items, skipped): ``encode_pair`` of every pair; pairs that cannot fit are skipped and counted."""
    items = [encode_pair(p, tokenizer, max_len) for p in pairs]
    kept = [it for it in items if it is not None]
    return kept, len(items) - len(kept)


def tokenize_pairs(pairs: list[dict], tokenizer, max_len: int, path: str):
    """(items, kept): ``encode_pair`` of every pair that fits and the pairs kept, for training.
    Says how many were skipped; a UserError when none fits."""
    items, kept = [], []
    for p in pairs:
        item = encode_pair(p, tokenizer, max_len)
        if item is not None:
            items.append(item)
            kept.append(p)
    if len(items) < len(pairs):
        print0(f"skipped {len(pairs) - len(items)} of {len(pairs)} pair(s): a response does not fit --max_seq_len {max_len}")
    if not items:
        raise UserError(f"no pair in {path} fits --max_seq_len {max_len}; raise it")
    return items, kept


def collate_pairs(items, pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected of each pair in one batch, for one concatenated forward.

    items: (prompt_ids, chosen_ids, rejected_ids) from ``encode_pairs``. Returns input_ids,
    attention_mask and response_mask, each (2B, T), right-padded: rows 0..B-1 are the chosen
    sequences, rows B..2B-1 the rejected ones in the same order.
    """
    seqs = [p + c for p, c, _ in items] + [p + r for p, _, r in items]
    masks = [[0] * len(p) + [1] * len(c) for p, c, _ in items] + [[0] * len(p) + [1] * len(r) for p, _, r in items]
    input_ids, attention_mask = pad_with_mask(seqs, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": pad_batch(masks, 0),
    }


def collate_pair_groups(items, pad_id: int) -> dict:
    """Chosen and rejected of each pair side by side, sharing one prompt computation.

    items: (prompt_ids, chosen_ids, rejected_ids) from ``encode_pairs``. Returns input_ids,
    attention_mask and response_mask, each (2B, Tp + Lr): row 2i is pair i's chosen sequence,
    row 2i+1 its rejected one; each row is the prompt left-padded to Tp, then the response
    right-padded to Lr. ``prompt_len`` is Tp. The rows of a pair share columns 0..Tp-1, which
    utils.logprobs.grouped_token_logprobs runs once per pair.
    """
    prompts = [p for p, _, _ in items for _ in range(2)]
    responses = [r for _, c, rj in items for r in (c, rj)]
    prompt_ids, prompt_mask = pad_with_mask(prompts, pad_id, side="left")
    response_ids, response_mask = pad_with_mask(responses, pad_id)
    return {
        "input_ids": torch.cat([prompt_ids, response_ids], 1),
        "attention_mask": torch.cat([prompt_mask, response_mask], 1),
        "response_mask": torch.cat([torch.zeros_like(prompt_mask), response_mask], 1),
        "prompt_len": prompt_ids.shape[1],
    }
