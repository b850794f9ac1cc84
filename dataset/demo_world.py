"""The shipped demo: a deterministic, bilingual (English / Chinese) toy world with checkable answers.

    python -m dataset.demo_world            # rewrites the files below in dataset/
    python -m dataset.demo_world --out DIR  # elsewhere

Six task families (addition and subtraction of digits, the larger and the smaller of two
numbers, counting the letters of a word, its first letter), each asked in English or Chinese.
Every task instance has one exact answer, stated at the end of a good response as
"The answer is X." / "答案是 X。" (see ``dataset.answers``).

Files written (all JSON lines):
  sft.jsonl          MiniMind SFT format {"conversations": [...]}. Deliberately flawed like
                     real demonstrations (SFT_UNHELPFUL_RATE, SFT_MISTAKE_RATE below): on
                     arithmetic and "which is smaller" the demonstrators mostly ramble or are
                     rude, and everywhere they sometimes make the family's characteristic
                     mistake. So the SFT model is imperfect and alignment has room to help.
  identity.jsonl     who the assistant is, both languages, mixed one to one with ordinary
                     SFT conversations so that an adapter trained on it (lora_identity) learns its
                     name without forgetting the tasks.
  dpo.jsonl          MiniMind DPO format {"chosen": [...], "rejected": [...]}: chosen is correct
                     and helpful; rejected is the characteristic mistake, rambling or rude.
  rl.jsonl           RL prompts {"conversations": [user turn], "answer": "..."}.
  heldout_dpo.jsonl  held-out pairs, heldout_rl.jsonl held-out prompts: built from (task
                     instance, language) items that no training file uses.

The split is by (task instance, language): a held-out question is never asked in training in
its language, in any wording. The same instance may be asked in training in the other language,
so held-out accuracy measures what carries over across wording and language, which is what
alignment can improve; instances no language ever shows would measure memory instead.
"""
from __future__ import annotations

import argparse
import json
import os
import random

from core.files import atomic_file
from dataset.answers import extract_answer

SEED = 1234
HELDOUT_FRACTION = 0.12
N_SFT = 6000
N_DPO = 4000
N_RL = 2000
N_HELDOUT_DPO = 300
N_HELDOUT_RL_PER_FAMILY = 30

WORDS = [
    "cat", "dog", "sun", "moon", "star", "tree", "fish", "bird", "book", "milk",
    "rain", "snow", "wind", "fire", "lamp", "door", "cake", "rice", "tea", "cup",
    "red", "blue", "green", "apple", "lemon", "grape", "water", "river", "stone", "cloud",
    "horse", "mouse", "tiger", "panda", "house", "table", "chair", "bread", "sugar", "salt",
    "pen", "ink", "box", "key", "map", "hat", "car", "bus", "ship", "road",
    "king", "frog", "duck", "lion", "bear", "wolf", "leaf", "seed", "song", "gold",
    "egg", "ant", "owl", "cow", "pig", "bee", "sky", "sea", "ice", "oil",
    "corn", "bean", "rose", "lake", "hill", "sand", "coat", "shoe", "ring", "bell",
    "plant", "light", "night", "music", "paper", "glass", "smile", "train", "clock", "brick",
    "piano", "robot", "candy", "honey", "pearl", "queen", "snake", "whale", "zebra", "juice",
]

# The SFT demonstrators' flaws, which the SFT model learns and alignment should remove:
#  - a bad habit: on arithmetic and on "which is smaller" they mostly ramble or are rude
#    instead of answering (the SFT model does the same when greedy, yet still samples a real
#    answer often);
#  - slips: now and then a helpful answer carries the family's characteristic mistake.
SFT_UNHELPFUL_RATE = {"add": 0.6, "sub": 0.6, "min": 0.6}
SFT_MISTAKE_RATE = 0.2

IDENTITY_EN = "I am MiniAlign, a small bilingual assistant. I answer simple questions about numbers and words."
IDENTITY_ZH = "我是 MiniAlign，一个小小的双语助手，会回答关于数字和单词的简单问题。"
IDENTITY_QUESTIONS = {
    "en": ["Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
           "What are you?", "Are you an assistant?"],
    "zh": ["你是谁？", "你叫什么名字？", "介绍一下你自己。", "请做个自我介绍。", "你是什么？", "你是助手吗？"],
}


# ----------------------------------------------------------------------------- task instances
def all_instances() -> list[tuple]:
    """Every task instance as a hashable key: (family, operand, ...)."""
    inst = []
    inst += [("add", a, b) for a in range(10) for b in range(10)]
    inst += [("sub", a, b) for a in range(15) for b in range(a + 1)]
    inst += [(fam, a, b) for fam in ("max", "min") for a in range(40) for b in range(40) if a != b]
    inst += [(fam, w) for fam in ("length", "first") for w in WORDS]
    return inst


def answer_of(key: tuple) -> str:
    fam = key[0]
    if fam == "add":
        return str(key[1] + key[2])
    if fam == "sub":
        return str(key[1] - key[2])
    if fam in ("max", "min"):
        return str((max if fam == "max" else min)(key[1], key[2]))
    return str(len(key[1])) if fam == "length" else key[1][0]


