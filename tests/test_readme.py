"""The README stays a short, true guide: its length, its links, the commands it shows, and the docs it cites.

- README.md is at most 250 lines (the measurements live in docs/benchmarks.md);
- every relative link in README.md and the hand-written docs points at a file that exists;
- every ``ifedicl <command>`` in a README ```bash block names a real command, with only flags that
  ``ifedicl <command> --help`` lists (run once per command through the installed CLI); after
  ``ifedicl serve``, options it does not list must be ones that pass through to vLLM, and the README
  must say that they do;
- no ``*.py`` file cites METHOD.md or DESIGN.md, which are not in the repository (docs/method.md and
  docs/design.md are);
- the evaluation section's table is the committed report's accuracy table over its whole grid.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [ROOT / "docs" / name for name in ("method.md", "design.md", "benchmarks.md", "runbook.md")]
IFEDICL = Path(sys.executable).with_name("ifedicl")  # the console script installed beside this interpreter
MAX_README_LINES = 250

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")
# The README must say this next to `ifedicl serve` for vLLM's options to be allowed there.
PASS_THROUGH_CLAIM = re.compile(r"pass(es)? through\s+to\s+vLLM", re.I)


# ---------------------------------------------------------------- parsing (pure, tested below)


def code_blocks(markdown: str, language: str | None = None) -> list[str]:
    """The bodies of fenced code blocks, all or only those of ``language``."""
    return [body for lang, body in FENCE.findall(markdown) if language is None or lang == language]


def relative_links(markdown: str) -> list[str]:
    """Link targets outside code blocks that are paths in this repository (no URL, no bare #anchor)."""
    prose = FENCE.sub("", markdown)
    targets = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(path: Path) -> list[str]:
    return [t for t in relative_links(path.read_text(encoding="utf-8")) if not (path.parent / t).exists()]


def shell_lines(block: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", block)
    return [line for line in joined.splitlines() if line.strip()]


def ifedicl_invocations(block: str) -> list[tuple[list[str], list[str]]]:
    """Each ``ifedicl`` call in a bash block: (its words up to the first flag, the flags it passes)."""
    calls = []
    for line in shell_lines(block):
        words = shlex.split(line, comments=True)
        starts = [i for i, w in enumerate(words) if w == "ifedicl" or w.endswith("/ifedicl")]
        for n, start in enumerate(starts):
            end = starts[n + 1] if n + 1 < len(starts) else len(words)
            call = words[start + 1 : end]
            for i, word in enumerate(call):
                if word in {"&&", "||", "|", ";"}:
                    call = call[:i]
                    break
            head = []
            for word in call:
                if word.startswith("-"):
                    break
                head.append(word)
            flags = [w.split("=", 1)[0] for w in call if w.startswith("--") and len(w) > 2]
            calls.append((head, flags))
    return calls


def help_commands(help_text: str) -> set[str]:
    """Subcommand names in a ``--help`` screen's Commands panel."""
    names, inside = set(), False
    for line in help_text.splitlines():
        if "Commands" in line and "─" in line:
            inside = True
        elif inside and line.lstrip().startswith("╰"):
            inside = False
        elif inside:
            match = re.match(r"\s*│\s*([a-z][a-z0-9-]*)\s", line)
            if match:
                names.add(match.group(1))
    return names


def help_flags(help_text: str) -> set[str]:
    return set(FLAG.findall(help_text))


def serve_pass_through_flags() -> set[str]:
    """Options `ifedicl serve` hands to vLLM's parser: ifedicl's own (serving/launch.py) and vLLM's engine
    and server arguments (their dataclass fields, read from vLLM's source without importing vLLM)."""
    ours = set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', (ROOT / "serving" / "launch.py").read_text()))
    spec = importlib.util.find_spec("vllm")
    theirs = set()
    if spec is not None and spec.origin:
        base = Path(spec.origin).parent
        for rel in ("engine/arg_utils.py", "entrypoints/launchers/cli_args.py"):
            source = base / rel
            if source.exists():
                fields = re.findall(r"^\s+([a-z][a-z0-9_]*)\s*:", source.read_text(), re.M)
                theirs |= {"--" + name.replace("_", "-") for name in fields}
    return ours | theirs


def unknown_usage(
    calls: list[tuple[list[str], list[str]]],
    helps: dict[tuple[str, ...], str],
    pass_through: set[str],
) -> list[str]:
    """What the calls name that the CLI does not have (empty: every command and flag is real)."""
    problems = []
    for head, flags in calls:
        path: tuple[str, ...] = ()
        problem = None
        for word in head:  # walk down the command groups; what follows a command is its arguments
            if word in help_commands(helps[path]):
                path = (*path, word)
            elif not path or help_commands(helps[path]):
                problem = f"ifedicl {' '.join((*path, word))}: no such command"
                break
            else:
                break
        if problem is None and path and help_commands(helps[path]):
            problem = f"ifedicl {' '.join(path)}: a command group, not a command"
        if problem is not None:  # no command to check the flags against
            problems.append(problem)
            continue
        listed = help_flags(helps[path])
        for flag in flags:
            if flag in listed or (path == ("serve",) and flag in pass_through):
                continue
            problems.append(f"ifedicl {' '.join(path)} {flag}: not an option of the command")
    return problems


# ---------------------------------------------------------------- running the CLI


def run_help(path: tuple[str, ...]) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IFEDICL_")}
    proc = subprocess.run(
        [str(IFEDICL), *path, "--help"], capture_output=True, text=True, timeout=60,
        env={**clean, "COLUMNS": "300", "TERMINAL_WIDTH": "300"},
    )  # fmt: skip
    assert proc.returncode == 0, f"ifedicl {' '.join(path)} --help: {proc.stderr}"
    return proc.stdout


def collect_helps(calls: list[tuple[list[str], list[str]]]) -> dict[tuple[str, ...], str]:
    """``--help`` of the top level and of every command path the calls could name, each run once."""
    helps = {(): run_help(())}
    frontier = [()]
    while frontier:
        wanted = set()
        for path in frontier:
            commands = help_commands(helps[path])
            for head, _ in calls:
                if tuple(head[: len(path)]) == path and len(head) > len(path) and head[len(path)] in commands:
                    wanted.add((*path, head[len(path)]))
        wanted -= set(helps)
        with ThreadPoolExecutor(max_workers=4) as pool:
            helps.update(zip(wanted, pool.map(run_help, wanted), strict=True))
        frontier = list(wanted)
    return helps


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text(encoding="utf-8")


# ---------------------------------------------------------------- the checks


def test_the_evaluation_table_is_the_committed_report_s(readme):
    """The headline table is rebuilt from ``docs/report/results.json`` (``ifedicl report --render-only --readme``):
    a cell committed without rewriting it, or a hand edit of a number, fails here."""
    import json

    from ifedicl.evaluation.render import with_headline

    results = json.loads((ROOT / "docs" / "report" / "results.json").read_text(encoding="utf-8"))
    assert with_headline(readme, results) == readme, (
        "README.md's headline table is not docs/report's: run "
        "`ifedicl report --out docs/report --data-dir ../shared/data --render-only --readme README.md`"
    )
    assert "| smollm2-135m | trec |" in readme and "| gemma3-270m | agnews |" in readme  # planned rows, finished or not


def test_readme_is_short(readme):
    lines = len(readme.splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail to docs/"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(path):
    assert path.exists(), f"{path.relative_to(ROOT)} is missing"
    assert not broken_links(path), f"{path.relative_to(ROOT)} links to missing files: {broken_links(path)}"


def test_readme_commands_and_flags_are_real(readme):
    calls = [call for block in code_blocks(readme, "bash") for call in ifedicl_invocations(block)]
    assert calls, "README.md shows no ifedicl command in a ```bash block"
    if any(head[:1] == ["serve"] for head, _ in calls):
        assert PASS_THROUGH_CLAIM.search(readme), "README.md must say `ifedicl serve` options pass through to vLLM"
    assert unknown_usage(calls, collect_helps(calls), serve_pass_through_flags()) == []


def cites_outside(line: str) -> bool:
    """Whether a line cites METHOD.md or DESIGN.md (not docs/method.md or docs/design.md)."""
    return re.search(r"(?<![\w/.-])(METHOD|DESIGN)\.md", line) is not None


def python_files() -> list[Path]:
    skip = {".venv", ".git", "docs", "node_modules", "build", "dist", "__pycache__", ".ruff_cache", ".pytest_cache"}
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        found += [Path(folder) / name for name in files if name.endswith(".py")]
    return found


def test_no_python_file_cites_files_outside_the_repository():
    cited = []
    for path in python_files():
        if path == Path(__file__).resolve():  # this file names them to forbid them
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if cites_outside(line):
                cited.append(f"{path.relative_to(ROOT)}:{number}")
    assert not cited, f"cite docs/method.md or docs/design.md instead: {cited}"


# ---------------------------------------------------------------- each check can fail


def test_the_checks_catch_what_they_guard(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("[ok](x.md) [gone](missing.md#a) [web](https://example.com) [anchor](#top)\n"
                   "```bash\ncat [not a link](nowhere.md)\n```\n")  # fmt: skip
    assert broken_links(doc) == ["missing.md"]

    block = (
        "ifedicl federate --task-dir d --no-such-flag 1 \\\n    --rounds 2   # a comment --ignored\n"
        "ifedicl frobnicate --x\nifedicl models pull a b\nifedicl models\n"
        "ifedicl serve --store s --api-key k --made-up\nray job submit -- ifedicl runs --store s\n"
    )
    helps = {
        (): "╭─ Commands ─╮\n│ federate  x │\n│ serve  x │\n│ runs  x │\n│ models  x │\n╰────╯\n",
        ("federate",): "--task-dir --rounds",
        ("models",): "╭─ Commands ─╮\n│ pull  x │\n╰────╯\n",
        ("models", "pull"): "--force",
        ("serve",): "--store",
        ("runs",): "--store",
    }
    problems = unknown_usage(ifedicl_invocations(block), helps, {"--api-key"})
    assert problems == [
        "ifedicl federate --no-such-flag: not an option of the command",
        "ifedicl frobnicate: no such command",
        "ifedicl models: a command group, not a command",
        "ifedicl serve --made-up: not an option of the command",
    ], problems
    assert "--api-key" in serve_pass_through_flags() and "--admin-api-key" in serve_pass_through_flags()
    assert cites_outside('    """I2CL defaults (METHOD.md)."""') and cites_outside("# see DESIGN.md, Serving")
    assert not cites_outside("# I2CL's defaults (docs/method.md)") and not cites_outside("docs/design.md")
