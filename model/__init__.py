"""Model side: config -> transformers model, init_model (every kind of weights, strictly, with their
tokenizer), LoRA, log-probs and packed forwards, the value head and the reward-model scorer,
MiniMind's files, export, the flags that name a model, the shipped demo weights."""
import os

# Weights come from local files only: a name is never looked up on a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
from model.config import LMConfig, build_model, weight_name
from model.loading import SHIPPED_DIR, init_model, load_tokenizer, resolve_weight
from model.lora import adapters_disabled, apply_lora, load_lora, merge_lora, save_lora

__all__ = ["LMConfig", "build_model", "weight_name", "init_model", "load_tokenizer", "resolve_weight",
           "SHIPPED_DIR", "apply_lora", "save_lora", "load_lora", "merge_lora", "adapters_disabled"]
