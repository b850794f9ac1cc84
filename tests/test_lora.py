"""LoRA: identity at start, only LoRA trains, PEFT-format save, reload, merge, export, adapters off."""
import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from model import LMConfig, adapters_disabled, apply_lora, init_model, save_lora
from model.export import main as export_main, parse_args as export_args
from model.lora import load_lora, merge_lora
from core.errors import UserError
from conftest import ADAPTER_FILES, sample_ids


def perturb_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def out(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_lora_starts_as_identity_and_only_lora_trains(tiny_model):
    model, _ = tiny_model
    ids = sample_ids()
    before = out(model, ids)
    apply_lora(model, rank=4, alpha=8)
    torch.testing.assert_close(out(model, ids), before, rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    assert any("down_proj.lora_A" in n for n in trainable) and any("q_proj.lora_B" in n for n in trainable)
    # every B starts at zero (that is what makes it the identity)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_lora_targets_and_unknown_target(tiny_model):
    model, _ = tiny_model
    apply_lora(model, rank=2, targets="q_proj,v_proj")
    names = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "v_proj"}
    model2, _ = tiny_model
    with pytest.raises(UserError, match="no such linear layer"):
        apply_lora(model2, targets="qkv")


def test_adapters_disabled_is_the_base_and_keeps_requires_grad(tiny_model):
    model, _ = tiny_model
    ids = sample_ids()
    base = out(model, ids)
    apply_lora(model, rank=4)
    perturb_lora(model)
    adapted = out(model, ids)
    assert not torch.allclose(adapted, base)
    flags = [p.requires_grad for p in model.parameters()]
    with adapters_disabled(model):
        torch.testing.assert_close(out(model, ids), base, rtol=0, atol=0)
    assert [p.requires_grad for p in model.parameters()] == flags
    torch.testing.assert_close(out(model, ids), adapted, rtol=0, atol=0)


def saved_adapter(tiny_dir, folder):
    """A trained-looking rank-4 adapter on the tiny model, saved to ``folder``; returns the
    sample ids and the adapted model's logits on them."""
    c = LMConfig()
    model, tok = init_model(c, "full_sft", save_dir=tiny_dir)
    apply_lora(model, rank=4)
    perturb_lora(model)
    ids = sample_ids()
    save_lora(model, str(folder), base="full_sft", lm_config=c, tokenizer=tok)
    return ids, out(model, ids)


def test_saved_adapter_holds_only_lora_and_reloads_identically(tiny_dir, tmp_path):
    ids, adapted = saved_adapter(tiny_dir, tmp_path / "mine_32")
    files = sorted(os.listdir(tmp_path / "mine_32"))
    assert files == ADAPTER_FILES
    tensors = load_file(str(tmp_path / "mine_32" / "adapter_model.safetensors"))
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert all(k.startswith("base_model.model.") for k in tensors)  # PEFT's own key names
    assert json.load(open(tmp_path / "mine_32" / "adapter_config.json"))["r"] == 4

    # our loader: into a fresh base, without merging
    fresh, _ = init_model(LMConfig(), "full_sft", save_dir=tiny_dir)
    load_lora(fresh, str(tmp_path / "mine_32"))
    torch.testing.assert_close(out(fresh, ids), adapted, rtol=0, atol=0)
    # peft's own loader, as it is
    base, _ = init_model(LMConfig(), "full_sft", save_dir=tiny_dir)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "mine_32"))
    torch.testing.assert_close(out(peft_model, ids), adapted, rtol=0, atol=0)
    # --from_weight <adapter>: merged into the base it records
    merged, _ = init_model(LMConfig(), str(tmp_path / "mine_32"), save_dir=tiny_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(out(merged, ids), adapted, rtol=1e-5, atol=1e-5)


def test_adapter_mismatch_is_refused(tiny_dir, tmp_path):
    model, _ = init_model(LMConfig(), "full_sft", save_dir=tiny_dir)
    apply_lora(model, rank=4)
    save_lora(model, str(tmp_path / "a_32"), base="full_sft", lm_config=LMConfig(hidden_size=32, num_hidden_layers=2))
    other, _ = init_model(LMConfig(hidden_size=64, num_hidden_layers=1), "none")
    with pytest.raises(UserError, match="does not match the model|does not fit"):
        load_lora(other, str(tmp_path / "a_32"))


def test_export_merges_and_reloads_with_automodel(tiny_dir, tmp_path):
    ids, adapted = saved_adapter(tiny_dir, os.path.join(tiny_dir, "expo_32"))
    dest = str(tmp_path / "merged")
    export_main(export_args(["--lora_weight", "expo", "--save_dir", tiny_dir, "--out", dest]))
    hf = AutoModelForCausalLM.from_pretrained(dest)
    torch.testing.assert_close(out(hf, ids), adapted, rtol=1e-5, atol=1e-5)
    assert os.path.isfile(os.path.join(dest, "tokenizer.json"))
    with pytest.raises(UserError, match="already exists"):
        export_main(export_args(["--lora_weight", "expo", "--save_dir", tiny_dir, "--out", dest]))


def test_merge_lora_equals_adapted(tiny_model):
    model, _ = tiny_model
    apply_lora(model, rank=4)
    perturb_lora(model)
    ids = sample_ids()
    adapted = out(model, ids)
    merge_lora(model)
    assert not hasattr(model, "peft_config")
    torch.testing.assert_close(out(model, ids), adapted, rtol=1e-5, atol=1e-5)


def test_adapters_merged_equals_adapted_and_restores_everything(tiny_model):
    import copy
    from model.lora import adapters_merged, use_adapter
    model = apply_lora(copy.deepcopy(tiny_model[0]), rank=4, alpha=8)
    apply_lora(model, rank=4, alpha=8, adapter_name="critic")     # a second adapter must stay out of the merge
    perturb_lora(model)
    ids = sample_ids()
    adapted = out(model, ids)
    with adapters_disabled(model):
        base = out(model, ids)
    weights = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    with adapters_merged(model):
        merged = out(model, ids)
        assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert (merged - base).abs().max() > 1e-2                      # the default adapter is in, really
    with use_adapter(model, "critic"):
        critic = out(model, ids)
        with adapters_merged(model):
            torch.testing.assert_close(out(model, ids), critic, atol=1e-5, rtol=1e-5)
    after = dict(model.named_parameters())
    for n, (p, value) in weights.items():                          # the same tensors, unchanged, same flags
        assert after[n] is p and torch.equal(p, value)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, (p, _) in weights.items() if p.requires_grad]
    torch.testing.assert_close(out(model, ids), adapted, rtol=0, atol=0)
    plain = copy.deepcopy(tiny_model[0])                           # no adapters: runs as it is
    with adapters_merged(plain):
        torch.testing.assert_close(out(plain, ids), out(tiny_model[0], ids), rtol=0, atol=0)