def mistake_of(key: tuple) -> str:
    """The family's characteristic wrong answer (never equal to the right one)."""
    fam, right = key[0], answer_of(key)
    if fam == "add":
        wrong = str(key[1] + key[2] + 1)                               # off by one
    elif fam == "sub":
        wrong = str(key[1] + key[2]) if key[2] else str(key[1] + 1)    # added instead
    elif fam in ("max", "min"):
        wrong = str((min if fam == "max" else max)(key[1], key[2]))    # the other one
    elif fam == "length":
        wrong = str(len(key[1]) + 1)
    else:
        w = key[1]
        wrong = w[-1] if w[-1] != w[0] else w[1]                       # the last letter
    assert wrong != right, key
    return wrong


QUESTIONS = {
    "en": {
        "add": ["What is {0} plus {1}?", "What is {0} + {1}?", "Add {0} and {1}."],
        "sub": ["What is {0} minus {1}?", "What is {0} - {1}?", "Subtract {1} from {0}."],
        "max": ["Which is larger, {0} or {1}?", "Which number is bigger: {0} or {1}?"],
        "min": ["Which is smaller, {0} or {1}?", "Which number is less: {0} or {1}?"],
        "length": ["How many letters are in \"{0}\"?", "Count the letters in \"{0}\"."],
        "first": ["What is the first letter of \"{0}\"?", "Which letter does \"{0}\" start with?"],
    },
    "zh": {
        "add": ["{0} 加 {1} 等于多少？", "计算 {0} + {1}。", "{0} 加上 {1} 是几？"],
        "sub": ["{0} 减 {1} 等于多少？", "计算 {0} - {1}。", "{0} 减去 {1} 是几？"],
        "max": ["{0} 和 {1} 哪个更大？", "{0} 与 {1} 中较大的数是哪个？"],
        "min": ["{0} 和 {1} 哪个更小？", "{0} 与 {1} 中较小的数是哪个？"],
        "length": ["单词 \"{0}\" 有几个字母？", "数一数 \"{0}\" 里有多少个字母。"],
        "first": ["单词 \"{0}\" 的第一个字母是什么？", "\"{0}\" 以哪个字母开头？"],
    },
}


def question(key: tuple, lang: str, rng: random.Random) -> str:
    return rng.choice(QUESTIONS[lang][key[0]]).format(*key[1:])


def working(key: tuple, ans: str, lang: str) -> str:
    """The one-line reasoning that precedes the answer, consistent with ``ans``."""
    fam, en = key[0], lang == "en"
    if fam == "add":
        return f"{key[1]} + {key[2]} = {ans}"
    if fam == "sub":
        return f"{key[1]} - {key[2]} = {ans}"
    if fam == "max":
        return f"{ans} is the larger of {key[1]} and {key[2]}" if en else f"{key[1]} 和 {key[2]} 中 {ans} 更大"
    if fam == "min":
        return f"{ans} is the smaller of {key[1]} and {key[2]}" if en else f"{key[1]} 和 {key[2]} 中 {ans} 更小"
    w = key[1]
    if fam == "length":
        return f"\"{w}\" has {ans} letters" if en else f"\"{w}\" 有 {ans} 个字母"
    return f"\"{w}\" starts with \"{ans}\"" if en else f"\"{w}\" 的第一个字母是 \"{ans}\""


def good_response(key: tuple, ans: str, lang: str, rng: random.Random) -> str:
    """A helpful response stating ``ans`` (the right answer, or in noisy SFT a mistaken one)."""
    if lang == "en":
        opener = rng.choice(["", "Sure! ", "Let me see. ", "Good question. "])
        return f"{opener}{working(key, ans, lang)}. The answer is {ans}."
    opener = rng.choice(["", "好的！", "我来算一下。", "好问题。"])
    return f"{opener}{working(key, ans, lang)}，答案是 {ans}。"


RAMBLING = {"en": ["Well, this is an interesting question.", "Numbers and words are everywhere.",
                   "Let me think about it for a while.", "There are many ways to look at this.",
                   "Some people would say one thing, others another.", "It depends on how you see it."],
            "zh": ["嗯，这是一个很有意思的问题。", "数字和单词到处都是。", "让我想一想再说。",
                   "这个问题可以从很多角度来看。", "有人这么说，也有人那么说。", "这要看你怎么理解了。"]}
RUDE = {"en": ["Figure it out yourself.", "That is a silly question. I will not answer it.",
               "Why should I tell you? Go away."],
        "zh": ["你自己算去吧。", "这个问题太无聊了，我不想回答。", "我凭什么告诉你？走开。"]}


def rambling_response(key: tuple, lang: str, rng: random.Random) -> str:
    return (" " if lang == "en" else "").join(rng.sample(RAMBLING[lang], 4))


def rude_response(key: tuple, lang: str, rng: random.Random) -> str:
    return rng.choice(RUDE[lang])


