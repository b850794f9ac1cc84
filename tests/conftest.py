import io
import os
import runpy
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # the scripts' default paths are relative to the project root

from helpers import forked  # noqa: E402
from model import LMConfig, init_model  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2)
# What a saved LoRA adapter folder holds: PEFT's two files, minialign.json, and the tokenizer it was trained with.
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "minialign.json",
                 "tokenizer.json", "tokenizer_config.json"]
# A and B of each of the 7 attention and MLP projections (q, k, v, o, gate, up, down) of each tiny layer
TINY_LORA_TENSORS = 2 * 7 * TINY["num_hidden_layers"]


def assert_trained_lora(tensors: dict) -> None:
    """A LoRA adapter saved by a tiny run: every LoRA tensor of the tiny model and nothing else,
    and B (zero until the adapter trains) moved."""
    assert len(tensors) == TINY_LORA_TENSORS and all("lora_" in k for k in tensors), sorted(tensors)[:4]
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_B" in k), "no lora_B moved"


def pytest_collection_modifyitems(config, items):
    """Tests marked real (a recipe's real model, minutes on CPU) run only when -m selects them."""
    if "real" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="a real-model recipe test: run it with -m real")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A save_dir holding a tiny random model as full_sft_32/ (HF folder with tokenizer)."""
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model, tok = init_model(LMConfig(**TINY), "none")
    model.save_pretrained(d / "full_sft_32")
    tok.save_pretrained(d / "full_sft_32")
    return str(d)


@pytest.fixture
def tiny_model(tiny_dir):
    model, tok = init_model(LMConfig(), "full_sft", save_dir=tiny_dir)
    return model, tok


def first_lines(src: str, n: int, dest_dir) -> str:
    """A copy of the first ``n`` lines of the project file ``src`` in ``dest_dir``; its path."""
    with open(src, encoding="utf-8") as f:
        lines = [next(f) for _ in range(n)]
    dest = os.path.join(str(dest_dir), os.path.basename(src))
    with open(dest, "w", encoding="utf-8") as f:
        f.writelines(lines)
    return dest


def run_args(parse_args, tmp, data, from_weight, *extra):
    """A script's args for a tiny CPU run writing under ``tmp`` (out/ and ck/)."""
    return parse_args(["--data_path", data, "--save_dir", str(tmp / "out"), "--checkpoint_dir", str(tmp / "ck"),
                       "--from_weight", from_weight, "--batch_size", "4", "--device", "cpu", "--log_interval", "1",
                       *extra])


@pytest.fixture
def cli(monkeypatch, capsys):
    """cli("train_dpo.py", *argv) -> (exit status, stdout, stderr): the script run as ``python
    train_dpo.py *argv`` runs it, ``__main__`` block and all, but in this process: no new
    interpreter and its imports (a subprocess is kept for signals, kill -9 and torchrun)."""
    def run(script, *argv, stdin=None):
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", [script, *argv])
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        said = capsys.readouterr()
        return code, said.out, said.err
    return run


def free_port() -> int:
    """A free TCP port on localhost, for a torchrun rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interrupt_after(script: str, argv: list[str], metrics_path, steps: int, sig):
    """Start the training script with ``argv`` in a process of its own (helpers/forked.py), send
    it ``sig`` once ``steps`` steps are in its metrics file, and return (returncode, stdout, stderr)."""
    proc = forked.Child(forked.script, (script, argv), os.path.join(os.path.dirname(metrics_path), "processes"))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (
            not os.path.exists(metrics_path) or len(open(metrics_path).read().splitlines()) < steps):
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    done = proc.wait(timeout=120)
    return done.returncode, done.stdout, done.stderr


def sample_ids(vocab=1000, shape=(2, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=g)
