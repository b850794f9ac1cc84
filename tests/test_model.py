"""init_model: every from_weight form, strictness, sizes, errors."""
import os

import pytest
import torch
from safetensors.torch import save_file

from model import SHIPPED_DIR, LMConfig, build_model, init_model, resolve_weight
from core.errors import UserError
from conftest import TINY, sample_ids


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_config_defaults_follow_minimind():
    c = LMConfig(hidden_size=512, num_hidden_layers=8)
    assert c.intermediate_size == 1664  # ceil(512 * pi / 64) * 64
    hf = c.to_hf()
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.rms_norm_eps) == (8, 4, 1e-6)
    assert hf.tie_word_embeddings and hf.rope_parameters["rope_theta"] == 1e6
    assert type(build_model(LMConfig(**TINY, vocab_size=50))).__name__ == "Qwen3ForCausalLM"
    assert type(build_model(LMConfig(**TINY, vocab_size=50, use_moe=True))).__name__ == "Qwen3MoeForCausalLM"


def test_none_uses_tokenizer_vocab_and_fills_sizes():
    c = LMConfig(**TINY)
    model, tok = init_model(c, "none")
    assert c.vocab_size == len(tok) and model.get_input_embeddings().weight.shape == (len(tok), 32)
    c2 = LMConfig()
    init_model(c2, "none")
    assert (c2.hidden_size, c2.num_hidden_layers, c2.use_moe) == (512, 8, False)  # MiniMind's defaults


def test_every_from_weight_form_loads_the_same_model(tiny_dir, tiny_model, tmp_path):
    model, _ = tiny_model
    ids = sample_ids()
    ref = logits(model, ids)
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(tmp_path / "st_32.safetensors"))
    torch.save(model.state_dict(), tmp_path / "pth_32.pth")          # MiniMind-style, lm_head included
    for spec, save_dir in [("full_sft", tiny_dir), (os.path.join(tiny_dir, "full_sft_32"), "out"),
                           ("st", str(tmp_path)), (str(tmp_path / "pth_32.pth"), "out"), ("pth", str(tmp_path))]:
        c = LMConfig()
        bare = spec in ("st", "pth") or spec.endswith(".pth")      # a bare file: no tokenizer with it
        m, _ = init_model(c, spec, save_dir=save_dir, tokenizer_path="model" if bare else None)
        assert (c.hidden_size, c.num_hidden_layers) == (32, 2), spec
        torch.testing.assert_close(logits(m, ids), ref, rtol=0, atol=0, msg=spec)


def test_name_with_size_and_save_dir_before_shipped(tiny_dir):
    src = resolve_weight("full_sft", LMConfig(hidden_size=32), tiny_dir)
    assert src.kind == "hf" and src.path == os.path.join(tiny_dir, "full_sft_32")
    shipped = resolve_weight("full_sft", LMConfig(), "no_such_dir")
    assert shipped.path.startswith(SHIPPED_DIR)


def test_not_found_lists_every_path_tried(tiny_dir):
    with pytest.raises(UserError) as e:
        init_model(LMConfig(hidden_size=64), "nothing_here", save_dir=tiny_dir)
    msg = str(e.value)
    assert "nothing_here_64" in msg and os.path.join(tiny_dir, "nothing_here_64.pth") in msg
    assert os.path.join(SHIPPED_DIR, "nothing_here_64") in msg and "\n" not in msg


def test_size_mismatch_names_the_real_size(tiny_dir, tiny_model, tmp_path):
    model, _ = tiny_model
    torch.save(model.state_dict(), tmp_path / "w.pth")
    for spec in (str(tmp_path / "w.pth"), os.path.join(tiny_dir, "full_sft_32")):
        with pytest.raises(UserError, match="has --hidden_size 32 --num_hidden_layers 2 but --hidden_size 64"):
            init_model(LMConfig(hidden_size=64), spec)
    with pytest.raises(UserError, match="--num_hidden_layers 3"):
        init_model(LMConfig(hidden_size=32, num_hidden_layers=3), str(tmp_path / "w.pth"))


def test_missing_and_unexpected_keys_stop_the_load(tiny_model, tmp_path):
    model, _ = tiny_model
    sd = dict(model.state_dict())
    del sd["model.layers.1.mlp.up_proj.weight"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\]"):
        init_model(LMConfig(), str(tmp_path / "missing.pth"))
    sd = dict(model.state_dict(), **{"model.extra.weight": torch.zeros(3)})
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(UserError, match="unexpected keys"):
        init_model(LMConfig(), str(tmp_path / "extra.pth"))


def test_truncated_or_corrupt_files_give_one_line(tiny_model, tmp_path):
    model, _ = tiny_model
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(tmp_path / "a.safetensors"))
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "c.pth").write_bytes(b"not a checkpoint at all")
    for name in ("t.safetensors", "c.pth"):
        with pytest.raises(UserError, match="truncated, damaged or not a weights file") as e:
            init_model(LMConfig(), str(tmp_path / name))
        assert "\n" not in str(e.value)


def test_pickles_with_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"model.embed_tokens.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="cannot read weights file"):
        init_model(LMConfig(), str(tmp_path / "evil.pth"))


def test_bad_device_is_one_clear_line():
    with pytest.raises(UserError, match="--device cuda:7: this machine has"):
        init_model(LMConfig(**TINY), "none", device="cuda:7")
    with pytest.raises(UserError, match="not a device"):
        init_model(LMConfig(**TINY), "none", device="gpu please")


def test_tokenizer_path_and_vocab_check(tiny_dir, tmp_path):
    c = LMConfig(**TINY, vocab_size=10)
    small = build_model(c)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    with pytest.raises(UserError, match="--tokenizer_path"):
        init_model(LMConfig(), str(tmp_path / "small.pth"))
    with pytest.raises(UserError, match="no tokenizer.json"):
        init_model(LMConfig(**TINY), "none", tokenizer_path=str(tmp_path))
    _, tok = init_model(LMConfig(), "full_sft", save_dir=tiny_dir, tokenizer_path="model")
    assert tok.eos_token == "<|im_end|>"


def test_shipped_demo_weights_load_by_name():
    c = LMConfig()
    model, tok = init_model(c, "full_sft", save_dir="no_such_dir")
    assert c.hidden_size == 192 and len(tok) <= c.vocab_size
    c2 = LMConfig()
    init_model(c2, "lora_identity", save_dir="no_such_dir")  # an adapter merged into its recorded base
    assert c2.hidden_size == 192


def test_state_dict_without_qk_norm_is_named_as_older_minimind(tiny_model, tmp_path):
    model, _ = tiny_model
    sd = {k: v for k, v in model.state_dict().items() if "_norm" not in k or "layernorm" in k}
    torch.save(sd, tmp_path / "old.pth")
    with pytest.raises(UserError, match="older MiniMind architecture"):
        init_model(LMConfig(), str(tmp_path / "old.pth"))
