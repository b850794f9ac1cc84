"""model.from_gguf on a tiny llama GGUF the test writes itself with the gguf package."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from model.from_gguf import main, parse_args  # noqa: E402
from core.errors import UserError  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _permute(w, n_head):
    """llama.cpp's q/k row order (transformers undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path):
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    tokens = SPECIALS + sorted(bytes_to_unicode().values()) + ["he", "ll"]
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    sd = LlamaForCausalLM(cfg).state_dict()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny"); w.add_context_length(64); w.add_embedding_length(32); w.add_feed_forward_length(64)
    w.add_block_count(2); w.add_head_count(4); w.add_head_count_kv(2); w.add_rope_dimension_count(8)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps); w.add_rope_freq_base(10000.0); w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2"); w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(["h e", "l l"]); w.add_bos_token_id(1); w.add_eos_token_id(2); w.add_chat_template(CHATML)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for key, t in sd.items():
        if key == "lm_head.weight":
            continue
        a = t.numpy().astype(np.float32)
        if ".q_proj." in key:
            a = _permute(a, 4)
        elif ".k_proj." in key:
            a = _permute(a, 2)
        base, suffix = key.rsplit(".", 1)
        w.add_tensor(names.get_name(base) + "." + suffix, a)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


def test_written_folder_matches_the_gguf(tmp_path, capsys):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    out = tmp_path / "hf"
    main(parse_args([str(path), "--out", str(out)]))
    said = capsys.readouterr().out
    assert "architecture llama" in said and "vocabulary 261" in said
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    folder = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == CHATML and tok.eos_token == "<|im_end|>"
    ids = tok("hello world<|im_end|>", return_tensors="pt")["input_ids"]
    assert ids[0, -1].item() == 2
    with torch.no_grad():
        torch.testing.assert_close(folder(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(UserError, match="not a GGUF file"):
        main(parse_args([str(bad), "--out", str(tmp_path / "o")]))
    other = tmp_path / "o.gguf"
    w = gguf.GGUFWriter(str(other), "nosucharch")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(UserError, match="cannot be read by transformers"):
        main(parse_args([str(other), "--out", str(tmp_path / "o")]))


def test_folder_is_a_from_weight(tmp_path):
    from model.config import LMConfig
    from model.loading import init_model
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    main(parse_args([str(path), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"]))
    model, tok = init_model(LMConfig(), str(tmp_path / "hf"))
    assert model.config.model_type == "llama" and tok.eos_token == "<|im_end|>"
