"""The user's toolkit: training curves to a PNG, and a chat that streams a model's answers."""
import json
import os

import pytest
import torch

import chat
import plot_curves
from dataset.encoding import encode_prompt
from model.lora import apply_lora, save_lora
from core.errors import UserError


def write_metrics(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def dpo_rows(n=12, scale=1.0):
    return [{"step": s, "loss": 0.69 - 0.03 * s * scale, "rewards/margins": 0.1 * s, "lr": 1e-3 * (1 - s / n),
             "grad_norm": 1.0} for s in range(1, n + 1)]


def test_curves_of_several_runs_to_a_png(tmp_path):
    (tmp_path / "a").mkdir()
    a = write_metrics(tmp_path / "a" / "dpo_192_metrics.jsonl", dpo_rows())
    rl = [{"step": s, "loss": 0.01, "reward": 0.4 + 0.01 * s, "kl": 0.001 * s, "completions/mean_length": 14.0,
           "lr": 2e-3} for s in range(10, 130, 10)]
    b = write_metrics(tmp_path / "gpo_192_metrics.jsonl", rl)
    out = plot_curves.main(plot_curves.parse_args([a, b, "--out", str(tmp_path / "c.png")]))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 10_000
    drawn = plot_curves.plot([a, b], str(tmp_path / "d.png"))
    assert drawn == ["loss", "rewards/margins", "reward", "kl", "completions/mean_length", "lr"]
    default = plot_curves.main(plot_curves.parse_args([b]))            # next to the file by default
    assert default == str(tmp_path / "gpo_192_curves.png") and os.path.isfile(default)


def test_curves_reject_bad_input(tmp_path, cli):
    good = write_metrics(tmp_path / "x_metrics.jsonl", dpo_rows())
    with pytest.raises(UserError, match="no such metrics file"):
        plot_curves.main(plot_curves.parse_args([str(tmp_path / "none.jsonl")]))
    with pytest.raises(UserError, match="none of value_loss is in the metrics; these are: grad_norm,loss"):
        plot_curves.main(plot_curves.parse_args([good, "--metrics", "value_loss"]))
    bad = tmp_path / "bad_metrics.jsonl"
    bad.write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(UserError, match="bad_metrics.jsonl:2: not a JSON line"):
        plot_curves.main(plot_curves.parse_args([str(bad)]))
    cut = tmp_path / "cut_metrics.jsonl"                             # a run killed mid-write: the last line is cut
    cut.write_text('{"step": 1, "loss": 1}\n{"step": 2, "lo')
    assert plot_curves.read_metrics(str(cut)) == [{"step": 1, "loss": 1}]
    code, _, err = cli("plot_curves.py", good, "--out", str(tmp_path / "x.jpg"))
    assert code == 2 and err.strip().splitlines()[-1] == f"error: --out {tmp_path / 'x.jpg'}: give a .png file name"


def test_chat_streams_the_answers_of_base_plus_adapter(tmp_path, tiny_dir, tiny_model, capsys):
    model, tok = tiny_model
    apply_lora(model, rank=4)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    save_lora(model, str(tmp_path / "adapter"), base=os.path.join(tiny_dir, "full_sft_32"))
    args = chat.parse_args(["--from_weight", os.path.join(tiny_dir, "full_sft_32"), "--lora_weight",
                            str(tmp_path / "adapter"), "--device", "cpu", "--max_new_tokens", "8",
                            "--prompt", "hello", "--prompt", "and again"])
    answers = chat.main(args)
    printed = capsys.readouterr().out
    assert len(answers) == 2 and "> hello" in printed and "> and again" in printed
    for answer in answers:
        assert answer.strip() and answer.strip() in printed           # what was streamed is what was answered
    # greedy = the adapted model's own argmax continuation of the chat-rendered prompt
    model.eval()
    ids = torch.tensor([encode_prompt(tok, [{"role": "user", "content": "hello"}])])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert answers[0] == tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_chat_keeps_the_conversation_and_resets(tiny_dir, cli):
    args = chat.parse_args(["--from_weight", os.path.join(tiny_dir, "full_sft_32"), "--device", "cpu",
                            "--max_new_tokens", "4"])
    from model.loading import load_for_inference
    model, tok, _ = load_for_inference(args)
    c = chat.Chat(model, tok, args, out=open(os.devnull, "w"))
    first = c.reply("one")
    c.reply("two")
    assert [m["role"] for m in c.messages] == ["user", "assistant", "user", "assistant"]
    assert c.messages[1]["content"] == first
    c.reset()
    assert c.reply("one") == first and len(c.messages) == 2
    code, out, _ = cli("chat.py", "--from_weight", os.path.join(tiny_dir, "full_sft_32"), "--device", "cpu",
                       "--max_new_tokens", "3", stdin="hi\n/reset\n/exit\n")
    assert code == 0 and "(conversation cleared)" in out
    code, _, err = cli("chat.py", "--lora_weight", "no_such_adapter", "--prompt", "x")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --lora_weight no_such_adapter not found")
