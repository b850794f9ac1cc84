"""Train the shipped tokenizer on the demo corpus (byte-level BPE, ChatML special tokens).

    python -m model.train_tokenizer                 # rewrites model/tokenizer*.json
    python -m model.train_tokenizer --out DIR --vocab_size 2048

Like MiniMind's, ids 0, 1, 2 are <|endoftext|> (padding), <|im_start|> and <|im_end|> (the
end of every turn, so the end-of-sequence token for generation). Byte-level, so any text,
in any language, is encoded without unknown tokens. Load it with
``AutoTokenizer.from_pretrained("model")``.
"""
from __future__ import annotations

import argparse
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as MiniMind and Qwen render it. Every turn is "<|im_start|>{role}\n{content}<|im_end|>\n";
# the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(os.path.dirname(HERE), "dataset")
TRAIN_FILES = ["sft.jsonl", "identity.jsonl", "dpo.jsonl", "rl.jsonl"]  # never the held-out files


def corpus(files):
    """Every message text of the given JSON-lines files (SFT, DPO and prompt formats)."""
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for key in ("conversations", "chosen", "rejected"):
                    for msg in row.get(key, []):
                        yield msg["role"] + "\n" + msg["content"]


def train_tokenizer(files, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(files), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"{t} should have id {i}"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the shipped BPE tokenizer on the demo corpus.")
    parser.add_argument("--out", default=HERE, help="folder to save the tokenizer to (default: model/)")
    parser.add_argument("--data_dir", default=DATA, help="folder with the demo's training files")
    parser.add_argument("--vocab_size", type=int, default=2048, help="target vocabulary size")
    args = parser.parse_args(argv)
    tokenizer = train_tokenizer([os.path.join(args.data_dir, f) for f in TRAIN_FILES], args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f"saved a tokenizer of {len(tokenizer)} tokens to {args.out}")


if __name__ == "__main__":
    main()
