"""The documentation is current: docs/flags.md is what the parsers say, and every link resolves."""
import glob
import importlib
import importlib.util
import os
import re

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


def test_every_relative_link_of_the_docs_resolves():
    """README.md and docs/*.md: each link to a file of the project names one that exists, and each
    #anchor one of that page's headings (as GitHub makes anchors from them)."""
    pages = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    broken = []
    for page in pages:
        text = open(page, encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(file):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such file)")
            elif anchor and anchor not in anchors(file):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not broken, broken


def anchors(page: str) -> set[str]:
    headings = [line.lstrip("#").strip() for line in open(page, encoding="utf-8") if line.startswith("#")]
    return {make_flags.anchor(h.replace("`", "")) for h in headings}
