"""LoRA ("LoRA Identity" in the seed) through peft, injected in place.

``apply_lora`` adds adapters to the model you pass and returns it: B starts at zero, so the
adapted model computes exactly what the base computes until it trains. Only parameters with
``lora`` in their name train. Adapters are saved in PEFT's own format
(``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.*``), so
``peft.PeftModel.from_pretrained(base, folder)`` loads them as they are. Next to them,
``minialign.json`` records where the base came from (so ``--from_weight <adapter>`` can
rebuild it) and the model config, and the tokenizer the adapter was trained with is saved
beside them (as many published adapters do), so a moved adapter keeps it.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from core.errors import UserError
from core.files import atomic_dir, write_tensor_files
from model.strict import key_mismatch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
META_FILE = "minialign.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts in front of module paths


def _base(module):
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _projections(model) -> dict[str, torch.nn.Module]:
    """The model's linear layers (``nn.Linear``, and GPT-2's ``Conv1D``) by module path, counting
    those that already carry an adapter, adapter branches themselves left out."""
    return {name: _base(m) for name, m in model.named_modules()
            if isinstance(_base(m), (torch.nn.Linear, Conv1D)) and ".lora_" not in name and not name.endswith("base_layer")}


def _linear_names(model) -> set[str]:
    """Names (last path part) of the model's linear layers, the output head included."""
    return {name.rsplit(".", 1)[-1] for name in _projections(model)}


