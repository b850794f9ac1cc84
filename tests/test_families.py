"""The family matrix: a tiny random model of each popular transformers class (tests/helpers/
families.py), saved as a Hugging Face folder with a tokenizer and chat template of its family's
shape, then: the ids every data path trains on equal the reference rendering; packed, cached
and chunked-head log-probs equal the plain forward; one step of every training script runs; a
rollout stops at the turn end; export and reload give the same logits. In-process throughout."""
import json
import os

import pytest
import torch

import train_dpo
import train_gpo
import train_grpo
import train_ppo
import train_reward
import train_sft
from conftest import first_lines
from dataset.encoding import encode_conversation, encode_exchange, encode_pair, render_prompt, stop_ids
from dataset.formats import load_pairs, load_sft
from helpers.families import BY_NAME, FAMILIES, make_family, make_minimind
from model import LMConfig, init_model
from model.export import main as export_main, parse_args as export_args
from model.loading import add_lora_weight, disable_dropout
from model.lora import apply_lora, default_targets
from model import logprobs
from model.logprobs import grouped_token_logprobs, model_token_logprobs, target_logprobs
from rl.rollout import HFRolloutEngine

NAMES = [f.name for f in FAMILIES] + ["minimind"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """{family: --from_weight path}, and small data files."""
    d = tmp_path_factory.mktemp("zoo")
    paths = {f.name: make_family(f, str(d / f.name)) for f in FAMILIES}
    paths["minimind"] = make_minimind(str(d / "minimind"))
    data = {name: first_lines(f"dataset/{name}.jsonl", n, d) for name, n in (("dpo", 8), ("rl", 4), ("sft", 8))}
    return paths, data


def load(zoo, name):
    return init_model(LMConfig(), zoo[0][name])


@pytest.mark.parametrize("name", NAMES)
def test_ids_are_the_reference_rendering_and_stop_at_the_turn_end(zoo, name):
    model, tok = load(zoo, name)
    fam = BY_NAME.get(name)
    turn_end = fam.turn_end if fam else "<|im_end|>"
    assert tok.convert_ids_to_tokens(tok.turn_end_id) == turn_end
    own = model.generation_config.eos_token_id
    assert stop_ids(tok)[0] == tok.turn_end_id and tok.eos_token_id in stop_ids(tok)
    if fam and fam.generation_eos:  # the model's own stop list is kept
        assert {tok.convert_tokens_to_ids(t) for t in fam.generation_eos} <= set(stop_ids(tok)) == set(own)
    pair = load_pairs(zoo[1]["dpo"])[0]
    prompt_text = render_prompt(tok, pair["prompt"])
    reference = lambda text: tok(prompt_text + text, add_special_tokens=False)["input_ids"] + [tok.turn_end_id]  # noqa: E731
    prompt, chosen, rejected = encode_pair(pair, tok, 1024)
    assert prompt + chosen == reference(pair["chosen"]) and prompt + rejected == reference(pair["rejected"])
    assert encode_exchange(tok, pair["prompt"], pair["chosen"]) == reference(pair["chosen"])      # the reward model's
    conversation = load_sft(zoo[1]["sft"])[0]
    ids, mask = encode_conversation(tok, conversation, 1024)                                     # SFT
    prompt_text = render_prompt(tok, conversation[:-1])
    assert ids == tok(prompt_text + conversation[-1]["content"], add_special_tokens=False)["input_ids"] + [tok.turn_end_id]
    assert mask[-1] == 1 and sum(mask) == len(encode_exchange(tok, conversation[:-1], conversation[-1]["content"])) - \
        len(tok(prompt_text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("name", NAMES)
def test_packed_cached_and_chunked_logprobs_equal_the_plain_forward(zoo, name, monkeypatch):
    model, tok = load(zoo, name)
    disable_dropout(model)          # as every run does (GPT-2's is 0.1)
    apply_lora(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.train()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]
    responses = [[20 + j + i for j in range(3 + 4 * i)] for i in range(4)]    # 2 per prompt, up to 15 tokens
    Tp = max(map(len, prompts))
    seqs = torch.zeros(4, Tp + max(map(len, responses)), dtype=torch.long)
    am = torch.zeros_like(seqs)
    for i, (p, r) in enumerate(zip([prompts[0]] * 2 + [prompts[1]] * 2, responses)):
        seqs[i, Tp - len(p):Tp + len(r)] = torch.tensor(p + r)
        am[i, Tp - len(p):Tp + len(r)] = 1
    resp = torch.zeros_like(am)
    resp[:, Tp:] = am[:, Tp:]
    # the plain forward, the model's own logits: the reference everything is held against
    out = model(input_ids=seqs, attention_mask=am, position_ids=logprobs.position_ids_from_mask(am)).logits
    plain = target_logprobs(out[:, :-1], seqs[:, 1:]) * resp[:, 1:]
    plain_grad = torch.autograd.grad(plain.sum(), [p for p in model.parameters() if p.requires_grad])
    chunked = model_token_logprobs(model, seqs, am, first_needed=Tp) * resp[:, 1:]
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_LOGITS", 7 * model.get_output_embeddings().weight.shape[0])
    for way in (None, False):                                                  # the default, and the cached path
        got, _ = grouped_token_logprobs(model, seqs, am, Tp, 2, packed=way)
        got = got * resp[:, 1:]
        assert torch.allclose(got, plain, atol=2e-6), (name, way, (got - plain).abs().max())
        grad = torch.autograd.grad(got.sum(), [p for p in model.parameters() if p.requires_grad])
        assert max((a - b).abs().max() for a, b in zip(grad, plain_grad)) < 1e-5
    assert torch.allclose(chunked, plain, atol=2e-6)
    if name == "mistral":  # the window (8) is shorter than these rows: forced packing would be wrong
        forced, _ = grouped_token_logprobs(model, seqs, am, Tp, 2, packed=True)
        assert (forced * resp[:, 1:] - plain).abs().max() > 1e-3


def test_default_lora_targets_find_every_projection(zoo):
    expected = {"llama": "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj",
                "qwen3_moe": "k_proj,o_proj,q_proj,v_proj",              # fused experts and the router left alone
                "phi3": "down_proj,gate_up_proj,o_proj,qkv_proj", "gpt2": "c_attn,c_fc,c_proj"}
    for name, targets in expected.items():
        model, _ = load(zoo, name)
        assert ",".join(default_targets(model)) == targets
        apply_lora(model)
        assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", NAMES)
def test_every_script_runs_a_step_and_export_reloads(zoo, name, tmp_path):
    paths, data = zoo
    common = ["--from_weight", paths[name], "--save_dir", str(tmp_path / "out"), "--checkpoint_dir",
              str(tmp_path / "ck"), "--max_steps", "1", "--batch_size", "2", "--device", "cpu", "--log_interval", "1"]
    rl = ["--data_path", data["rl"], "--num_generations", "2", "--max_gen_len", "6"]
    for script, extra in ((train_sft, ["--data_path", data["sft"]]),
                          (train_dpo, ["--data_path", data["dpo"], "--precompute_ref", "0"]),
                          (train_reward, ["--data_path", data["dpo"]]), (train_gpo, rl), (train_grpo, rl),
                          (train_ppo, rl)):
        script.main(script.parse_args(common + extra))
    stem = "dpo_32_moe" if name == "qwen3_moe" else "dpo_32"
    lines = [json.loads(x) for x in open(tmp_path / "out" / f"{stem}_metrics.jsonl")]
    assert lines and all(torch.isfinite(torch.tensor(v)) for k, v in lines[0].items() if isinstance(v, float))
    adapter = tmp_path / "out" / stem
    assert os.path.isfile(adapter / "adapter_model.safetensors")
    export_main(export_args(["--from_weight", paths[name], "--lora_weight", str(adapter), "--out", str(tmp_path / "m")]))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    merged, _ = init_model(LMConfig(), paths[name])
    add_lora_weight(merged, str(adapter), LMConfig())
    reloaded, _ = init_model(LMConfig(), str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, merged.eval()(ids).logits, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_rollout_stops_at_the_turn_end(zoo, name):
    model, tok = load(zoo, name)
    engine = HFRolloutEngine(model, tok, max_gen_len=8)
    calls = []

    def pick(logits):  # row 0 closes its turn at its 3rd token; the others run to the limit
        calls.append(len(calls))
        tokens = torch.full((logits.shape[0],), 40)
        if len(calls) == 3:
            tokens[0] = tok.turn_end_id
        return tokens
    engine.pick = pick
    rollout = engine.generate([[5, 6, 7]], 2)
    assert rollout.ended.tolist() == [True, False]
    assert rollout.response_lengths.tolist() == [3, 8]
    assert rollout.sequences[0, rollout.prompt_len + 2] == tok.turn_end_id


def test_dropout_is_off_so_policy_and_reference_agree_at_step_0(zoo, tmp_path):
    paths, data = zoo
    margins = {}
    for keep in ("1", "0"):
        out = tmp_path / keep
        train_dpo.main(train_dpo.parse_args(["--from_weight", paths["gpt2"], "--data_path", data["dpo"], "--save_dir",
                                             str(out), "--checkpoint_dir", str(out), "--max_steps", "1", "--batch_size",
                                             "4", "--precompute_ref", "0", "--device", "cpu", "--disable_dropout", keep]))
        margins[keep] = json.loads(open(out / "dpo_32_metrics.jsonl").readline())["rewards/margins"]
    assert margins["1"] == 0.0
    assert margins["0"] != 0.0   # the model's own dropout 0.1: policy and reference disagree


def test_the_default_learning_rate_is_the_demos_on_demo_weights_and_the_real_value_elsewhere(zoo, tiny_dir, capsys):
    from model.loading import SHIPPED_DIR, WeightSource, demo_weights, load_tokenizer
    from training.run import choose_learning_rate
    for script, demo, real in ((train_dpo, 3e-4, 1e-4), (train_gpo, 2e-3, 5e-5), (train_grpo, 1e-3, 5e-5),
                               (train_ppo, 3e-3, 5e-5), (train_reward, 1e-3, 1e-4)):
        def chosen(source, tokenizer, *extra):
            args = script.parse_args(list(extra))
            choose_learning_rate(args, demo_weights(source, tokenizer))
            return args.learning_rate, capsys.readouterr().out
        shipped_tok = load_tokenizer()
        lr, said = chosen(WeightSource("none"), shipped_tok)
        assert lr == demo and "--from_weight none" in said and "pass --learning_rate" in said
        lr, said = chosen(WeightSource("hf", os.path.join(SHIPPED_DIR, "full_sft_192")), shipped_tok)
        assert lr == demo and "shipped demo weights" in said
        lr, said = chosen(WeightSource("hf", os.path.join(tiny_dir, "full_sft_32")), shipped_tok)   # own demo runs
        assert lr == demo and "demo tokenizer" in said
        for name in ("llama", "gemma3", "phi3"):               # families with their own vocabulary
            _, tok = load(zoo, name)
            lr, said = chosen(WeightSource("hf", zoo[0][name]), tok)
            assert lr == real and "real-model value" in said, (script.__name__, name)
        lr, said = chosen(WeightSource("hf", zoo[0]["llama"]), tok, "--learning_rate", "7e-6")
        assert lr == 7e-6 and said == ""
    assert train_sft.parse_args([]).learning_rate == 2e-3     # SFT has one default


def test_rl_scripts_cut_a_real_models_step_into_small_forwards(zoo, tmp_path, capsys):
    """--accumulation_steps left out: 1 on the demo's weights; on others the fewest micro-batches
    of at most the script's cap (PPO 8, GPO and GRPO 64; the group scripts whole groups where
    possible), printed when it cuts; chosen by the run itself, before its first step."""
    from rl.start import choose_micro_batches

    def chosen(script, why, *extra, group=1):
        args = script.parse_args(list(extra))
        choose_micro_batches(args, why, group)
        return args.accumulation_steps, capsys.readouterr().out
    for script in (train_ppo, train_gpo, train_grpo):
        assert chosen(script, "the shipped demo weights") == (1, "")
        assert chosen(script, None, "--accumulation_steps", "2") == (2, "")
        assert chosen(script, "weights on the demo tokenizer", "--accumulation_steps", "4") == (4, "")
    steps, said = chosen(train_ppo, None)                       # 16 prompts x 4 samples
    assert steps == 8 and "forwards of 8 of the 64 samples" in said and "pass --accumulation_steps" in said
    assert "bnpo" not in said and "bnpo" in chosen(train_ppo, None, "--loss_type", "bnpo")[1]
    assert chosen(train_ppo, None, "--mini_batch_size", "16")[0] == 2
    assert chosen(train_ppo, None, "--batch_size", "3")[0] == 2            # 12 samples: 2 forwards of 6
    assert chosen(train_ppo, None, "--batch_size", "2") == (1, "")         # 8 samples fit in one: nothing said
    assert chosen(train_ppo, None, "--batch_size", "5", "--num_generations", "3")[0] == 3   # 15: 3 of 5
    for script in (train_gpo, train_grpo):                       # 16 prompts x 8 samples
        steps, said = chosen(script, None, group=8)
        assert steps == 2 and "forwards of 64 of the 128 samples" in said
        assert chosen(script, None, "--batch_size", "8", group=8)[0] == 1
        # 5 prompts x 16: the fewest is 2 forwards of 40, but only 5 forwards of 16 keep whole groups
        assert chosen(script, None, "--batch_size", "5", "--num_generations", "16", group=16)[0] == 5
        assert chosen(script, None, "--batch_size", "5", "--num_generations", "16", group=1)[0] == 2

    paths, data = zoo                                            # the run chooses it, on a family's own weights
    args = train_ppo.parse_args(["--from_weight", paths["llama"], "--data_path", data["rl"], "--save_dir",
                                 str(tmp_path / "out"), "--checkpoint_dir", str(tmp_path / "ck"), "--max_steps", "1",
                                 "--batch_size", "4", "--num_generations", "3", "--max_gen_len", "6", "--device",
                                 "cpu", "--log_interval", "1"])
    train_ppo.main(args)
    assert args.accumulation_steps == 2 and "forwards of 6 of the 12 samples" in capsys.readouterr().out
    line = json.loads(open(tmp_path / "out" / "ppo_actor_32_metrics.jsonl").readline())
    assert all(torch.isfinite(torch.tensor(v)) for v in line.values() if isinstance(v, float))
