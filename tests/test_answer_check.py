"""--answer_check module:function: one judge of answers for eval_align.py, --eval_data and the
accuracy reward; the demo's reader ("The answer is X.") by default."""
import argparse
import json
import textwrap

import pytest

from dataset.answers import AnswerCheck, is_correct
from eval_align import main as eval_main, parse_args as eval_args
from tests.conftest import first_lines
from core.files import project_path
from core.errors import UserError
from training.evaluation import answer_sums, eval_arg_problems, pass_sums, rates
from rl.rewards import RewardFunctions, rewards_from_args

# A judge in another answer form: "#### 42" (GSM8K style), exact or within the line's own
# "tolerance" field; a response with no "####" scores 0, one off by at most 2*tolerance scores 0.5.
HASH_CHECK = textwrap.dedent('''
    def score(response, answer, tolerance=0, **fields):
        if "####" not in response:
            return False
        try:
            got = float(response.rsplit("####", 1)[1].split()[0])
        except (ValueError, IndexError):
            return 0.0
        gap = abs(got - float(answer))
        return 1.0 if gap <= tolerance else 0.5 if gap <= 2 * tolerance else 0.0

    def seen_fields(response, answer, **fields):
        return float(sorted(fields) == ["lang", "task"])

    def inverted(response, answer, **fields):
        from dataset.answers import is_correct
        return not is_correct(response, answer)

    def too_big(response, answer, **fields):
        return 2

    def words(response, answer, **fields):
        return "yes"
''')


@pytest.fixture
def judges(tmp_path, monkeypatch):
    (tmp_path / "hash_check.py").write_text(HASH_CHECK)
    monkeypatch.chdir(tmp_path)        # module:function is imported from the working directory
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_default_is_the_demo_reader():
    check = AnswerCheck()
    for text, answer in [("The answer is 7.", "7"), ("答案是 ８。", "8"), ("It is 7.", "7"), ("The answer is 6.", "7")]:
        assert check(text, {"prompt": [], "answer": answer, "task": "add"}) == float(is_correct(text, answer))


def test_a_custom_judge_gets_the_answer_and_the_other_fields(judges):
    check = AnswerCheck("hash_check:score")
    row = {"prompt": [{"role": "user", "content": "?"}], "answer": "42", "tolerance": 1}
    assert [check(t, row) for t in ["so #### 42", "#### 43", "#### 44", "#### 50", "42", "#### x"]] == \
        [1.0, 1.0, 0.5, 0.0, 0.0, 0.0]
    assert check("#### 43", {**row, "tolerance": 0}) == 0.0
    # the prompt and the answer are passed apart; every other column as a keyword
    assert AnswerCheck("hash_check:seen_fields")("x", {"prompt": [], "answer": "1", "task": "t", "lang": "en"}) == 1.0


@pytest.mark.parametrize("spec, words", [("hash_check:too_big", "returned 2"), ("hash_check:words", "returned 'yes'"),
                                         ("nowhere_module:f", "cannot import nowhere_module"),
                                         ("hash_check:missing", "has no function missing"),
                                         ("hash_check", "give module:function")])
def test_a_bad_judge_gets_one_line(judges, spec, words):
    with pytest.raises(UserError, match="--answer_check") as e:
        AnswerCheck(spec)("#### 1", {"prompt": [], "answer": "1"})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_answer_sums_add_partial_scores_and_pass_counts_only_full_ones(judges):
    check = AnswerCheck("hash_check:score")
    prompts = [{"prompt": [], "answer": "10", "tolerance": 1}, {"prompt": [], "answer": "20", "tolerance": 1}]
    sums = answer_sums(check.scores(["#### 10", "#### 22"], prompts), [3, 5])
    assert sums == {"correct": 1.5, "length": 8.0, "prompts": 2.0}
    # k = 2 samples per prompt: prompt 1 has a full score, prompt 2 only halves
    assert pass_sums(prompts, ["#### 0", "#### 10", "#### 22", "#### 18"], 2, check) == {"passed": 1.0}
    assert rates({**sums, "passed": 1.0}, k=2) == {"answer_acc": 0.75, "mean_len": 4.0, "pass@2": 0.5}
    # the default judge reads only "The answer is X."
    assert answer_sums(AnswerCheck().scores(["#### 10", "The answer is 20."], prompts), [1, 1])["correct"] == 1.0


def reward_args(**kw):
    base = dict(reward_funcs="accuracy", reward_weights=None, reward_clip=0.0, reward_model=None,
                reward_model_weight=1.0, answer_check=None)
    return argparse.Namespace(**{**base, **kw})


def test_the_accuracy_reward_uses_the_same_judge(judges):
    responses = ["#### 10", "#### 11", "The answer is 10."]
    fields = {"answer": ["10"] * 3, "tolerance": [0, 1, 0]}
    total, parts = rewards_from_args(reward_args(answer_check="hash_check:score"))([[]] * 3, responses, fields)
    assert total.tolist() == [1.0, 1.0, 0.0] and parts["accuracy"].tolist() == [1.0, 1.0, 0.0]
    total, _ = rewards_from_args(reward_args())([[]] * 3, responses, fields)   # the demo reader by default
    assert total.tolist() == [0.0, 0.0, 1.0]
    assert RewardFunctions(["accuracy"])([[]], ["The answer is 3."], {"answer": ["3"]})[0].tolist() == [1.0]


def test_a_bad_judge_stops_the_flag_checks(judges):
    import train_gpo
    with pytest.raises(UserError, match="--answer_check nowhere_module:f: cannot import"):    # before any model
        train_gpo.build(train_gpo.parse_args(["--answer_check", "nowhere_module:f", "--device", "cpu"]))
    problems = eval_arg_problems(argparse.Namespace(answer_check="nowhere_module:f", eval_data=None, save_best=1))
    assert len(problems) == 2 and problems[0].startswith("--answer_check nowhere_module:f: cannot import")


def test_training_scripts_take_the_flag():
    import train_gpo
    import train_ppo
    for script in (train_gpo, train_ppo):
        assert script.parse_args(["--answer_check", "m:f"]).answer_check == "m:f"


def test_eval_align_judges_with_it(judges):
    data = first_lines(project_path("dataset", "heldout_rl.jsonl"), 24, judges)
    pairs = first_lines(project_path("dataset", "heldout_dpo.jsonl"), 4, judges)
    # the shipped demo SFT, which answers some of these right and some wrong
    common = ["--json", "--device", "cpu", "--max_new_tokens", "40", "--data", data, "--pairs", pairs]
    plain = eval_main(eval_args(common))
    inverted = eval_main(eval_args(common + ["--answer_check", "hash_check:inverted"]))
    assert plain["n_prompts"] == inverted["n_prompts"] == 24 and 0 < plain["answer_acc"] < 1
    assert plain["answer_acc"] + inverted["answer_acc"] == pytest.approx(1.0)
    assert json.dumps(inverted)  # still one JSON line's worth
    with pytest.raises(UserError, match="--answer_check"):
        eval_main(eval_args(common + ["--answer_check", "nowhere_module:f"]))