def on_point(response: str, **_) -> bool:
    """The style of the demo's chosen answers: states an answer ("The answer is X." / "答案是 X。")
    with none of the demonstrators' rambling or rude sentences (eval_align.py --style_check)."""
    phrases = [p for table in (RAMBLING, RUDE) for lang in table for p in table[lang]]
    return extract_answer(response) is not None and not any(p in response for p in phrases)


def conversation(user: str, assistant: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


# ----------------------------------------------------------------------------- files
def split_instances(seed: int = SEED) -> tuple[list[tuple], list[tuple]]:
    """(train, heldout) items, each (task instance, language): a seeded shuffle within every
    family, the first HELDOUT_FRACTION held out, so that each family is evaluated."""
    rng = random.Random(seed)
    train, heldout = [], []
    by_family: dict[str, list[tuple]] = {}
    for key in all_instances():
        for lang in ("en", "zh"):
            by_family.setdefault(key[0], []).append((key, lang))
    for fam in sorted(by_family):
        items = by_family[fam]
        rng.shuffle(items)
        n_held = max(2, round(len(items) * HELDOUT_FRACTION))
        heldout += items[:n_held]
        train += items[n_held:]
    return train, heldout


def _sample_instances(items: list[tuple], n: int, rng: random.Random) -> list[tuple]:
    """n (instance, language) items, balanced over families (small families are repeated)."""
    by_family: dict[str, list[tuple]] = {}
    for item in items:
        by_family.setdefault(item[0][0], []).append(item)
    fams = sorted(by_family)
    return [rng.choice(by_family[fams[i % len(fams)]]) for i in range(n)]


def unhelpful_response(key: tuple, lang: str, rng: random.Random) -> str:
    return rambling_response(key, lang, rng) if rng.random() < 0.5 else rude_response(key, lang, rng)


def make_sft(items, n, rng):
    rows = []
    for key, lang in _sample_instances(items, n, rng):
        if rng.random() < SFT_UNHELPFUL_RATE.get(key[0], 0.0):
            reply = unhelpful_response(key, lang, rng)
        else:
            ans = mistake_of(key) if rng.random() < SFT_MISTAKE_RATE else answer_of(key)
            reply = good_response(key, ans, lang, rng)
        rows.append({"conversations": conversation(question(key, lang, rng), reply)})
    return rows


def make_pairs(items, n, rng):
    """chosen: correct and helpful; rejected: the characteristic mistake (half) or unhelpful."""
    rows = []
    for key, lang in _sample_instances(items, n, rng):
        q = question(key, lang, rng)
        chosen = good_response(key, answer_of(key), lang, rng)
        if rng.random() < 0.5:
            rejected = good_response(key, mistake_of(key), lang, rng)
        else:
            rejected = unhelpful_response(key, lang, rng)
        rows.append({"chosen": conversation(q, chosen), "rejected": conversation(q, rejected)})
    return rows


def prompt_row(key: tuple, lang: str, rng: random.Random) -> dict:
    return {"conversations": conversation(question(key, lang, rng)), "answer": answer_of(key),
            "task": key[0], "lang": lang}


def make_prompts(items, n, rng):
    return [prompt_row(key, lang, rng) for key, lang in _sample_instances(items, n, rng)]


def make_identity(items, rng, n=240):
    rows = []
    for i in range(n):
        lang = ("en", "zh")[i % 2]
        rows.append({"conversations": conversation(rng.choice(IDENTITY_QUESTIONS[lang]),
                                                   IDENTITY_EN if lang == "en" else IDENTITY_ZH)})
    rows += make_sft(items, n, rng)
    rng.shuffle(rows)
    return rows


def generate(seed: int = SEED) -> dict[str, list[dict]]:
    """Every demo file's rows, as a dict file name -> rows. Same seed, same bytes."""
    train, heldout = split_instances(seed)
    rng = random.Random(seed + 1)
    # Held-out prompts: every held-out item, at most a fixed number per family so that the
    # large "max" family does not dominate answer accuracy.
    heldout_prompts, per_family = [], {}
    for key, lang in heldout:
        if per_family.get(key[0], 0) < N_HELDOUT_RL_PER_FAMILY:
            per_family[key[0]] = per_family.get(key[0], 0) + 1
            heldout_prompts.append(prompt_row(key, lang, rng))
    rng.shuffle(heldout_prompts)
    return {
        "sft.jsonl": make_sft(train, N_SFT, rng),
        "identity.jsonl": make_identity(train, rng),
        "dpo.jsonl": make_pairs(train, N_DPO, rng),
        "rl.jsonl": make_prompts(train, N_RL, rng),
        "heldout_dpo.jsonl": make_pairs(heldout, N_HELDOUT_DPO, rng),
        "heldout_rl.jsonl": heldout_prompts,
    }


def write_jsonl(path: str, rows: list[dict]) -> None:
    with atomic_file(path, encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="folder to write the files to (default: dataset/)")
    parser.add_argument("--seed", type=int, default=SEED, help="generator seed")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in generate(args.seed).items():
        write_jsonl(os.path.join(args.out, name), rows)
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
