"""Write docs/flags.md, every script's flags, from the scripts' own argument parsers.

    python docs/make_flags.py          # rewrites docs/flags.md; tests/test_docs.py checks it is current

Each section lists the flags of the script's own parser (its ``arg_parser()``), group by group,
with the help ``--help`` prints (defaults included), so the page says exactly what the scripts
accept. It is made from the parsers' contents, not from argparse's layout, so it is the same on
every Python version and terminal width.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (how it is run, its module), in the order of the pipeline
SCRIPTS = [("train_sft.py", "train_sft"), ("train_dpo.py", "train_dpo"), ("train_reward.py", "train_reward"),
           ("train_ppo.py", "train_ppo"), ("train_gpo.py", "train_gpo"), ("train_grpo.py", "train_grpo"),
           ("eval_align.py", "eval_align"), ("chat.py", "chat"), ("plot_curves.py", "plot_curves"),
           ("python -m model.export", "model.export"), ("python -m model.from_gguf", "model.from_gguf")]
OUT = os.path.join(ROOT, "docs", "flags.md")


def flag_tables(module: str) -> list[str]:
    """The parser's description, then a table of each group's flags: | flag | what it does |."""
    parser = importlib.import_module(module).arg_parser()
    lines = [parser.description or "", ""]
    for group in parser._action_groups:          # argparse keeps the groups, in order, here alone
        actions = [a for a in group._group_actions if a.help is not argparse.SUPPRESS and a.dest != "help"]
        if not actions:
            continue
        lines += [f"**{group.title}**", "", "| flag | what it does |", "|---|---|"]
        lines += [f"| `{flag_name(a)}` | {table_text(expanded_help(a))} |" for a in actions] + [""]
    return lines


def flag_name(action: argparse.Action) -> str:
    """``--flag VALUE`` (every spelling), ``--switch``, or a positional's name."""
    if not action.option_strings:
        return action.metavar or action.dest
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    value = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper())
    return ", ".join(f"{o} {value}" for o in action.option_strings)


def expanded_help(action: argparse.Action) -> str:
    """The help as --help prints it: %(default)s and the other fields filled in."""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return (action.help or "") % params


def table_text(text: str) -> str:
    """``text`` as a Markdown table cell shows it: its pipes and angle brackets escaped."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def render() -> str:
    lines = ["# Flags", "",
             "Every flag of every script, with its default, as each script's `--help` says it. This page is",
             "made by `python docs/make_flags.py` from the scripts' own parsers, and a test checks that it is",
             "current. Flags the seed's command lines use keep MiniMind's names; where a default depends on",
             "the weights (the demo's or a real model's), the flag says so ([weights.md](weights.md)).", ""]
    lines += [f"- [{command}](#{anchor(command)})" for command, _ in SCRIPTS] + [""]
    for command, module in SCRIPTS:
        lines += [f"## {command}", ""] + flag_tables(module)
    return "\n".join(lines).rstrip() + "\n"


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, spaces to dashes, other punctuation dropped."""
    return "".join(c for c in heading.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def main() -> None:
    page = render()                                   # all of it first: a failure leaves the old page whole
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
