"""Chat with a model, its answers streamed token by token: a base plus an optional adapter.

    python chat.py                                        # the shipped demo SFT model
    python chat.py --lora_weight dpo                      # out/dpo_192 on the base it records (any adapter name or folder)
    python chat.py --from_weight out/dpo_merged           # a merged model folder (python -m model.export)
    python chat.py --lora_weight ppo_actor --prompt "What is 3 + 4?" --prompt "计算 2 + 5。"   # answer and exit

In the interactive loop, /reset forgets the conversation and /exit (or Ctrl-D) leaves.
Greedy by default, like eval_align.py; --temperature > 0 samples.
"""
from __future__ import annotations

import argparse
import sys

import torch
from transformers import TextStreamer

from core.errors import check_args, run_cli
from core.runtime import add_device_arg
from dataset.encoding import encode_prompt, stop_ids
from model.flags import add_inference_model_args
from model.loading import load_for_inference, model_name


def arg_parser() -> argparse.ArgumentParser:
    """The script's flags (docs/flags.md is made from them)."""
    p = argparse.ArgumentParser(description="Chat with a model (base + optional LoRA adapter), answers streamed.")
    add_inference_model_args(p, "model: a name, a path, or an adapter alone (merged into its base)")
    p.add_argument("--prompt", action="append", default=None,
                   help="answer this and exit (repeat for several turns of one conversation); default: interactive")
    p.add_argument("--max_new_tokens", type=int, default=128, help="longest answer in tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling (default: %(default)s)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling when --temperature > 0 (default: %(default)s)")
    p.add_argument("--history", type=int, choices=[0, 1], default=1,
                   help="1: each turn sees the conversation so far; 0: every question alone (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    add_device_arg(p)
    return p


def parse_args(argv=None):
    return arg_parser().parse_args(argv)


class Chat:
    """A conversation with one model: ``reply(text)`` streams the answer to ``out`` and returns it."""

    def __init__(self, model, tokenizer, args, out=None):
        self.model, self.tokenizer, self.args, self.out = model, tokenizer, args, out
        self.messages: list[dict] = []

    def reset(self) -> None:
        self.messages = []

    @torch.no_grad()
    def reply(self, text: str) -> str:
        turn = self.messages + [{"role": "user", "content": text}] if self.args.history else \
            [{"role": "user", "content": text}]
        ids = torch.tensor([encode_prompt(self.tokenizer, turn)], device=self.model.device)
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda chunk, stream_end=False: print(chunk, end="\n" if stream_end else "",
                                                                         file=self.out or sys.stdout, flush=True)
        sampling = dict(do_sample=True, temperature=self.args.temperature, top_p=self.args.top_p) \
            if self.args.temperature > 0 else dict(do_sample=False)
        output = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.args.max_new_tokens,
                                     streamer=streamer, pad_token_id=self.tokenizer.pad_token_id,
                                     eos_token_id=stop_ids(self.tokenizer), **sampling)
        answer = self.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()
        if self.args.history:
            self.messages = turn + [{"role": "assistant", "content": answer}]
        return answer


def chat_problems(args) -> list[str]:
    """What is wrong with chat's flags."""
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        return ["--max_new_tokens must be at least 1, --temperature 0 or positive, --top_p in (0, 1]"]
    return []


def main(args):
    check_args(args, chat_problems)
    torch.manual_seed(args.seed)
    model, tokenizer, _ = load_for_inference(args, device=args.device)
    chat = Chat(model, tokenizer, args)
    name = model_name(args)
    if args.prompt:
        answers = []
        for text in args.prompt:
            print(f"> {text}", flush=True)
            answers.append(chat.reply(text))
        return answers
    print(f"chatting with {name}; /reset forgets the conversation, /exit or Ctrl-D leaves", flush=True)
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return None
        if text in ("/exit", "/quit"):
            return None
        if text == "/reset":
            chat.reset()
            print("(conversation cleared)")
        elif text:
            chat.reply(text)


if __name__ == "__main__":
    run_cli(main, parse_args)
