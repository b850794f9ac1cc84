"""bench/gpu_check.py --device cpu --tiny: the device check's own code paths, in seconds on CPU.

One run (in this process) serves every test here; what they check is that each section
produced its figures, that they are sane (finite, positive times), and that the correctness
section's comparisons hold: fp32 first-step loss against CPU within 1e-4, the resume at the
saved step. Nothing is timed against a threshold.
"""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

from conftest import ROOT

SPEC = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "bench", "gpu_check.py"))
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(SPEC)   # dataclasses look it up
SPEC.loader.exec_module(gpu_check)


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "figures.json"
    gpu_check.main(gpu_check.parse_args(["--device", "cpu", "--tiny", "--out", str(out)]))
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def numbers(tree):
    """Every int or float in a JSON tree."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_every_section_is_there_without_errors(figures):
    assert list(figures["sections"]) == list(gpu_check.SECTIONS)
    text = json.dumps(figures["sections"])
    assert '"error"' not in text, text[:3000]
    assert all(math.isfinite(x) for x in numbers(figures))
    assert figures["environment"]["tiny"] is True and figures["environment"]["device"] == "cpu"


def test_correctness_compares_every_script_with_cpu_and_resumes_at_the_saved_step(figures):
    c = figures["sections"]["correctness"]
    for name in gpu_check.SCRIPTS:
        r = c[name]
        assert r["ok"] and r["all_finite"], (name, r)
        assert r["fp32_vs_cpu_first_loss"] <= 1e-4
        assert len(r["bf16_losses"]) == len(r["fp32_losses"]) == gpu_check.TINY.check_steps
    resume = c["resume"]
    assert resume["killed_exit_code"] != 0                     # killed, not finished
    assert resume["saved_step"] >= 1
    assert resume["resumed_at"] == resume["saved_step"]
    assert resume["next_logged_step"] == resume["saved_step"] + 1
    assert c["ok"]


def test_packed_forward_matches_plain_and_reports_its_kernels(figures):
    p = figures["sections"]["packed"]
    assert p["float32_ok"] and p["float32_packed_vs_plain"] <= 1e-4
    assert p["float32_cached_vs_plain"] <= 1e-4
    assert p["sdpa_backends"]["math"] == "ok"
    assert any("scaled_dot_product" in name for name in p["default_attention_ops"])
    assert all(v > 0 for k, v in p["timings"].items())
    flex = p["flex_attention"]
    assert flex["relative_error"] <= 1e-5 and "timing_skipped" in flex      # CPU: outputs compared, not timed


def test_throughput_reports_times_tokens_and_mfu(figures):
    t = figures["sections"]["throughput"]
    dpo, gpo, decoding = t["dpo"], t["gpo"], t["decoding"]
    assert dpo["s_per_step"] > 0 and dpo["tokens_per_sec"] > 0 and dpo["flops_per_step"] > 0
    assert 0 < dpo["mfu_measured_matmul"] < 1
    assert "mfu_datasheet" not in dpo                  # no datasheet peak for a CPU
    assert gpo["sampling_s"] > 0 and gpo["training_s"] > 0 and 0 < gpo["sampling_share"] < 1
    assert gpo["sampled_tokens"] == gpu_check.TINY.gpo_prompts * gpu_check.TINY.num_generations * \
        gpu_check.TINY.max_gen_len                     # random weights never end an answer
    for name in ("ours_decode", "generate_static"):
        assert decoding[name]["tokens_per_sec"] > 0
    assert decoding["ours_over_generate_static"] > 0


def test_trl_is_measured_or_skipped_with_a_reason(figures):
    trl = figures["sections"]["trl"]
    if importlib.util.find_spec("trl") is None:
        assert "not installed" in trl["skipped"]
    else:
        assert trl["dpo"]["speedup"] > 0 and trl["gpo"]["speedup"] > 0


def test_dpo_flops_formula_by_hand():
    """One pair, prompt 2, chosen 1, rejected 1 tokens: T = 4, K = 2, A = 3 + 1 + 1 + 2*2 = 9.
    With N_body 10, N_head 5, N_lora 1, one layer of one head of dimension 2:
    6*10*4 + 6*5*2 + 16*1*1*2*9 + 6*1*4 = 240 + 60 + 288 + 24 = 612."""
    counts = {"body": 10, "head": 5, "lora": 1, "layers": 1, "heads": 1, "head_dim": 2}
    assert gpu_check.dpo_step_flops(counts, [(2, 1, 1)]) == 612


@pytest.mark.parametrize("argv, message", [
    (["--only", "bogus"], "unknown section"),
    (["--only", "packed,nope"], "--only nope"),
    (["--device", "cuda:0"], "use --device cpu"),
])
def test_bad_input_is_one_error_line_and_exit_2(argv, message, capsys, tmp_path):
    from core.errors import run_cli
    if argv[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit) as e:
        run_cli(gpu_check.main, gpu_check.parse_args, [*argv, "--tiny", "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "x.json").exists()            # no work was done
