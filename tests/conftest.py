import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # the scripts' default paths are relative to the project root

from model import LMConfig, init_model  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2)


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


def sample_ids(vocab=1000, shape=(2, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=g)
