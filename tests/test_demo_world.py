"""The shipped demo world: deterministic, held-out files disjoint from training files, answers checkable."""
import json
import os

from dataset import demo_world
from dataset.answers import extract_answer, is_correct

DATA = "dataset"
TRAIN_FILES = ["sft.jsonl", "identity.jsonl", "dpo.jsonl", "rl.jsonl"]
HELDOUT_FILES = ["heldout_dpo.jsonl", "heldout_rl.jsonl"]


def read(name):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [json.loads(l) for l in f]


def user_questions(rows):
    out = set()
    for r in rows:
        for key in ("conversations", "chosen", "rejected"):
            out.update(m["content"] for m in r.get(key, []) if m["role"] == "user")
    return out


def test_generator_is_deterministic_and_matches_the_shipped_files():
    a, b = demo_world.generate(), demo_world.generate()
    assert a == b
    for name, rows in a.items():
        assert read(name) == rows, f"dataset/{name} differs from the generator; run python -m dataset.demo_world"
    assert demo_world.generate(seed=7) != a


def test_heldout_shares_no_question_and_no_instance_with_training():
    train_q = set().union(*(user_questions(read(f)) for f in TRAIN_FILES))
    held_q = set().union(*(user_questions(read(f)) for f in HELDOUT_FILES))
    assert held_q and not (train_q & held_q)
    train, heldout = demo_world.split_instances()   # (task instance, language) items
    assert not set(train) & set(heldout)
    assert {key[0] for key, _ in heldout} == {key[0] for key, _ in train}  # every family is evaluated


def test_answers_are_checkable():
    for r in read("heldout_rl.jsonl") + read("rl.jsonl")[:200]:
        assert r["answer"] and r["conversations"][-1]["role"] == "user"
    for r in read("dpo.jsonl")[:300]:
        q = r["chosen"][0]["content"]
        chosen = r["chosen"][-1]["content"]
        rejected = r["rejected"][-1]["content"]
        assert extract_answer(chosen) is not None and chosen != rejected, q
    assert is_correct("Sure! 3 + 4 = 7. The answer is 7.", "7")
    assert is_correct("好的！3 + 4 = 7，答案是 7。", 7)
    assert not is_correct("3 + 4 = 8. The answer is 8.", "7")
    assert not is_correct("Figure it out yourself.", "7")
    assert extract_answer('"cat" backwards is "tac". The answer is tac.') == "tac"


def test_rejected_is_wrong_and_chosen_right():
    by_q = {}
    for r in read("rl.jsonl"):
        by_q[r["conversations"][0]["content"]] = r["answer"]
    checked = 0
    for r in read("dpo.jsonl"):
        q = r["chosen"][0]["content"]
        if q in by_q:
            assert is_correct(r["chosen"][-1]["content"], by_q[q])
            assert not is_correct(r["rejected"][-1]["content"], by_q[q])
            checked += 1
    assert checked > 100


def test_sft_is_noisy_on_purpose():
    rows = read("sft.jsonl")
    mistakes = 0
    for r in rows:
        q, a = r["conversations"][0]["content"], r["conversations"][1]["content"]
        if q.startswith("What is ") and " plus " in q:
            x, y = q[len("What is "):-1].split(" plus ")
            mistakes += not is_correct(a, int(x) + int(y))
    assert mistakes > 0
