import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # the scripts' default paths are relative to the project root

from model import LMConfig, init_model  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2)
# What a saved LoRA adapter folder holds: PEFT's two files, minialign.json, and the tokenizer it was trained with.
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "minialign.json",
                 "tokenizer.json", "tokenizer_config.json"]


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


def free_port() -> int:
    """A free TCP port on localhost, for a torchrun rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interrupt_after(cmd: list[str], metrics_path, steps: int, sig):
    """Start the training command ``cmd``, send it ``sig`` once ``steps`` steps are in its
    metrics file, and return (returncode, stdout, stderr)."""
    import subprocess
    import time
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not os.path.exists(metrics_path)
                                      or len(open(metrics_path).read().splitlines()) < steps):
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def sample_ids(vocab=1000, shape=(2, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=g)
