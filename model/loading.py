"""``init_model``: every way a user names starting weights, loaded strictly and safely.

``from_weight`` is one of
  none                         random init (MiniMind's default sizes unless given)
  a path                       a Hugging Face model folder (config.json + weights), a LoRA
                               adapter folder (adapter_config.json; merged into the base it
                               records), or a bare state dict ``.safetensors`` / ``.pth`` with
                               MiniMind's key names
  a name                       looked up MiniMind's way, first in ``save_dir`` and then among
                               the shipped demo weights (``model/demo``):
                               ``{name}_{hidden_size}[_moe]/``, ``.safetensors``, ``.pth``

Loading is strict: missing or unexpected keys, or sizes that disagree with the ones given,
stop with a UserError naming the file, the keys and the real size. Pickles are read with
``torch.load(weights_only=True)`` only; ``trust_remote_code`` is never set.

The tokenizer goes with the weights (``choose_tokenizer``): ``--tokenizer_path``, their folder's
own, a MiniMind checkout's ``model/`` for ``<repo>/out/x.pth``, an adapter's base's; the shipped
one only for the shipped weights and ``none``; otherwise the load stops with one line.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import re
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from core.errors import UserError
from core.runtime import check_device
from dataset.encoding import stop_ids
from model.config import LMConfig, build_model, weight_name
from model.lora import is_adapter_dir, load_lora, merge_lora, read_adapter_meta
from model.minimind import fuse_experts, is_minimind_lora, merge_minimind_lora
from model.strict import key_mismatch

MODEL_DIR = os.path.dirname(os.path.abspath(__file__))
SHIPPED_DIR = os.path.join(MODEL_DIR, "demo")      # the demo SFT weights and lora_identity
SHIPPED_TOKENIZER = MODEL_DIR                      # tokenizer.json, tokenizer_config.json
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SUFFIXES = ("", ".safetensors", ".pth")            # folder first, then the two file kinds


@dataclass
class WeightSource:
    kind: str          # "none" | "hf" | "adapter" | "file"
    path: str | None = None


# ----------------------------------------------------------------------------- tokenizer
def load_tokenizer(path: str | None = None):
    """The tokenizer in ``path`` (default: the shipped one), with left padding off by default."""
    path = path or SHIPPED_TOKENIZER
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise UserError(f"--tokenizer_path {path}: no tokenizer.json or tokenizer_config.json there")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UserError(f"cannot load the tokenizer in {path}: {e.__class__.__name__}: {e}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise UserError(f"the tokenizer in {path} has no chat template; use one that has (e.g. the shipped model/)")
    return tokenizer


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)


def weights_tokenizer(src: WeightSource) -> tuple[str, str] | None:
    """(folder, how) of the tokenizer that goes with the weights ``src`` names themselves, their
    base aside; how is "own" (a model or adapter folder's own tokenizer files), "checkout" (a
    bare file in a MiniMind checkout, ``<repo>/out/x.pth``: ``<repo>/model/``) or "shipped" (a
    random init, or the shipped weights in model/demo). None: no tokenizer goes with them."""
    if src.kind == "none":
        return SHIPPED_TOKENIZER, "shipped"
    if src.kind in ("hf", "adapter") and has_tokenizer(src.path):
        return src.path, "own"
    if src.kind == "file":
        checkout_model = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(src.path))), "model")
        if has_tokenizer(checkout_model):
            return checkout_model, "checkout"
    if _inside(src.path, SHIPPED_DIR):
        return SHIPPED_TOKENIZER, "shipped"
    return None


def choose_tokenizer(found: tuple[str, str] | None, tokenizer_path: str | None, weights: str, rows: int):
    """The tokenizer for weights with ``rows`` embedding rows (``weights`` names them in
    messages): ``--tokenizer_path``, else the one ``found`` with them (``weights_tokenizer``,
    walked down to an adapter's base), checked by ``check_vocab``. With neither, stop: training
    with a tokenizer the weights were not trained with would run, and learn nothing useful."""
    if tokenizer_path:
        found = tokenizer_path, "given"
    if found is None:
        raise UserError(f"{weights}: no tokenizer goes with these weights ({rows}-token vocabulary; no tokenizer "
                        f"files with them or in their MiniMind checkout's model/); pass --tokenizer_path with the "
                        f"folder of the tokenizer they were trained with (e.g. MiniMind's model/)")
    folder, how = found
    tokenizer = load_tokenizer(folder)
    check_vocab(tokenizer, rows, weights, folder, own=how == "own")
    return tokenizer


def shipped_rows() -> int:
    """The most embedding rows the shipped tokenizer goes with: its size rounded up to a multiple
    of 128, as a model padded for fast matrix products would have."""
    return -(-len(_shipped_vocab()) // 128) * 128


@functools.lru_cache(maxsize=1)
def _shipped_vocab() -> dict:
    return load_tokenizer(SHIPPED_TOKENIZER).get_vocab()


def is_demo_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` is the shipped demo one (the same vocabulary), wherever it was loaded from."""
    return tokenizer.get_vocab() == _shipped_vocab()


def demo_weights(source: WeightSource, tokenizer) -> str | None:
    """Why the weights ``source`` (loaded with ``tokenizer``) are the demo's: random init, the
    shipped ones, or any on the demo tokenizer (your own demo runs); None when they are not."""
    if source.kind == "none":
        return "a randomly initialised model (--from_weight none)"
    if source.path and _inside(source.path, SHIPPED_DIR):
        return "the shipped demo weights"
    if is_demo_tokenizer(tokenizer):
        return "weights on the demo tokenizer"
    return None


def check_vocab(tokenizer, rows: int, weights: str, folder: str, own: bool = False) -> None:
    """Refuse a tokenizer that cannot go with an embedding of ``rows`` rows: one with ids past the
    embedding, or, unless it is the weights' ``own`` (a published model pads its embedding to a
    multiple of 64 or 128, often by hundreds of rows), the shipped demo tokenizer with an
    embedding far larger than it (over ``shipped_rows()``): the weights were trained with another."""
    if len(tokenizer) > rows:
        raise UserError(f"the tokenizer in {folder} has {len(tokenizer)} tokens but {weights} has an embedding of "
                        f"{rows} rows; pass --tokenizer_path of the tokenizer these weights were trained with")
    if not own and rows > shipped_rows() and is_demo_tokenizer(tokenizer):
        raise UserError(f"{weights} has a {rows}-token vocabulary but the tokenizer in {folder} is the shipped "
                        f"{len(tokenizer)}-token demo one; pass --tokenizer_path of the tokenizer these weights "
                        f"were trained with, e.g. MiniMind's model/")


# ----------------------------------------------------------------------------- resolution
def _classify(path: str) -> WeightSource | None:
    if os.path.isdir(path):
        if is_adapter_dir(path):
            return WeightSource("adapter", path)
        if os.path.isfile(os.path.join(path, "config.json")):
            return WeightSource("hf", path)
        return None
    if os.path.isfile(path) and path.endswith((".safetensors", ".pth", ".pt", ".bin")):
        return WeightSource("file", path)
    return None


def _candidate_stems(name: str, lm_config: LMConfig, folder: str) -> list[str]:
    if lm_config.hidden_size is not None:
        moes = [lm_config.use_moe] if lm_config.use_moe is not None else [False, True]
        return [weight_name(name, lm_config.hidden_size, moe) for moe in moes]
    # No size given: whatever {name}_{size}[_moe] exists in this folder.
    pattern = re.compile(re.escape(name) + r"_(\d+)(_moe)?(\.safetensors|\.pth|\.old)?$")   # .old: see atomic_dir
    found = []
    for p in sorted(glob.glob(os.path.join(glob.escape(folder), glob.escape(name) + "_*"))):
        m = pattern.match(os.path.basename(p))
        if m and (lm_config.use_moe is None or bool(m.group(2)) == bool(lm_config.use_moe)):
            stem = os.path.basename(p)[: len(os.path.basename(p)) - len(m.group(3) or "")]
            if stem not in found:
                found.append(stem)
    return found


def resolve_weight(from_weight: str, lm_config: LMConfig, save_dir: str = "out", flag: str = "--from_weight",
                  beside: str | None = None) -> WeightSource:
    """Find what ``from_weight`` names (see the module doc), or raise listing every path tried
    (the message names the command-line ``flag`` it came from). beside: a folder a name is
    looked up in before ``save_dir`` (a MiniMind LoRA file's own, for its base)."""
    if from_weight in (None, "", "none"):
        return WeightSource("none")
    direct = _classify(from_weight)
    if direct:
        return direct
    if os.path.exists(from_weight):
        raise UserError(f"{flag} {from_weight}: not a model folder (config.json), an adapter folder "
                        f"(adapter_config.json) or a .safetensors/.pth weights file")
    tried = []
    for folder in dict.fromkeys(f for f in (beside, save_dir, SHIPPED_DIR) if f):
        stems = _candidate_stems(from_weight, lm_config, folder)
        if lm_config.use_moe is None and len({s.removesuffix("_moe") for s in stems}) == 1 and len(stems) > 1:
            stems = [s for s in stems if not s.endswith("_moe")]   # one size, dense and MoE: MiniMind's --use_moe 0
        if lm_config.hidden_size is None and len(stems) > 1:
            raise UserError(f"{flag} {from_weight}: several sizes in {folder} ({', '.join(stems)}); "
                            f"pass --hidden_size to choose")
        if not stems:
            tried.append(os.path.join(folder, f"{from_weight}_*"))
        for stem in stems:
            for suffix in SUFFIXES:
                path = os.path.join(folder, stem + suffix)
                tried.append(path)
                src = _classify(path) or (_classify(path + ".old") if suffix == "" else None)
                if src:
                    return src
    raise UserError(f"{flag} {from_weight} not found; tried {', '.join(tried)}; "
                    f"give a path, a name saved in --save_dir, or none")


# ----------------------------------------------------------------------------- loading
def _size_words(c: LMConfig) -> str:
    return f"--hidden_size {c.hidden_size} --num_hidden_layers {c.num_hidden_layers}" + \
        (" --use_moe 1" if c.use_moe else "")


def _check_sizes(path: str, asked: LMConfig, real: LMConfig) -> None:
    """Stop when a size the user gave disagrees with what the checkpoint really is."""
    given = []
    # A size the checkpoint does not record (None) is not checked here; the strict load checks it.
    if None not in (asked.hidden_size, real.hidden_size) and asked.hidden_size != real.hidden_size:
        given.append(f"--hidden_size {asked.hidden_size}")
    if None not in (asked.num_hidden_layers, real.num_hidden_layers) and asked.num_hidden_layers != real.num_hidden_layers:
        given.append(f"--num_hidden_layers {asked.num_hidden_layers}")
    if None not in (asked.use_moe, real.use_moe) and bool(asked.use_moe) != bool(real.use_moe):
        given.append(f"--use_moe {int(bool(asked.use_moe))}")
    if given:
        raise UserError(f"{path} has {_size_words(real)} but {' '.join(given)} was given; "
                        f"pass {_size_words(real)} or leave the sizes out")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights file {path}: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}; "
                        f"the file is truncated, damaged or not a weights file")
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # a training checkpoint that holds the model's state dict under "model"
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}  # saved from DDP
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def infer_lm_config(sd: dict[str, torch.Tensor], path: str) -> LMConfig:
    """The sizes a bare MiniMind/Qwen3 state dict really has, read off its tensor shapes."""
    try:
        vocab, hidden = sd["model.embed_tokens.weight"].shape
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k)))
        head_dim = sd["model.layers.0.self_attn.q_norm.weight"].shape[0]
        heads = sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim
        kv_heads = sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim
    except (KeyError, ValueError) as e:
        if "model.embed_tokens.weight" in sd and "model.layers.0.self_attn.q_norm.weight" not in sd:
            raise UserError(f"{path} has no q/k norm weights (model.layers.0.self_attn.q_norm.weight): it is an "
                            f"older MiniMind architecture; this project loads MiniMind's current (Qwen3-style) "
                            f"models, or any Hugging Face model folder")
        raise UserError(f"{path} does not look like a MiniMind/Qwen3 state dict (no {e}); "
                        f"its first keys are {list(sd)[:4]}")
    use_moe = any(".mlp.experts." in k for k in sd)
    if use_moe:
        gate = next(v for k, v in sd.items() if k.endswith("mlp.gate.weight"))
        down = next(v for k, v in sd.items() if ".mlp.experts." in k and "down_proj" in k)
        num_experts, intermediate = gate.shape[0], (down.shape[-1] if down.dim() == 3 else down.shape[1])
    else:
        num_experts, intermediate = 4, sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
    tied = "lm_head.weight" not in sd or torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    return LMConfig(hidden_size=hidden, num_hidden_layers=layers, use_moe=use_moe, vocab_size=vocab,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                    tie_word_embeddings=tied, num_experts=num_experts)


