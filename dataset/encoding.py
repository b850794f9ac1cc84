"""Tokenizing through the tokenizer's chat template: prompts, responses, conversations, pairs.

A response is the assistant text as tokenized after the generation prompt, followed by the
template's own end-of-turn token (``find_turn_end``), exactly as generation produces it; what
the template writes after that token (a newline) is not part of it.
"""
from __future__ import annotations

import torch

from core.errors import UserError
from core.runtime import print0


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


def encode_conversations(conversations: list[list[dict]], tokenizer, max_len: int):
    """(items, skipped): ``encode_conversation`` of each conversation that fits ``max_len``, and
    how many did not (their last response is longer)."""
    encoded = [encode_conversation(tokenizer, msgs, max_len) for msgs in conversations]
    items = [e for e in encoded if e is not None]
    return items, len(encoded) - len(items)


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


def encode_pairs(pairs: list[dict], tokenizer, max_len: int, path: str | None = None):
    """(items, kept): ``encode_pair`` of every pair that fits ``max_len``, and those pairs. With
    ``path`` (the training file, named in messages), says how many were skipped and stops with a
    UserError when none fits; without, pairs that cannot fit are left out silently."""
    items, kept = [], []
    for p in pairs:
        item = encode_pair(p, tokenizer, max_len)
        if item is not None:
            items.append(item)
            kept.append(p)
    if path is not None and len(items) < len(pairs):
        print0(f"skipped {len(pairs) - len(items)} of {len(pairs)} pair(s): a response does not fit --max_seq_len {max_len}")
    if path is not None and not items:
        raise UserError(f"no pair in {path} fits --max_seq_len {max_len}; raise it")
    return items, kept


def encode_prompts(tokenizer, prompts: list[dict], max_prompt_len: int, thinking_ratio: float | None = None,
                   seed: int = 0) -> list[list[int]]:
    """Token ids of each prompt row (``{"prompt": messages, ...}``), cut from the left to
    ``max_prompt_len``.

    thinking_ratio p (--thinking_ratio): a share p of the prompts, drawn once from ``seed`` (so
    a resumed run sees the same ones), is rendered with the template's thinking switch on and the
    rest with it off, as MiniMind's RLAIF data does; a template without a switch says so once."""
    switches = [{} for _ in prompts]
    if thinking_ratio is not None:
        name = thinking_switch(tokenizer)
        if name is None:
            print0(f"--thinking_ratio {thinking_ratio} does nothing: the chat template has no thinking switch "
                   f"(enable_thinking / open_thinking)")
        else:
            on = (torch.rand(len(prompts), generator=torch.Generator().manual_seed(seed)) < thinking_ratio).tolist()
            switches = [{name: value} for value in on]
            print0(f"--thinking_ratio {thinking_ratio}: {sum(on)} of {len(prompts)} prompts with {name}=True")
    return [encode_prompt(tokenizer, p["prompt"], **kw)[-max_prompt_len:] for p, kw in zip(prompts, switches)]
