"""train_dpo.py end to end: the seed's command line, exact resume, torchrun, references, bad input."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dataset.batches import collate_pairs
from dataset.encoding import encode_pairs
from dataset.formats import load_pairs
from model import LMConfig, apply_lora, init_model, save_lora
from model.logprobs import pair_logprobs
from train_dpo import main, parse_args, precompute_reference
from conftest import ADAPTER_FILES, assert_trained_lora, first_lines, free_port, interrupt_after, run_args
from core.errors import UserError
from training.run import Run

TINY = ["--hidden_size", "32", "--num_hidden_layers", "2"]


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory):
    return first_lines("dataset/dpo.jsonl", 48, tmp_path_factory.mktemp("dpodata"))


@pytest.fixture(scope="module")
def save_dir(tiny_dir, tmp_path_factory):
    """A --save_dir with the tiny full_sft_32 and a trained-looking lora_identity_32 adapter on it."""
    d = tmp_path_factory.mktemp("save")
    shutil.copytree(os.path.join(tiny_dir, "full_sft_32"), d / "full_sft_32")
    lm_config = LMConfig()
    model, _ = init_model(lm_config, "full_sft", save_dir=str(d))
    apply_lora(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_lora(model, str(d / "lora_identity_32"), base="full_sft", lm_config=lm_config)
    return str(d)


def args_for(tmp, data, save_dir, *extra):
    return run_args(parse_args, tmp, data, os.path.join(save_dir, "full_sft_32"), *extra)


def adapter(folder):
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_tiny_run_saves_lora_only_adapter_and_metrics(tmp_path, small_pairs, save_dir):
    out = main(args_for(tmp_path, small_pairs, save_dir, "--max_steps", "3", "--learning_rate", "1e-2"))
    assert out == str(tmp_path / "out" / "dpo_32")
    weights = adapter(out)
    assert_trained_lora(weights)
    assert all(k.startswith("base_model.model.") for k in weights)
    assert sorted(os.listdir(out)) == ADAPTER_FILES
    metrics = rows(tmp_path / "out" / "dpo_32_metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "rewards/chosen", "rewards/rejected",
                "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "nll_loss"):
        assert key in metrics[0], key
    # Step 1's loss is measured before any update: policy == reference, so the DPO part is log 2 (up to
    # rounding: the precomputed reference saw the pairs in other batches, with other prompt padding), plus
    # the default --rpo_alpha 1 times the chosen answers' NLL per token, which is -logps/chosen.
    assert metrics[0]["nll_loss"] == pytest.approx(-metrics[0]["logps/chosen"], abs=1e-5)
    assert metrics[0]["nll_loss"] > 0.1
    assert metrics[0]["loss"] == pytest.approx(math.log(2) + metrics[0]["nll_loss"], abs=1e-5)
    assert metrics[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    ckpt = torch.load(tmp_path / "ck" / "dpo_32_resume.pth", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["algorithm"] == "dpo" and set(ckpt["model"]) <= {
        k[len("base_model.model."):] .replace(".lora_A.weight", ".lora_A.default.weight")
        .replace(".lora_B.weight", ".lora_B.default.weight") for k in weights}
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())


@pytest.mark.parametrize("extra", [["--accumulation_steps", "2"], ["--precompute_ref", "1", "--epochs", "2"],
                                   ["--loss_type", "simpo", "--epochs", "2"]])
def test_resume_equals_uninterrupted(tmp_path, small_pairs, save_dir, extra):
    common = ["--learning_rate", "1e-2", *extra]
    straight = main(args_for(tmp_path / "a", small_pairs, save_dir, *common, "--max_steps", "5"))
    main(args_for(tmp_path / "b", small_pairs, save_dir, *common, "--max_steps", "5", "--stop_after_steps", "2"))
    resumed = main(args_for(tmp_path / "b", small_pairs, save_dir, *common, "--max_steps", "5", "--from_resume", "1"))
    assert max_diff(adapter(straight), adapter(resumed)) <= 1e-6
    early = main(args_for(tmp_path / "c", small_pairs, save_dir, *common, "--max_steps", "5", "--stop_after_steps", "2"))
    assert max_diff(adapter(straight), adapter(early)) > 1e-4  # the last three steps did move the weights
    assert [r["step"] for r in rows(resumed + "_metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_loss_variants_and_full_parameter_training_run(tmp_path, small_pairs, save_dir):
    for i, extra in enumerate([["--loss_type", "ipo"], ["--loss_type", "hinge", "--logp_reduce", "sum"],
                               ["--loss_type", "robust", "--label_smoothing", "0.1"],
                               ["--label_smoothing", "0.1", "--ref_model", "copy"]]):
        main(args_for(tmp_path / str(i), small_pairs, save_dir, "--max_steps", "1", *extra))
    out = main(args_for(tmp_path / "full", small_pairs, save_dir, "--max_steps", "2", "--use_lora", "0"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))  # a whole model, reference was a copy
    first = rows(out + "_metrics.jsonl")[0]
    assert first["loss"] - first["nll_loss"] == pytest.approx(math.log(2), abs=1e-5)


def make_run(tmp_path, small_pairs, save_dir, *extra):
    args = args_for(tmp_path, small_pairs, save_dir, *extra)
    return args, Run(args, "dpo", reference=args.ref_model)


def test_shared_and_copy_reference_give_the_same_logprobs(tmp_path, small_pairs, save_dir):
    _, shared = make_run(tmp_path / "s", small_pairs, save_dir, "--ref_model", "shared")
    _, copy = make_run(tmp_path / "c", small_pairs, save_dir, "--ref_model", "copy")
    items, _ = encode_pairs(load_pairs(small_pairs), shared.tokenizer, 256)
    batch = collate_pairs(items[:6], shared.tokenizer.pad_token_id)
    for run in (shared, copy):  # move the policies away from the start, as training does
        with torch.no_grad():
            for n, p in run.base_model.named_parameters():
                if "lora_B" in n:
                    p.add_(0.1)
    with shared.reference_model() as ref:
        a = torch.cat(pair_logprobs(ref, batch, "mean"))
    with copy.reference_model() as ref:
        b = torch.cat(pair_logprobs(ref, batch, "mean"))
    policy = torch.cat(pair_logprobs(shared.model, batch, "mean"))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert (a - policy).abs().max() > 1e-3  # the adapters were really off in the reference
    assert shared.base_model.training and any(p.requires_grad for p in shared.base_model.parameters())


def test_precomputed_reference_equals_live(tmp_path, small_pairs, save_dir):
    args, run = make_run(tmp_path, small_pairs, save_dir)
    items, _ = encode_pairs(load_pairs(small_pairs), run.tokenizer, 256)
    table = precompute_reference(run, items, 5, "mean")
    idx = [3, 17, 0, 41]
    with run.reference_model() as ref:
        live = pair_logprobs(ref, collate_pairs([items[i] for i in idx], run.tokenizer.pad_token_id), "mean")
    torch.testing.assert_close(table[idx], torch.stack(live, -1), atol=1e-5, rtol=0)


def test_precompute_of_the_used_pairs_only_gives_the_same_values(tmp_path, small_pairs, save_dir, monkeypatch):
    import train_dpo
    args, run = make_run(tmp_path, small_pairs, save_dir)
    items, _ = encode_pairs(load_pairs(small_pairs), run.tokenizer, 256)
    full = precompute_reference(run, items, 5, "mean")
    used = {3, 17, 41}
    part = precompute_reference(run, items, 5, "mean", used)
    assert torch.equal(part[sorted(used)], full[sorted(used)])          # the same batches, so bit for bit
    assert 3 <= int((part[:, 0] != 0).sum()) <= 15                       # at most 3 batches of 5 ran
    calls = []
    monkeypatch.setattr(train_dpo, "precompute_reference",
                        lambda *a: calls.append(a[-1]) or precompute_reference(*a))
    main(args_for(tmp_path / "smoke", small_pairs, save_dir, "--epochs", "20", "--max_steps", "2"))
    assert [len(u) for u in calls] == [8]                                # 2 steps x 4 pairs of 48


@pytest.mark.parametrize("bad", ["unreadable", "other_args", "other_schedule"])
def test_a_bad_resume_file_stops_a_20_epoch_run_before_the_precompute(tmp_path, small_pairs, save_dir, monkeypatch,
                                                                       bad):
    """The seed's --epochs 20 on the shipped 4000 pairs, with a resume file it cannot use:
    the run stops on it at once; the reference precompute (minutes there) never starts."""
    import time
    import train_dpo
    resume = tmp_path / "ck" / "dpo_32_resume.pth"
    if bad == "unreadable":
        resume.parent.mkdir()
        resume.write_bytes(b"not a resume file")
    else:   # a short run of other data (another --data_path), or of the same with another length
        data = small_pairs if bad == "other_args" else "dataset/dpo.jsonl"
        main(args_for(tmp_path, data, save_dir, "--max_steps", "1"))
    calls = []
    monkeypatch.setattr(train_dpo, "precompute_reference", lambda *a: calls.append(1))
    match = {"unreadable": "cannot read resume file", "other_args": r"other arguments \(--data_path",
             "other_schedule": "learning-rate schedule of 1 steps, these flags give 20000"}[bad]
    start = time.time()
    with pytest.raises(UserError, match=match):
        main(args_for(tmp_path, "dataset/dpo.jsonl", save_dir, "--epochs", "20", "--from_resume", "1"))
    assert calls == [] and time.time() - start < 30


def test_from_weight_adapter_is_merged_and_is_the_reference(tmp_path, small_pairs, save_dir):
    out = main(args_for(tmp_path, small_pairs, save_dir, "--from_weight", "lora_identity", "--save_dir", save_dir,
                        "--save_weight", "dpo_on_identity", "--max_steps", "1"))
    first = rows(out + "_metrics.jsonl")[0]
    assert first["loss"] - first["nll_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    meta = json.load(open(os.path.join(out, "minialign.json")))
    assert meta["base"] == "lora_identity"
    # --from_weight <this adapter> rebuilds full_sft + lora_identity + dpo.
    merged, _ = init_model(LMConfig(), out)
    base, _ = init_model(LMConfig(), "lora_identity", save_dir=save_dir)
    assert any((a - b).abs().max() > 0 for a, b in zip(merged.parameters(), base.parameters()))


def test_seed_command_line_runs_as_written(tmp_path, save_dir, cli, monkeypatch):
    """The chapter's command, with only the device, the sizes and an early stop added; its
    --data_path ../dataset/dpo.jsonl (MiniMind's trainer/ layout) finds the project's file."""
    d = tmp_path / "save"
    shutil.copytree(save_dir, d)
    argv = ["--epochs", "20", "--hidden_size", "32", "--device", "cpu",
            "--batch_size", "16", "--learning_rate", "1e-4", "--accumulation_steps", "8", "--log_interval", "10",
            "--save_interval", "100", "--data_path", "../dataset/dpo.jsonl", "--num_hidden_layers", "2",
            "--use_wandb", "--from_resume", "1", "--from_weight", "lora_identity",
            "--save_dir", str(d), "--checkpoint_dir", str(tmp_path / "ck"), "--stop_after_steps", "2"]
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    code, out, err = cli("train_dpo.py", *argv)
    assert code == 0, err[-3000:]
    assert "no resume file" in out and "using" in out and "dataset/dpo.jsonl" in out
    # 20 epochs: precomputed, for the 2 steps x 8 micro-batches x 16 pairs that run
    assert "reference log-probs computed once, for the 256 of 4000 pairs the run uses" in out
    assert os.path.isfile(d / "dpo_32" / "adapter_model.safetensors")
    assert [r["step"] for r in rows(d / "dpo_32_metrics.jsonl")] == [2]
    assert list((d / "wandb").glob("offline-run-*"))
    code, out, err = cli("train_dpo.py", *argv[:-1], "3")
    assert code == 0 and "resumed from" in out, err[-3000:]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(tmp_path, small_pairs, save_dir):
    common = ["train_dpo.py", "--data_path", small_pairs, "--from_weight", os.path.join(save_dir, "full_sft_32"),
              "--max_steps", "4", "--device", "cpu", "--learning_rate", "1e-2", "--log_interval", "1",
              "--accumulation_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), *common, "--batch_size", "2",
         "--save_dir", str(tmp_path / "two"), "--checkpoint_dir", str(tmp_path / "ck2")],
        capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout and "weights identical on all 2 processes" in two.stdout
    main(parse_args([*common[1:], "--batch_size", "4", "--save_dir", str(tmp_path / "one"),   # one process: this one
                     "--checkpoint_dir", str(tmp_path / "ck1")]))
    # Adam divides each step by the gradient's running magnitude, so rounding differences in
    # near-zero gradients (two half batches vs one batch) show up around 1e-4 here; gradients
    # that were not synchronised would differ by the order of the learning rate (1e-2).
    assert max_diff(adapter(tmp_path / "two" / "dpo_32"), adapter(tmp_path / "one" / "dpo_32")) < 1e-3
    r2, r1 = rows(tmp_path / "two" / "dpo_32_metrics.jsonl"), rows(tmp_path / "one" / "dpo_32_metrics.jsonl")
    assert [r["loss"] for r in r2] == pytest.approx([r["loss"] for r in r1], abs=1e-5)  # averaged over ranks


@pytest.mark.slow
def test_sigint_saves_then_exits(tmp_path, small_pairs, save_dir):
    argv = ["--data_path", small_pairs, "--from_weight", os.path.join(save_dir, "full_sft_32"), "--batch_size", "4",
            "--epochs", "1000", "--device", "cpu", "--log_interval", "1", "--save_dir", str(tmp_path / "out"),
            "--checkpoint_dir", str(tmp_path / "ck")]
    code, out, err = interrupt_after("train_dpo.py", argv, tmp_path / "out" / "dpo_32_metrics.jsonl", 2, signal.SIGINT)
    assert code == 0 and "stopped by a signal" in out, err[-2000:]
    ckpt = torch.load(tmp_path / "ck" / "dpo_32_resume.pth", weights_only=True)
    assert ckpt["step"] >= 2 and os.path.isfile(tmp_path / "out" / "dpo_32" / "adapter_model.safetensors")


GOOD = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}


@pytest.mark.parametrize("line, reason", [
    ("{oops", "invalid JSON"),
    (json.dumps({"chosen": GOOD["chosen"]}), 'missing field "rejected"'),
    (json.dumps({"chosen": [GOOD["chosen"][1], GOOD["chosen"][0]], "rejected": GOOD["rejected"]}), "wrong role order"),
    (json.dumps({**GOOD, "rejected": [GOOD["rejected"][0], {"role": "assistant", "content": " "}]}), "empty response"),
])
def test_bad_data_names_file_and_line_before_training(tmp_path, save_dir, line, reason):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"^{bad}:2: .*{reason}"):
        main(args_for(tmp_path, str(bad), save_dir))
    assert not (tmp_path / "out").exists() and not (tmp_path / "ck").exists()


def test_bad_flags_and_missing_file(tmp_path, small_pairs, save_dir):
    with pytest.raises(UserError, match="no such data file"):
        main(args_for(tmp_path, str(tmp_path / "nope.jsonl"), save_dir))
    with pytest.raises(UserError, match="--beta must be positive.*--label_smoothing applies"):
        main(args_for(tmp_path, small_pairs, save_dir, "--beta", "0", "--loss_type", "ipo", "--label_smoothing", "0.1"))
    with pytest.raises(UserError, match="--ref_model shared needs LoRA"):
        main(args_for(tmp_path, small_pairs, save_dir, "--use_lora", "0", "--ref_model", "shared"))


def test_overlong_pairs_are_cut_from_the_left_or_skipped(tmp_path, save_dir, capsys):
    long_prompt = {"role": "user", "content": "word " * 300}
    rows_ = [GOOD] * 8 + [{"chosen": [long_prompt, GOOD["chosen"][1]], "rejected": [long_prompt, GOOD["rejected"][1]]}] \
        + [{**GOOD, "chosen": [GOOD["chosen"][0], {"role": "assistant", "content": "x " * 400}]}]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_), encoding="utf-8")
    main(args_for(tmp_path, str(data), save_dir, "--max_seq_len", "64", "--max_steps", "1"))
    assert "skipped 1 of 10 pair(s)" in capsys.readouterr().out


def test_cli_no_flags_help_and_bad_input_exit_2(tmp_path, cli):
    code, _, err = cli("train_dpo.py", "--data_path", str(tmp_path / "missing.jsonl"), "--save_dir", str(tmp_path / "o"),
                       "--device", "cpu")
    assert code == 2
    assert err.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.jsonl'}: no such data file; check --data_path"
