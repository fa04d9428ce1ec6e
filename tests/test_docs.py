"""The README and docs/ as a reader meets them: the front page is short, every link between pages
and every file a page names exists, the README's test command is what CI runs, and every command
a page shows names real commands and flags (the concrete ones parse as written)."""
import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from models.config import FAMILIES
from p2p.cli import parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")
INLINE_COMMAND = re.compile(r"`((?:p2p [a-z]|python -m |python benchmarks/|torchrun )[^`]*)`")
REPO_PATH = re.compile(r"(?<![\w./-])((?:configs|benchmarks|tests|notebooks|models|p2p|weights_tools|docs)/[\w./-]*\w)"
                       r"(?![\w*./-])")
FENCED = re.compile(r"^\s*```.*?^\s*```", re.S | re.M)
SYNOPSIS = ("[", "|", "...", "…")


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set:
    text = FENCED.sub("", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def code_lines(page: Path) -> list:
    """Lines of the page's shell code: fenced blocks that are not Python, and indented blocks."""
    lines, fence, lang = [], False, ""
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fence, lang = (not fence), line.strip()[3:].strip()
            continue
        if fence and lang not in ("python", "yaml", "json"):
            lines.append(line.strip())
        elif not fence and line.startswith("    ") and line.strip().startswith(("p2p ", "python ")):
            lines.append(line.strip())
    return lines


def commands(page: Path) -> list:
    """Every command the page shows, with whether it is whole: shell lines (continuations joined) are,
    inline spans (`p2p edit --show-attention`) name a command and its flags only."""
    out, current = [], ""
    for line in code_lines(page):
        line = line[2:] if line.startswith("$ ") else line
        current = f"{current} {line}".strip()
        if current.endswith("\\"):
            current = current[:-1]
            continue
        if current.startswith(("p2p ", "python ", "torchrun ")):
            out.append((" ".join(current.split()), True))
        current = ""
    text = FENCED.sub("", page.read_text())
    return out + [(" ".join(m.group(1).split()), False) for m in INLINE_COMMAND.finditer(text)]


def all_commands(p2p: bool) -> list:
    return [(rel(page), cmd, whole) for page in PAGES for cmd, whole in commands(page)
            if cmd.startswith("p2p ") == p2p]


def words(cmd: str) -> list:
    try:
        return shlex.split(cmd, comments=True)
    except ValueError:  # a synopsis with an odd quote
        return cmd.split("#")[0].split()


def flags(cmd: str) -> list:
    """The --flags a command uses (synopsis brackets and `|` alternatives stripped; `--a=b` as --a)."""
    found = [w.strip("[]|").split("=")[0] for w in words(cmd)]
    return [w for w in found if re.fullmatch(r"--[a-z][\w-]*", w)]


def help_text(argv: list) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parser().parse_args([*argv, "--help"])
    return out.getvalue()


@lru_cache(maxsize=None)
def script_help(target: tuple) -> str:
    """`python -m MODULE --help` / `python SCRIPT --help`, run once per script."""
    run = subprocess.run([sys.executable, *target, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, f"{' '.join(target)} --help failed:\n{run.stderr[-2000:]}"
    return run.stdout


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines; move detail into docs/ (under 250)"
    text = README.read_text()
    missing = [code for code in FAMILIES if f"`{code}`" not in text]
    assert not missing, f"the README's families table lacks the families {missing} (models.config.FAMILIES)"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_links_point_to_existing_files_and_headings(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if ROOT in dest.parents else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {rel(dest)}")
    assert not broken, f"{rel(page)} has broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_named_project_files_exist(page):
    text = page.read_text()
    named = {m for m in REPO_PATH.findall(text) if not re.search(r"[A-Z]{3,}", m)}
    missing = sorted(m for m in named if not (ROOT / m).exists())
    assert not missing, f"{rel(page)} names files the project does not have: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_pages_speak_of_the_project_alone(page):
    text = page.read_text()
    found = [w for w in ("DESIGN.md", "../shared", "/work/", "previous session") if w in text]
    found += re.findall(r"commit [0-9a-f]{7,40}", text)
    assert not found, f"{rel(page)} refers to what is not in the project: {found}"


def readme_test_command() -> list:
    text = README.read_text()
    block = text.split("Run the tests", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [step.strip() for step in block.replace("\\\n", " ").split("&&")]


def test_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    quiet = [" ".join(w for w in line.split() if w != "-q") if line.startswith("pip ") else line for line in ci]
    readme = [" ".join(step.split()) for step in readme_test_command()]
    assert readme == quiet, f"the README's test command {readme} is not what .ci/run runs {ci}"


def p2p_subcommands(cmd: str) -> list:
    w = cmd.split()
    return w[1].split("|") if len(w) > 1 else []


def nested(help_page: str, word: str) -> bool:
    """Whether `word` is one of the subcommands a command's help lists (`p2p bench` -> pie, eval, report)."""
    positionals = help_page.split("positional arguments:", 1)[-1].split("options:", 1)[0]
    found = re.search(r"\{([\w,-]+)\}", positionals)
    return found is not None and word in found.group(1).split(",")


def command_path(cmd: str, sub: str) -> list:
    """[sub], or [sub, its subcommand] for a command that has its own (`p2p bench pie ...`)."""
    w = cmd.split()
    return [sub, w[2]] if len(w) > 2 and nested(help_text([sub]), w[2]) else [sub]


@pytest.mark.parametrize("where,cmd,whole", all_commands(p2p=True))
def test_p2p_commands_use_real_subcommands_and_flags(where, cmd, whole):
    choices = help_text([]).split("{", 1)[1].split("}", 1)[0].split(",")
    for sub in p2p_subcommands(cmd):
        assert sub in choices, f"{where}: `{cmd}` names no p2p command {sub!r} (there are {choices})"
        known = set(re.findall(r"--[a-z][\w-]*", help_text(command_path(cmd, sub))))
        unknown = [f for f in flags(cmd) if f not in known]
        assert not unknown, f"{where}: `p2p {sub}` has no flags {unknown}: `{cmd}`"
    if whole and not any(s in cmd for s in SYNOPSIS):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                parser().parse_args(words(cmd)[1:])
            except SystemExit:
                pytest.fail(f"{where}: `{cmd}` does not parse: {err.getvalue()}")


def script_target(cmd: str) -> tuple:
    """("-m", MODULE) or (SCRIPT,), with the subcommand when the script has subcommands (`-m p2p.bench pie`)."""
    w = words(cmd)
    at = w.index("-m") + 1 if "-m" in w else 1
    target = ("-m", w[at]) if "-m" in w else (w[1],)
    after = w[at + 1] if len(w) > at + 1 else ""
    return (*target, after) if re.fullmatch(r"[a-z]+", after) and nested(script_help(target), after) else target


@pytest.mark.parametrize("where,cmd,whole", all_commands(p2p=False))
def test_python_commands_name_real_modules_scripts_and_flags(where, cmd, whole):
    target = script_target(cmd)
    if target[0] == "-m":
        assert importlib.util.find_spec(target[1]) is not None, f"{where}: no module {target[1]}: `{cmd}`"
    else:
        assert (ROOT / target[0]).is_file(), f"{where}: no script {target[0]}: `{cmd}`"
    wanted = [f for f in flags(cmd.split(target[-1], 1)[1]) if f != "--nproc_per_node"]
    if wanted and "|" not in cmd:
        known = set(re.findall(r"--[a-z][\w-]*", script_help(target)))
        unknown = [f for f in wanted if f not in known]
        assert not unknown, f"{where}: {' '.join(target)} has no flags {unknown}: `{cmd}`"
