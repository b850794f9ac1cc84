"""The tokenizer that goes with the weights: a MiniMind checkout's own (6,400 tokens) for its
``out/*.pth``, the adapter's copy for an adapter, never the shipped demo one by default."""
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.minimind_checkout import MM_VOCAB, minimind_lora_pth, random_minimind_model, save_minimind_pth, \
    tokenizer_of_size
from conftest import ADAPTER_FILES, TINY, first_lines
from model import LMConfig, build_model, init_model, load_tokenizer
from model.loading import shipped_rows
from core.errors import UserError


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A MiniMind checkout: <repo>/model/ holds its 6,400-token tokenizer, <repo>/out/ its weights."""
    repo = tmp_path_factory.mktemp("minimind")
    tokenizer_of_size(MM_VOCAB, repo / "model")
    save_minimind_pth(random_minimind_model(**TINY), repo / "out" / "full_sft_32.pth")
    return repo


def rows(model):
    return model.get_input_embeddings().weight.shape[0]


def test_the_checkouts_tokenizer_goes_with_its_weights(checkout):
    for spec, save_dir in [(str(checkout / "out" / "full_sft_32.pth"), "out"), ("full_sft", str(checkout / "out"))]:
        model, tok = init_model(LMConfig(), spec, save_dir=save_dir)
        assert rows(model) == len(tok) == MM_VOCAB, spec


def test_weights_outside_a_checkout_stop_with_one_line(checkout, tmp_path):
    moved = tmp_path / "elsewhere" / "full_sft_32.pth"
    os.makedirs(moved.parent)
    shutil.copy(checkout / "out" / "full_sft_32.pth", moved)
    with pytest.raises(UserError) as e:
        init_model(LMConfig(), str(moved))
    msg = str(e.value)
    assert str(moved) in msg and "6400-token vocabulary" in msg and "--tokenizer_path" in msg and "\n" not in msg
    # the same through a training script: it stops before any step is taken
    from train_sft import main, parse_args
    data = first_lines("dataset/sft.jsonl", 8, tmp_path)
    with pytest.raises(UserError, match="no tokenizer goes with these weights"):
        main(parse_args(["--data_path", data, "--from_weight", str(moved), "--save_dir", str(tmp_path / "out"),
                         "--checkpoint_dir", str(tmp_path / "ck"), "--device", "cpu", "--max_steps", "1"]))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "ck")


def test_shipped_tokenizer_with_a_6400_row_model_is_refused(checkout):
    with pytest.raises(UserError, match=r"6400-token vocabulary but the tokenizer in model is the shipped "
                                        r"1116-token demo one; pass --tokenizer_path"):
        init_model(LMConfig(), str(checkout / "out" / "full_sft_32.pth"), tokenizer_path="model")


def test_a_tokenizer_whose_ids_do_not_fit_is_refused(checkout, tiny_dir):
    with pytest.raises(UserError, match=r"has 6400 tokens but --from_weight full_sft \(.*full_sft_32\) has an embedding of 1116 rows"):
        init_model(LMConfig(), "full_sft", save_dir=tiny_dir, tokenizer_path=str(checkout / "model"))


def test_tokenizer_path_wins(checkout, tmp_path):
    other = tokenizer_of_size(3000, tmp_path / "other")
    _, tok = init_model(LMConfig(), str(checkout / "out" / "full_sft_32.pth"), tokenizer_path=other)
    assert len(tok) == 3000


def test_shipped_rule_boundary():
    # ceil(1116 / 128) * 128 = 9 * 128 = 1152: the shipped tokenizer goes with up to 1152 rows
    assert len(load_tokenizer()) == 1116 and shipped_rows() == 1152


@pytest.mark.parametrize("padded", [1152, 1280])
def test_a_models_own_tokenizer_with_a_padded_embedding_is_accepted(tmp_path, padded):
    """A published model pads its embedding past its tokenizer (to a multiple of 64 or 128, by up
    to hundreds of rows): its own tokenizer, even one equal to the shipped one, is never refused."""
    folder = str(tmp_path / "hf")
    build_model(LMConfig(**TINY, vocab_size=padded)).save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    model, tok = init_model(LMConfig(), folder)
    assert (rows(model), len(tok)) == (padded, 1116)
    given = lambda: init_model(LMConfig(), folder, tokenizer_path="model")   # the shipped one, not its own
    if padded <= shipped_rows():
        given()
    else:
        with pytest.raises(UserError, match="shipped 1116-token demo one"):
            given()


@pytest.fixture(scope="module")
def trained_adapter(checkout, tmp_path_factory):
    """A LoRA adapter trained (one DPO step) from the checkout's full_sft_32.pth; then the checkout
    loses its tokenizer, so only the adapter's copy is left."""
    from train_dpo import main, parse_args
    tmp = tmp_path_factory.mktemp("adapter")
    checkout_copy = tmp / "minimind"
    shutil.copytree(checkout, checkout_copy)
    data = first_lines("dataset/dpo.jsonl", 4, tmp)
    main(parse_args(["--data_path", data, "--from_weight", str(checkout_copy / "out" / "full_sft_32.pth"),
                     "--save_dir", str(tmp / "out"), "--checkpoint_dir", str(tmp / "ck"), "--batch_size", "2",
                     "--device", "cpu", "--max_steps", "1", "--lora_rank", "4"]))
    shutil.rmtree(checkout_copy / "model")
    return tmp / "out" / "dpo_32"


