"""The documentation that is made from the code is current: docs/flags.md from the parsers."""
import importlib.util
import os

from conftest import ROOT

SPEC = importlib.util.spec_from_file_location("make_flags", os.path.join(ROOT, "docs", "make_flags.py"))
make_flags = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(make_flags)


def test_flags_page_is_current():
    with open(make_flags.OUT, encoding="utf-8") as f:
        written = f.read()
    assert written == make_flags.render(), "docs/flags.md is out of date: run python docs/make_flags.py"


def test_flags_page_lists_every_flag_of_every_script():
    page = make_flags.render()
    for command, module in make_flags.SCRIPTS:
        parser = importlib.import_module(module).arg_parser()
        section = page.split(f"## {command}\n", 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section or f", {flag}" in section, (command, flag)
    assert "| `--beta BETA` | strength of the pull towards the reference" in page
    assert "(default: 0.2)" in page.split("## train_gpo.py", 1)[1]                    # --epsilon's, filled in