def _load_file(path: str, lm_config: LMConfig, sd: dict | None = None):
    sd = fuse_experts(_read_state_dict(path) if sd is None else sd, path)  # MiniMind stores each MoE expert apart
    real = infer_lm_config(sd, path)
    for f in ("max_position_embeddings", "rope_theta", "rms_norm_eps", "num_experts_per_tok", "norm_topk_prob",
              "router_aux_loss_coef"):
        setattr(real, f, getattr(lm_config, f))  # not recorded in a bare state dict
    _check_sizes(path, lm_config, real)
    model = build_model(real)
    expected = model.state_dict()
    if real.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    problem = key_mismatch(sd, expected)
    if problem:
        raise UserError(f"{path} does not load strictly ({problem})")
    model.load_state_dict(sd, strict=False)  # strictness checked above, tied lm_head aside
    return model, real


def _load_hf(path: str, lm_config: LMConfig):
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise UserError(f"cannot read {os.path.join(path, 'config.json')}: {e.__class__.__name__}: {e}")
    if hf_config.model_type in ("qwen3", "qwen3_moe"):
        real = LMConfig.from_hf(hf_config)
    else:  # any other transformers causal LM: only its sizes matter here
        real = LMConfig(hidden_size=hf_config.hidden_size, num_hidden_layers=hf_config.num_hidden_layers,
                        use_moe=False, vocab_size=hf_config.vocab_size,
                        num_attention_heads=getattr(hf_config, "num_attention_heads", 8),
                        num_key_value_heads=getattr(hf_config, "num_key_value_heads", 4),
                        intermediate_size=getattr(hf_config, "intermediate_size", None))
    _check_sizes(path, lm_config, real)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except Exception as e:
        raise UserError(f"cannot load the model in {path}: {e.__class__.__name__}: {str(e).splitlines()[0][:300]}; "
                        f"a weights file there may be cut short or damaged: copy or export it again")
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise UserError(f"{path} does not load strictly: " + "; ".join(f"{k} {sorted(v)[:4]}" for k, v in bad.items()))
    return model, real