def test_an_adapter_carries_its_tokenizer(trained_adapter):
    assert sorted(os.listdir(trained_adapter)) == ADAPTER_FILES
    assert len(AutoTokenizer.from_pretrained(str(trained_adapter))) == MM_VOCAB
    model, tok = init_model(LMConfig(), str(trained_adapter))      # merged into its base, with its own tokenizer
    assert rows(model) == len(tok) == MM_VOCAB


def test_export_and_eval_without_from_weight_use_the_adapters_base_and_tokenizer(trained_adapter, tmp_path):
    from eval_align import main as eval_main, parse_args as eval_args
    from model.export import main as export_main, parse_args as export_args
    dest = str(tmp_path / "merged")
    export_main(export_args(["--lora_weight", str(trained_adapter), "--out", dest]))
    assert len(AutoTokenizer.from_pretrained(dest)) == MM_VOCAB          # never the demo one beside 6,400 rows
    assert AutoModelForCausalLM.from_pretrained(dest).get_input_embeddings().weight.shape[0] == MM_VOCAB
    data = first_lines("dataset/heldout_rl.jsonl", 2, tmp_path)
    pairs = first_lines("dataset/heldout_dpo.jsonl", 2, tmp_path)
    result = eval_main(eval_args(["--lora_weight", str(trained_adapter), "--data", data, "--pairs", pairs,
                                  "--max_new_tokens", "2", "--device", "cpu", "--json"]))
    assert result["n_pairs"] == 2 and result["model"] == f"{trained_adapter} (on the base it records)"
    # an adapter on an explicit base: its own tokenizer still goes first
    from model.loading import load_for_inference
    base = os.path.join(os.path.dirname(os.path.dirname(trained_adapter)), "minimind", "out", "full_sft_32.pth")
    _, tok, _ = load_for_inference(export_args(["--from_weight", base, "--lora_weight", str(trained_adapter),
                                                "--out", "unused"]))
    assert len(tok) == MM_VOCAB


def test_minimind_lora_file_alone_merges_onto_the_base_beside_it(checkout, tmp_path):
    import chat
    name = "model.layers.0.self_attn.q_proj"
    base, _ = init_model(LMConfig(), str(checkout / "out" / "full_sft_32.pth"))
    lora = checkout / "out" / "lora_identity_32.pth"
    A, B = minimind_lora_pth(base, lora, names=[name], std=0.1)[name]
    try:
        answers = chat.main(chat.parse_args(["--lora_weight", str(lora), "--save_dir", str(tmp_path),
                                             "--device", "cpu", "--max_new_tokens", "2", "--prompt", "hi"]))
        assert len(answers) == 1
        from model.loading import load_for_inference
        model, tok, _ = load_for_inference(chat.parse_args(["--lora_weight", str(lora), "--save_dir", str(tmp_path)]))
        delta = model.get_submodule(name).weight - base.get_submodule(name).weight
        assert len(tok) == MM_VOCAB and (delta - B @ A).abs().max() < 1e-6
    finally:
        os.remove(lora)
