"""The README and docs/ say what the code does: codes, flags, links, commands and output.

- docs/patterns.md's refusal-code table lists exactly the members of ``bnfold.Code``,
  each with the fronts that report it (from the families' ``FAMILY.codes``).
- docs/cli.md names every option of every command in that command's section.
- Every relative link in README.md and docs/*.md resolves, anchors included.
- Code blocks after ``<!-- test: run -->`` are run, line by line, in a temporary
  folder holding ``sample_models/``, with the installed bnfold (``python -m bnfold``);
  each line ends in ``# exit N``, the code it must exit with.
- The block after ``<!-- test: output -->`` (the README's fold) is its command and
  what that command prints. Measured differences (``max_abs``, ``max_rel``,
  ``needed_rtol``) and which site is the worst vary with the CPU's kernels, so
  they are masked; everything else, bounds included, must match.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from bnfold.cli.main import main
from bnfold.report import Code
from bnfold.rules import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
FRONTS = ("onnx", "eager", "pt2")


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line) up to the next heading of its level."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n")
    end = re.compile(rf"^{level} ", re.M).search(text, start + len(heading) + 2)
    return text[start : end.start() if end else len(text)]


def marked_blocks(text: str, mark: str) -> list[str]:
    """The body of each fenced code block that follows ``<!-- test: mark -->``."""
    pattern = rf"<!-- test: {mark} -->\n```[a-z]*\n(.*?)```"
    return re.findall(pattern, text, re.S)


# -- refusal codes -------------------------------------------------------------------


def documented_codes() -> dict[str, set[str]]:
    """docs/patterns.md's refusal-code rows: code -> the fronts its row names."""
    table = section((DOCS / "patterns.md").read_text(), "## Refusal codes")
    rows: dict[str, set[str]] = {}
    for line in table.splitlines():
        if match := re.match(r"\| `(\w+)` \| ([a-z0-9, ]+) \|", line):
            fronts = match.group(2).strip()
            rows[match.group(1)] = set(FRONTS) if fronts == "all" else set(fronts.split(", "))
    return rows


def test_the_documented_refusal_codes_are_the_code_enum() -> None:
    documented = set(documented_codes())
    members = {code.value for code in Code}
    assert documented - members == set(), "documented but not in bnfold.Code"
    assert members - documented == set(), "in bnfold.Code but not in docs/patterns.md"


def test_each_code_names_the_fronts_that_report_it() -> None:
    for code, fronts in documented_codes().items():
        declared = {f for f in FRONTS if any(Code(code) in fam.codes_on(f) for fam in FAMILIES)}
        assert fronts == declared, f"{code}: docs say {sorted(fronts)}, families {sorted(declared)}"


# -- CLI flags -----------------------------------------------------------------------


def command_options() -> list[tuple[str, str]]:
    """(command, option spelling) for every option of every bnfold command."""
    assert isinstance(main, click.Group)
    pairs = []
    for name, command in sorted(main.commands.items()):
        for param in command.params:
            if isinstance(param, click.Option):
                pairs += [(name, opt) for opt in (*param.opts, *param.secondary_opts)]
    return pairs


def test_every_command_has_options_to_check() -> None:
    assert {name for name, _ in command_options()} == {"bench", "fold", "inspect", "verify"}


@pytest.mark.parametrize(("command", "option"), command_options())
def test_every_flag_is_in_its_commands_section_of_cli_md(command: str, option: str) -> None:
    text = section((DOCS / "cli.md").read_text(), f"## `bnfold {command}`")
    assert re.search(rf"`{re.escape(option)}[` ]", text), f"{option} of {command}"


# -- links ---------------------------------------------------------------------------


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown page."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", page.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def relative_links() -> list[tuple[Path, str]]:
    links = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if not re.match(r"[a-z]+:", target):
                links.append((page, target))
    return links


def test_the_pages_have_links() -> None:
    assert len(relative_links()) > 30


@pytest.mark.parametrize(
    ("page", "target"), relative_links(), ids=lambda v: v.name if isinstance(v, Path) else v
)
def test_every_relative_link_resolves(page: Path, target: str) -> None:
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    assert resolved.exists(), f"{page.name}: {target}"
    if anchor:
        assert anchor in anchors(resolved), f"{page.name}: no heading for #{anchor} in {path}"


def test_the_anchor_rule_reads_headings_as_github_does(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("# Refusal codes\n## `bnfold fold`\n### batch_merge\n")
    assert anchors(page) == {"refusal-codes", "bnfold-fold", "batch_merge"}


# -- documented commands --------------------------------------------------------------


def documented_commands() -> list[tuple[str, str, int]]:
    """(page, command line, claimed exit code) of every marked command, in page order."""
    out = []
    for page in PAGES:
        for block in marked_blocks(page.read_text(), "run"):
            for line in block.strip().splitlines():
                match = re.fullmatch(r"(bnfold .*?)\s+# exit (\d)", line.strip())
                assert match, f"{page.name}: {line!r} has no '# exit N'"
                out.append((page.name, match.group(1), int(match.group(2))))
    return out


def run_bnfold(line: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = shlex.split(line)
    assert argv[0] == "bnfold", line
    env = {**os.environ, "BNFOLD_DEBUG": ""}
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *argv[1:]],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty folder with the bundled sample models at ``sample_models/``."""
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models")
    return tmp_path


def test_the_docs_mark_commands_to_run() -> None:
    commands = documented_commands()
    assert len(commands) >= 5
    assert {code for _, _, code in commands} == {0, 1, 2}


def test_the_documented_commands_exit_as_they_claim(workdir: Path) -> None:
    for page, line, code in documented_commands():
        result = run_bnfold(line, workdir)
        assert result.returncode == code, f"{page}: {line}\n{result.stdout}{result.stderr}"


# -- the README's output ---------------------------------------------------------------


def masked(text: str) -> list[str]:
    """Lines of a fold's output without what varies with the machine's kernels."""
    text = re.sub(r"\b(max_abs|max_rel|needed_rtol)=\S+", r"\1=*", text)
    text = re.sub(r"(all within their bounds); worst .*", r"\1; worst *", text)
    return text.rstrip("\n").splitlines()


def test_the_readme_shows_what_its_fold_prints(workdir: Path) -> None:
    (block,) = marked_blocks(README.read_text(), "output")
    first, *shown = block.rstrip("\n").splitlines()
    assert first.startswith("$ bnfold "), first
    result = run_bnfold(first.removeprefix("$ "), workdir)
    assert result.returncode == 0, result.stderr
    assert masked(result.stdout) == masked("\n".join(shown))


def test_the_readme_opens_with_the_commands_ci_runs() -> None:
    """.ci/run runs these two lines verbatim; the README must keep them first."""
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", README.read_text(), re.S)
    assert blocks[:2] == [
        "pip install . && bnfold fold sample_models/resnet_tiny.onnx -o folded.onnx",
        'pip install torch==2.13.0 -e ".[torch,dev]" && pytest',
    ]
    assert all(command in ci for command in blocks[:2])