def default_targets(model) -> list[str]:
    """Every attention and MLP projection of any family, as peft's ``all-linear`` finds them:
    each linear layer (``nn.Linear`` or ``Conv1D``) except the output head and an MoE's router
    (a linear layer beside an ``experts`` module); fused expert tensors are not layers, so they
    are left alone."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = _base(head) if head is not None else None
    names = set()
    for path, layer in _projections(model).items():
        parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
        if layer is head or hasattr(parent, "experts"):
            continue
        names.add(path.rsplit(".", 1)[-1])
    return sorted(names)


def apply_lora(model, rank: int = 8, alpha: float = 16, targets=None, dropout: float = 0.0,
               adapter_name: str = "default"):
    """Inject LoRA adapters into ``model`` in place and return it.

    targets: module names (e.g. ``q_proj``) to adapt; default: every attention and MLP
    projection the model has (``default_targets``). Only parameters with ``lora`` in their
    name are left trainable. A second adapter (another ``adapter_name``, e.g. PPO's critic)
    goes beside the first on the same base weights; the active one stays active.
    """
    present = _linear_names(model)
    if targets is None:
        targets = default_targets(model)
        if not targets:
            raise UserError(f"{type(model).__name__} has no linear layer to put LoRA adapters on; "
                            f"name some with --lora_targets or train every parameter with --use_lora 0")
    else:
        targets = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
        missing = [t for t in targets if t not in present]
        if missing:
            raise UserError(f"--lora_targets {','.join(missing)}: no such linear layer in the model; "
                            f"choose from {','.join(sorted(present - {'lm_head'}))}")
    conv1d = any(isinstance(layer, Conv1D) for path, layer in _projections(model).items()
                 if path.rsplit(".", 1)[-1] in targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                        init_lora_weights=True, bias="none", fan_in_fan_out=conv1d)   # Conv1D stores W transposed
    _inject(config, model, adapter_name)
    for name, param in model.named_parameters():
        param.requires_grad = "lora" in name
    return model


def _inject(config, model, adapter_name: str) -> None:
    """peft's inject_adapter_in_model, keeping the adapter that was active before (peft makes
    the newest one active) and without its warning about a model with several adapters."""
    before = active_adapter(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    if before is not None:
        _set_active(model, before)


def active_adapter(model) -> str | None:
    """The name of the adapter the model runs with (None: no adapter injected)."""
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            return m.active_adapters[0]
    return None


def _set_active(model, name: str) -> None:
    # BaseTunerLayer.set_adapter would also flip requires_grad on every adapter; only the
    # routing changes here, so the trainable set stays what the optimizer and DDP expect.
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m._active_adapter = [name]


@contextlib.contextmanager
def use_adapter(model, name: str):
    """Run ``model`` with adapter ``name`` (e.g. PPO's critic) inside the block, then switch back."""
    before = active_adapter(model)
    _set_active(model, name)
    try:
        yield model
    finally:
        if before is not None:
            _set_active(model, before)


def adapter_parameters(model, adapter_name: str) -> list[torch.nn.Parameter]:
    """The LoRA tensors of one adapter (``...lora_A.<adapter_name>.weight``)."""
    return [p for n, p in model.named_parameters() if f".{adapter_name}." in n and ".lora_" in n]


def lora_state_dict(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors with PEFT's file key names (``base_model.model.<path>.lora_A.weight``)."""
    sd = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    return {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def save_lora(model, out_dir: str, base: str | None = None, lm_config=None, adapter_name: str = "default",
              extra: dict | None = None, extra_tensors: dict | None = None, tokenizer=None) -> None:
    """Write the adapter in PEFT format to ``out_dir`` (atomically: a temp folder, then rename).

    base: how the base model was given (``--from_weight``), recorded so the adapter can be
    merged into it later, with the path it resolved to (``model.weight_source``, set by
    ``init_model``) relative to the adapter folder; lm_config: the base's LMConfig; tokenizer:
    the one it was trained with, its files written into the folder.
    """
    source = getattr(model, "weight_source", None)
    base_path = os.path.relpath(os.path.abspath(source.path), os.path.abspath(out_dir)) if source and source.path else None
    meta = {"base": base, "base_path": base_path,
            "lm_config": lm_config.to_dict() if lm_config is not None else None, **(extra or {})}
    config = model.peft_config[adapter_name]
    config.base_model_name_or_path = base
    config.inference_mode = True
    with atomic_dir(out_dir) as tmp:
        save_file(lora_state_dict(model, adapter_name), os.path.join(tmp, ADAPTER_WEIGHTS))
        config.save_pretrained(tmp)
        write_tensor_files(tmp, extra_tensors)  # e.g. a reward model's value_head.safetensors
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_adapter_meta(path: str) -> dict:
    """The adapter folder's minialign.json, or what adapter_config.json alone tells."""
    meta_path = os.path.join(path, META_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            return json.load(f)
    with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
        return {"base": json.load(f).get("base_model_name_or_path"), "lm_config": None}


def load_lora(model, adapter_dir: str, adapter_name: str = "default"):
    """Inject the adapter saved in ``adapter_dir`` into ``model`` and load its weights, strictly.

    Every tensor in the file must find its place and every injected LoRA tensor must be in the
    file, with the same shape; otherwise a UserError names the keys.
    """
    weights = os.path.join(adapter_dir, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise UserError(f"adapter folder {adapter_dir} has no {ADAPTER_WEIGHTS}")
    config = LoraConfig.from_pretrained(adapter_dir)
    try:
        state = load_file(weights)
    except Exception as e:  # truncated or not a safetensors file
        raise UserError(f"cannot read {weights}: {e.__class__.__name__}: {e}; the file is damaged, re-save the adapter")
    try:
        _inject(config, model, adapter_name)
    except ValueError as e:
        raise UserError(f"adapter {adapter_dir} does not fit the model: {e}")
    state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    expected = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    problem = key_mismatch(state, expected)
    if problem:
        raise UserError(f"adapter {adapter_dir} does not match the model ({problem}); check --hidden_size / --from_weight")
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    for name, param in model.named_parameters():
        param.requires_grad = "lora" in name
    return model


def merge_lora(model):
    """Fold every LoRA adapter into its base weights and remove the adapter layers, in place."""
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            replacements.append((name, module.get_base_layer()))
    for name, base_layer in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base_layer)
    if hasattr(model, "peft_config"):
        del model.peft_config
    for param in model.parameters():
        param.requires_grad = True
    return model


@contextlib.contextmanager
def adapters_disabled(model):
    """Run the base model: every LoRA adapter off inside the block, back on after.

    This is the reference model of DPO / PPO / GPO / GRPO with one copy of the weights.
    """
    # peft's enable_adapters() also flips requires_grad on the adapter weights; setting the
    # flag alone keeps the trainable set unchanged, as the optimizer and DDP expect.
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield model
    finally:
        for m, was_disabled in zip(layers, before):
            m._disable_adapters = was_disabled


@contextlib.contextmanager
def adapters_merged(model):
    """Inside the block the model runs with its active LoRA adapters folded into its weights:
    each adapted layer's weight is swapped for a new tensor W + scale * B A, and the adapter
    branches are off; after it, the original weight tensors are back, untouched.

    For sampling (no gradients): one matrix product per layer instead of three, at the cost of
    one more copy of the adapted weights while the block runs. The outputs equal the adapted
    model's up to rounding. A model without adapters runs as it is.
    """
    swapped = []
    try:
        with torch.no_grad():
            for layer in model.modules():
                if not isinstance(layer, LoraLayer) or layer.disable_adapters:
                    continue
                base = layer.get_base_layer()
                merged = base.weight.detach().clone()
                for name in layer.active_adapters:
                    if name in layer.lora_A:
                        merged += layer.get_delta_weight(name).to(merged.dtype)
                swapped.append((base, base.weight))
                base.weight = torch.nn.Parameter(merged, requires_grad=False)
        with adapters_disabled(model):
            yield model
    finally:
        for base, weight in swapped:
            base.weight = weight


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
