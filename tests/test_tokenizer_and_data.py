"""The shipped tokenizer, its chat template, data checks and tokenization."""
import json

import pytest

from dataset.encoding import encode_conversation, encode_pairs, encode_prompt, encode_response, fit
from dataset.formats import load_pairs, load_prompts, load_sft
from model import load_tokenizer
from core.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_special_tokens_and_chatml_template(tok):
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 加 4 等于多少？"},
            {"role": "assistant", "content": "3 + 4 = 7，答案是 7。"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n3 加 4 等于多少？<|im_end|>\n"
                    "<|im_start|>assistant\n3 + 4 = 7，答案是 7。<|im_end|>\n")
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")


def test_round_trip_any_text(tok):
    for s in ["What is 17 + 25?", "把单词 \"moon\" 倒过来写。", "émoji 🙂 and tabs\t", "<|im_end|> inside"]:
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s


def test_prompt_plus_response_is_the_rendered_conversation(tok):
    msgs = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4. The answer is 4."}]
    ids = encode_prompt(tok, msgs[:1]) + encode_response(tok, msgs[1]["content"])
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids) + "\n" == full
    conv_ids, mask = encode_conversation(tok, msgs, 256)
    assert conv_ids == ids and sum(mask) == len(encode_response(tok, msgs[1]["content"]))
    assert mask[-1] == 1 and conv_ids[-1] == tok.eos_token_id


def test_fit_keeps_the_response_and_cuts_the_prompt_left():
    assert fit([1, 2, 3, 4], [7, 8], 4) == ([3, 4], [7, 8])
    assert fit([1, 2], [7, 8, 9, 10], 4) is None


def test_too_long_pairs_are_skipped_and_counted(tok):
    pairs = [{"prompt": [{"role": "user", "content": "hi " * 50}], "chosen": "ok", "rejected": "no"},
             {"prompt": [{"role": "user", "content": "hi"}], "chosen": "long " * 80, "rejected": "no"}]
    items, kept = encode_pairs(pairs, tok, 32)
    assert kept == pairs[:1] and len(items) == 1 and len(items[0][0]) + len(items[0][1]) <= 32
    with pytest.raises(UserError, match="no pair in d.jsonl fits --max_seq_len 2; raise it"):
        encode_pairs(pairs, tok, 2, "d.jsonl")


def write(tmp_path, lines, name="d.jsonl", raw=None):
    p = tmp_path / name
    if raw is not None:
        p.write_bytes(raw)
    else:
        p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l, ensure_ascii=False) for l in lines) + "\n",
                     encoding="utf-8")
    return str(p)


GOOD = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("lines,loader,message", [
    ([GOOD, "{not json"], load_sft, r"d.jsonl:2: invalid JSON"),
    ([GOOD, {"conv": []}], load_sft, r"d.jsonl:2: missing field \"conversations\""),
    ([{"conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}], load_sft,
     r"d.jsonl:1: .*wrong role order"),
    ([{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}], load_sft,
     r"d.jsonl:1: empty assistant response"),
    ([{"conversations": [{"role": "robot", "content": "q"}]}], load_sft, r"d.jsonl:1: .*role 'robot'"),
    ([{"chosen": GOOD["conversations"]}], load_pairs, r"d.jsonl:1: missing field \"rejected\""),
    ([{"prompt": "q", "chosen": "a", "rejected": ""}], load_pairs, r"d.jsonl:1: \"rejected\" has an empty response"),
    ([{"chosen": GOOD["conversations"], "rejected": [{"role": "user", "content": "other"},
                                                      {"role": "assistant", "content": "b"}]}],
     load_pairs, r"d.jsonl:1: .*same turns"),
    ([{"answer": "3"}], load_prompts, r"d.jsonl:1: missing field \"conversations\" or \"prompt\""),
    ([], load_sft, r"d.jsonl: the file is empty"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, loader, message):
    with pytest.raises(UserError, match=message) as e:
        loader(write(tmp_path, lines))
    assert "\n" not in str(e.value)


def test_non_utf8_and_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"bad.jsonl:1: not UTF-8"):
        load_sft(write(tmp_path, None, "bad.jsonl", raw=b'{"conversations": "\xff\xfe"}\n'))
    with pytest.raises(UserError, match="no such data file"):
        load_sft(str(tmp_path / "nope.jsonl"))


def test_formats_accepted(tmp_path):
    pairs = load_pairs(write(tmp_path, [
        {"chosen": GOOD["conversations"], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": {"role": "assistant", "content": "b"}},
    ]))
    assert all(p == {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"} for p in pairs)
    prompts = load_prompts(write(tmp_path, [dict(GOOD, answer="7"), {"prompt": "q", "answer": "8"}], "p.jsonl"))
    assert prompts[0] == {"prompt": [{"role": "user", "content": "q"}], "answer": "7"}  # trailing assistant dropped
    assert prompts[1]["answer"] == "8"


def test_tokenizer_script_reproduces_the_shipped_tokenizer(tmp_path):
    from model.train_tokenizer import main as train_tokenizer_main
    train_tokenizer_main(["--out", str(tmp_path)])
    shipped = json.load(open("model/tokenizer.json", encoding="utf-8"))
    rebuilt = json.load(open(tmp_path / "tokenizer.json", encoding="utf-8"))
    assert rebuilt["model"]["vocab"] == shipped["model"]["vocab"]
    assert rebuilt["model"]["merges"] == shipped["model"]["merges"]
    assert load_tokenizer(str(tmp_path)).chat_template == load_tokenizer().chat_template


def test_demo_world_cli_writes_the_files(tmp_path):
    from dataset import demo_world
    demo_world.main(["--out", str(tmp_path)])
    for name in ("sft.jsonl", "dpo.jsonl", "rl.jsonl", "identity.jsonl", "heldout_dpo.jsonl", "heldout_rl.jsonl"):
        assert (tmp_path / name).read_bytes() == open(f"dataset/{name}", "rb").read()