def _load_adapter(path: str, lm_config: LMConfig, save_dir: str, depth: int = 0):
    if depth > 8:
        raise UserError(f"adapter {path}: its chain of recorded bases is more than 8 deep (a loop?); "
                        f"give the base as --from_weight and the adapter as --lora_weight")
    src = adapter_base(path, lm_config, save_dir)
    model, real, tokenizer = _load_source(src, lm_config, save_dir, depth + 1)
    load_lora(model, path)
    merge_lora(model)
    return model, real, weights_tokenizer(WeightSource("adapter", path)) or tokenizer


def adapter_base(path: str, lm_config: LMConfig, save_dir: str = "out") -> WeightSource:
    """Where the base weights of the adapter folder ``path`` are (the path it recorded, else its
    base name resolved like --from_weight)."""
    meta = read_adapter_meta(path)
    base = meta.get("base")
    adapter_config = LMConfig.from_dict(meta["lm_config"]) if meta.get("lm_config") else lm_config
    _check_sizes(path, lm_config, adapter_config)
    base_path = os.path.normpath(os.path.join(path, meta["base_path"])) if meta.get("base_path") else None
    if base_path and _classify(base_path):
        return _classify(base_path)
    if base:
        return resolve_weight(base, LMConfig(hidden_size=adapter_config.hidden_size,
                                             num_hidden_layers=adapter_config.num_hidden_layers,
                                             use_moe=adapter_config.use_moe), save_dir)
    raise UserError(f"adapter {path} does not record its base model; give the base as --from_weight "
                    f"and the adapter as --lora_weight")


