"""Tiny random models of real transformers families, each saved as a Hugging Face folder with a
tokenizer and a chat template of that family's shape.

The tokenizer is the shipped one (a byte-level BPE) with the family's special tokens added; the
templates follow the families' own (turn markers, system-prompt handling, an eos that differs
from the end of a turn where the family has that). Embeddings are padded to a multiple of 64
rows, as real checkpoints pad them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
import transformers
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from model.loading import SHIPPED_TOKENIZER

CHATML = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
          "{%- endif %}"
          "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Qwen3's shape: the last assistant turn carries an (empty) reasoning block that the generation
# prompt does not, and earlier turns' reasoning is dropped.
QWEN3 = ("{%- for m in messages %}{%- if m['role'] == 'assistant' and loop.last %}"
         "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
         "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{{- bos_token }}{%- for m in messages %}"
          "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
GEMMA = ("{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set first = messages[0]['content'] + '\\n\\n' %}"
         "{%- set loop_messages = messages[1:] %}{%- else %}{%- set first = '' %}{%- set loop_messages = messages %}{%- endif %}"
         "{%- for m in loop_messages %}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "{{- '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\\n' }}"
         "{%- endfor %}{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}")
PHI3 = ("{%- for m in messages %}{{- '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}")
MISTRAL = ("{{- bos_token }}{%- for m in messages %}{%- if m['role'] == 'user' %}{{- '[INST] ' + m['content'] + ' [/INST]' }}"
           "{%- elif m['role'] == 'system' %}{{- m['content'] + '\\n\\n' }}"
           "{%- else %}{{- m['content'] + eos_token }}{%- endif %}{%- endfor %}")
PLAIN = ("{%- for m in messages %}{{- m['role'] | capitalize + ':\\n' + m['content'] }}"
         "{{- eos_token if m['role'] == 'assistant' else '' }}{{- '\\n' }}{%- endfor %}"
         "{%- if add_generation_prompt %}{{- 'Assistant:\\n' }}{%- endif %}")


@dataclass
class Family:
    name: str
    config_class: str
    config: dict
    template: str
    specials: list[str]          # added special tokens, in id order after the shipped ones
    bos: str | None
    eos: str
    pad: str
    turn_end: str                # what ends an assistant turn in the template
    generation_eos: list[str] = field(default_factory=list)   # the model's own stop list
    sliding_window: int | None = None


COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
              max_position_embeddings=512)
FAMILIES = [
    Family("llama", "LlamaConfig", COMMON, LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>", "<|eot_id|>",
           ["<|end_of_text|>", "<|eot_id|>"]),
    Family("qwen2", "Qwen2Config", {**COMMON, "tie_word_embeddings": True}, CHATML, [], None, "<|endoftext|>",
           "<|endoftext|>", "<|im_end|>"),
    Family("qwen3", "Qwen3Config", {**COMMON, "head_dim": 8, "tie_word_embeddings": True}, QWEN3, [], None,
           "<|im_end|>", "<|endoftext|>", "<|im_end|>", ["<|im_end|>", "<|endoftext|>"]),
    Family("qwen3_moe", "Qwen3MoeConfig", {**COMMON, "head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "decoder_sparse_step": 1}, QWEN3, [], None, "<|im_end|>", "<|endoftext|>",
           "<|im_end|>"),
    Family("gemma3", "Gemma3TextConfig", {**COMMON, "head_dim": 8, "sliding_window": 512, "final_logit_softcapping": 30.0},
           GEMMA, ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<pad>",
           "<end_of_turn>", ["<eos>", "<end_of_turn>"]),
    Family("phi3", "Phi3Config", {**COMMON, "pad_token_id": None}, PHI3, ["<|user|>", "<|assistant|>", "<|system|>",
           "<|end|>"], None, "<|endoftext|>", "<|endoftext|>", "<|end|>", ["<|endoftext|>", "<|end|>"]),
    Family("mistral", "MistralConfig", {**COMMON, "sliding_window": 8, "head_dim": 8}, MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"],
           "<s>", "</s>", "</s>", "</s>", sliding_window=8),
    Family("gpt2", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.1, embd_pdrop=0.1,
           attn_pdrop=0.1), PLAIN, [], None, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
]
BY_NAME = {f.name: f for f in FAMILIES}


def family_tokenizer(fam: Family):
    """The shipped tokenizer with the family's special tokens, template and eos/bos/pad."""
    backend = Tokenizer.from_file(os.path.join(SHIPPED_TOKENIZER, "tokenizer.json"))
    backend.add_special_tokens(fam.specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=fam.eos, pad_token=fam.pad,
                                  bos_token=fam.bos, unk_token="<|endoftext|>")
    tok.chat_template = fam.template
    return tok


def make_family(fam: Family, folder: str, seed: int = 0) -> str:
    """Write a tiny random model of ``fam`` and its tokenizer to ``folder``; return it."""
    tok = family_tokenizer(fam)
    ids = lambda t: tok.convert_tokens_to_ids(t)   # noqa: E731
    vocab = -(-len(tok) // 64) * 64                # padded, as real checkpoints are
    cfg = dict(fam.config, vocab_size=vocab, eos_token_id=ids(fam.eos), bos_token_id=ids(fam.bos or fam.eos))
    if "pad_token_id" not in fam.config:
        cfg["pad_token_id"] = ids(fam.pad)
    config = getattr(transformers, fam.config_class)(**cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if fam.generation_eos:
        model.generation_config.eos_token_id = [ids(t) for t in fam.generation_eos]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_minimind(folder: str, seed: int = 0) -> str:
    """MiniMind's own layout: a bare state dict ``out/full_sft_32.pth`` with MiniMind's key
    names beside a checkout's ``model/`` tokenizer; returns the .pth path."""
    from model import LMConfig, init_model
    torch.manual_seed(seed)
    model, tok = init_model(LMConfig(hidden_size=32, num_hidden_layers=2), "none")
    os.makedirs(os.path.join(folder, "out"), exist_ok=True)
    tok.save_pretrained(os.path.join(folder, "model"))
    path = os.path.join(folder, "out", "full_sft_32.pth")
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return path


def describe(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)