def same_weights(a: WeightSource, b: WeightSource) -> bool:
    """True when both name the same weight file or folder (an adapter never counts: it is merged)."""
    return (a.kind == b.kind and a.kind in ("file", "hf") and a.path is not None and b.path is not None
            and os.path.realpath(a.path) == os.path.realpath(b.path))


def _load_source(src: WeightSource, lm_config: LMConfig, save_dir: str, depth: int = 0,
                 base_weight: str = "full_sft"):
    """(model, real LMConfig, (folder, how) of its tokenizer or None: see weights_tokenizer; an
    adapter's or a MiniMind LoRA file's own first, then its base's). base_weight: the base a
    MiniMind LoRA file (``lora_identity_512.pth``) is merged into, looked up beside it first."""
    if src.kind == "none":
        real = lm_config.filled()
        return build_model(real), real, weights_tokenizer(src)
    if src.kind == "file":
        sd = _read_state_dict(src.path)
        if is_minimind_lora(sd):
            base = minimind_lora_base(src.path, base_weight, lm_config, save_dir)
            model, real, tokenizer = _load_source(base, lm_config, save_dir, depth + 1)
            merge_minimind_lora(model, sd, src.path)
            return model, real, weights_tokenizer(src) or tokenizer
        model, real = _load_file(src.path, lm_config, sd)
        return model, real, weights_tokenizer(src)
    if src.kind == "hf":
        model, real = _load_hf(src.path, lm_config)
        return model, real, weights_tokenizer(src)
    return _load_adapter(src.path, lm_config, save_dir, depth)


def minimind_lora_base(path: str, base_weight: str, lm_config: LMConfig, save_dir: str) -> WeightSource:
    """The base the MiniMind LoRA file ``path`` is merged into: ``--base_weight``, looked up
    beside the file, then in ``save_dir`` and the shipped demo."""
    base = resolve_weight(base_weight, lm_config, save_dir, flag="--base_weight", beside=os.path.dirname(path))
    if base.kind == "file" and is_minimind_lora(_read_state_dict(base.path)):
        raise UserError(f"--base_weight {base_weight} is a MiniMind LoRA file too ({base.path}); "
                        f"give the full model it was trained on")
    return base


def set_stop_tokens(model, tokenizer, eos_token: str | None = None) -> list[int]:
    """Record on ``tokenizer`` the token that ends an assistant turn (``turn_end_id``: the
    ``eos_token`` given, else the chat template's own, dataset.encoding.find_turn_end) and every
    token that ends a response (``stop_ids``: that turn end, the tokenizer's eos and the
    model's own ``generation_config.eos_token_id`` list, which is kept and extended, not
    replaced); the model's generation config gets the whole list. Returns it."""
    if eos_token:
        ids = tokenizer(eos_token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UserError(f"--eos_token {eos_token!r} is {len(ids)} tokens in this tokenizer; give one token "
                            f"(e.g. {tokenizer.eos_token!r})")
    tokenizer.turn_end_id = ids[0] if eos_token else None      # None: read off the template (turn_end_id)
    own = model.generation_config.eos_token_id
    tokenizer.stop_ids = None                                   # derived afresh, not kept from an earlier call
    tokenizer.stop_ids = stop_ids(tokenizer, also=own if isinstance(own, (list, tuple)) else [own])
    model.generation_config.eos_token_id = tokenizer.stop_ids
    return tokenizer.stop_ids


def init_model(lm_config: LMConfig, from_weight: str = "none", device="cpu", save_dir: str = "out",
               tokenizer_path: str | None = None, eos_token: str | None = None, base_weight: str = "full_sft",
               flag: str = "--from_weight", lora_weight: str | None = None):
    """Build the model ``from_weight`` names (see the module doc) and its tokenizer.

    lm_config: the sizes the user asked for; a None size means "the checkpoint's". It is
    completed in place with what was really loaded, so ``lm_config.hidden_size`` names the
    output files afterwards. The model comes back in fp32 on ``device``, in eval mode.
    tokenizer_path: default the one that goes with the weights (``choose_tokenizer``): their
    folder's own, a MiniMind checkout's model/, an adapter's base's; the shipped one only for
    the shipped weights and ``none``. eos_token: the token that ends an assistant turn
    (default: the chat template's own); see ``set_stop_tokens``. base_weight: the base a
    MiniMind LoRA file is merged into. flag: the flag ``from_weight`` came from, for messages.
    lora_weight: an adapter (or MiniMind LoRA file) merged on top; its own tokenizer goes first.
    """
    device = check_device(str(device))
    src = resolve_weight(from_weight, lm_config, save_dir, flag=flag)
    if src.kind == "none":
        tokenizer = load_tokenizer(tokenizer_path)
        lm_config.vocab_size = len(tokenizer)
        lm_config.pad_token_id, lm_config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        lm_config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    model, real, found = _load_source(src, lm_config, save_dir, base_weight=base_weight)
    if lora_weight:
        lora = add_lora_weight(model, lora_weight, real, save_dir)
        found = weights_tokenizer(lora) or found
    if src.kind != "none" or lora_weight:
        where = from_weight if src.path in (None, from_weight) else f"{flag} {from_weight} ({src.path})"
        tokenizer = choose_tokenizer(found, tokenizer_path, where, model.get_input_embeddings().weight.shape[0])
    for k, v in real.to_dict().items():
        setattr(lm_config, k, v)
    model.weight_source = src  # where the weights came from, recorded in saved adapters
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    set_stop_tokens(model, tokenizer, eos_token)
    return model.to(device).eval(), tokenizer


def disable_dropout(model) -> int:
    """Set every dropout of ``model`` to 0, in place: the probability of each ``nn.Dropout``
    and each float ``*dropout*`` attribute a module reads at forward time (attention dropout
    in Llama-style attention), as TRL's ``disable_dropout`` does. Its config is left as it is,
    so an exported model keeps its own setting. Returns how many were non-zero."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            changed += module.p != 0
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float):
                changed += value != 0
                setattr(module, name, 0.0)
    return changed


def resolve_lora_weight(lora_weight: str, lm_config: LMConfig, save_dir: str = "out") -> WeightSource:
    """The adapter folder or MiniMind LoRA file ``--lora_weight`` names (see resolve_weight)."""
    src = resolve_weight(lora_weight, LMConfig(hidden_size=lm_config.hidden_size,
                                               num_hidden_layers=lm_config.num_hidden_layers,
                                               use_moe=lm_config.use_moe), save_dir, flag="--lora_weight")
    if src.kind != "adapter" and not (src.kind == "file" and is_minimind_lora(_read_state_dict(src.path))):
        raise UserError(f"--lora_weight {lora_weight}: {src.path} is not a LoRA adapter folder (no "
                        f"adapter_config.json) or a MiniMind LoRA file; give full weights as --from_weight instead")
    return src


def add_lora_weight(model, lora_weight: str, lm_config: LMConfig, save_dir: str = "out") -> WeightSource:
    """Merge the adapter ``lora_weight`` (a path, or a name in ``save_dir`` / the shipped demo;
    an adapter folder or a MiniMind LoRA file) into ``model``, in place, whatever base it was
    trained on. Returns where it was found."""
    src = resolve_lora_weight(lora_weight, lm_config, save_dir)
    if src.kind == "file":
        merge_minimind_lora(model, _read_state_dict(src.path), src.path)
    else:
        load_lora(model, src.path)
        merge_lora(model)
    return src


def lora_base(args) -> str:
    """The base ``load_for_inference(args)`` merges ``--lora_weight`` into (a path, or ``none``):
    ``--from_weight`` when given, else the base the adapter records (a MiniMind LoRA file:
    ``--base_weight``). What eval_align compares an adapter's answers against."""
    if args.from_weight is not None:
        return args.from_weight
    lm_config = LMConfig.from_args(args)
    src = resolve_lora_weight(args.lora_weight, lm_config, args.save_dir)
    if src.kind == "adapter":
        base = adapter_base(src.path, lm_config, args.save_dir)
    else:
        base = minimind_lora_base(src.path, args.base_weight, lm_config, args.save_dir)
    return base.path or "none"


def model_name(args) -> str:
    """How eval_align and chat name the model ``load_for_inference(args)`` loads."""
    if args.from_weight is None and getattr(args, "lora_weight", None):
        return f"{args.lora_weight} (on the base it records)"
    return (args.from_weight or "full_sft") + (f" + {args.lora_weight}" if getattr(args, "lora_weight", None) else "")


def load_for_inference(args, device="cpu"):
    """(model in eval mode, tokenizer, LMConfig) from --from_weight, --tokenizer_path, the size
    flags and --save_dir, with --lora_weight merged in when given: how eval_align, export and
    chat load a model. Without --from_weight (None), --lora_weight alone is loaded: merged
    into the base it recorded (a MiniMind LoRA file: into --base_weight), with its tokenizer;
    with neither, full_sft. With both, the adapter's own tokenizer goes before the base's."""
    lm_config = LMConfig.from_args(args)
    lora_weight = getattr(args, "lora_weight", None)
    if args.from_weight is None and lora_weight:
        weights = dict(from_weight=lora_weight, flag="--lora_weight")
    else:
        weights = dict(from_weight=args.from_weight or "full_sft", lora_weight=lora_weight)
    model, tokenizer = init_model(lm_config, device=device, save_dir=args.save_dir, tokenizer_path=args.tokenizer_path,
                                  eos_token=args.eos_token, base_weight=args.base_weight, **weights)
    return model.eval(), tokenizer, lm_config

