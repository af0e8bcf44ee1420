"""The README and docs/ stay true.

- Every python block of the README runs as written (in a fresh folder that sees the repo's ``standins/``).
- Every ``mlx-openelm`` command in a shell block (and in inline code) of README.md and docs/*.md names a command
  that exists and only options that its live ``--help`` lists: a renamed option fails here, it does not go stale.
  The commands are never run (most need a hub download).
- The README's command table lists every command and subcommand that ``mlx-openelm --help`` lists.
- Every relative link in README.md and docs/*.md resolves to a file or folder of the repo (an anchor, if any, to a
  heading of the target).
- The quick start is exactly two commands, the ones the CI script runs the tests with.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console", "zsh"}
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
OPTION = r"-{1,2}[A-Za-z0-9][\w-]*"
# The option column of a help line, in typer's rich panels ("│ *  --model  -m  <str>  ...") or click's plain
# layout ("  -m, --model TEXT  ..."): the leading run of option names.
OPTION_COLUMN = re.compile(rf"^[\s│┃|*]*({OPTION}(?:[\s,/]+{OPTION})*)")
CONTROL = {"&&", "||", "|", ";", "&", "(", ")", "|&", ";;"}
REDIRECT = re.compile(r"^\d*(<|>|>>|<<|<<<|&>|>&|<&)$")


def _relative(page: Path) -> str:
    return str(page.relative_to(REPO))


def _blocks(text: str, languages: set[str]) -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in FENCE.findall(text) if lang in languages]


def _section(text: str, title: str) -> str:
    parts = re.split(rf"^## {re.escape(title)}[ \t]*$", text, maxsplit=1, flags=re.M)
    assert len(parts) == 2, f"no '## {title}' section"
    return re.split(r"^## ", parts[1], maxsplit=1, flags=re.M)[0]


def _command_lines(lang: str, body: str) -> list[str]:
    """A shell block's commands, one a line: continuations joined; comments, blank lines, heredoc bodies and (in
    ``console`` blocks) output lines dropped."""
    commands, pending, heredoc_end, continued = [], "", None, False
    for line in body.splitlines():
        if heredoc_end is not None:
            heredoc_end = None if line.strip() == heredoc_end else heredoc_end
            continue
        if lang == "console" and not continued:
            if not line.startswith(("$ ", "% ")):
                continue  # output
            line = line[2:]
        continued = line.rstrip().endswith("\\")
        if continued:
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if marker := re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line):
            heredoc_end = marker.group(1)
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    return commands


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _invocations(line: str) -> list[list[str]]:
    """The arguments after ``mlx-openelm`` (or ``.venv/bin/mlx-openelm``) in each simple command of ``line`` that
    runs it, redirections and their targets removed (``cd mlx-openelm`` runs something else)."""
    found, segment = [], []
    for token in [*_tokens(line), ";"]:
        if token not in CONTROL:
            segment.append(token)
            continue
        program = next((i for i, t in enumerate(segment) if not re.match(r"^\w+=", t)), None)
        # the program itself (`mlx-openelm ...`), or what a launcher runs (`mlx.launch ... -- mlx-openelm ...`)
        at = [i for i, t in enumerate(segment) if Path(t).name == "mlx-openelm" and (i == program or
                                                                                   segment[i - 1] == "--")]
        if at:
            words, skip = [], False
            for t in segment[at[0] + 1:]:
                if skip:
                    skip = False
                elif REDIRECT.match(t):
                    skip = True
                else:
                    words.append(t)
            found.append(words)
        segment = []
    return found


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("mlx-openelm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cli"]


@functools.cache
def _help(path: tuple[str, ...]) -> tuple[int, str]:
    """``mlx-openelm PATH --help``, live: exit code and text (wide, without colour)."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PY_COLORS", "GITHUB_ACTIONS")}
    env.update(COLUMNS="240", TERMINAL_WIDTH="240", NO_COLOR="1", PYTHONIOENCODING="utf-8")
    p = subprocess.run([*_cli(), *path, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return p.returncode, ANSI.sub("", p.stdout + p.stderr)


def _is_group(help_text: str) -> bool:
    usage = next((line for line in help_text.splitlines() if "Usage:" in line), "")
    return "COMMAND" in usage


def _options(help_text: str) -> set[str]:
    names = set()
    for line in help_text.splitlines():
        if m := OPTION_COLUMN.match(line):
            names.update(re.findall(OPTION, m.group(1)))
    return names


def _commands(help_text: str) -> list[str]:
    """The names in a group's Commands panel (rich) or section (plain)."""
    names, inside = [], False
    for line in help_text.splitlines():
        if re.match(r"^[\s╭┌─+-]*Commands\b", line):
            inside = True
        elif inside:
            body = line.strip(" │┃|")
            if not body or line.lstrip().startswith(("╰", "└", "+")):
                break
            if m := re.match(r"^([a-z][\w-]*)(\s{2,}\S|\s*$)", body):
                names.append(m.group(1))
    return names


def _problems(words: list[str]) -> list[str]:
    """What in ``mlx-openelm WORDS`` the live CLI does not have."""
    path: list[str] = []
    rest = list(words)
    code, text = _help(())
    assert code == 0, f"mlx-openelm --help failed:\n{text}"
    problems = []
    while _is_group(text) and rest:
        word = rest.pop(0)
        if word.startswith("-"):
            if word.split("=", 1)[0] not in _options(text):
                problems.append(f"mlx-openelm {' '.join(path)}: no option {word}")
            continue
        code, sub = _help((*path, word))
        if code != 0:
            return [*problems, f"mlx-openelm {' '.join(path)}: no command {word!r}"]
        path.append(word)
        text = sub
    options = _options(text)
    for word in rest:
        if word == "--":
            break
        if word.startswith("-") and word != "-" and not re.match(r"^-\d", word):
            if word.split("=", 1)[0] not in options:
                problems.append(f"mlx-openelm {' '.join(path)}: no option {word} in its --help")
    return problems


def _without_code(text: str) -> str:
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def test_the_python_api_section_runs_as_written(tmp_path):
    # Every python block of the README, in order, as one script; the Python API section must have one.
    readme = README.read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"```python\n(.*?)```", section, re.S), "the Python API section has no python block"
    blocks = [body for _, body in _blocks(readme, {"python", "py"})]
    (tmp_path / "standins").symlink_to(REPO / "standins")
    (tmp_path / "example.py").write_text("\n".join(blocks))
    p = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip(), "the example prints generated text"


@pytest.mark.parametrize("page", [p for p in PAGES if p != README], ids=_relative)
def test_the_docs_python_blocks_compile(page):
    # They are not run (the server example needs a running server), but they must at least parse.
    for _, body in _blocks(page.read_text(), {"python", "py"}):
        compile(body, f"<python block of {_relative(page)}>", "exec")


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_every_mlx_openelm_command_and_option_exists(page):
    text = page.read_text()
    lines = [line for lang, body in _blocks(text, SHELL) for line in _command_lines(lang, body)]
    inline = [span for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)) if "mlx-openelm " in span]
    invocations = [words for line in [*lines, *inline] for words in _invocations(line)]
    if page == README:
        assert len(invocations) >= 10, f"only {len(invocations)} mlx-openelm commands found: is the parser broken?"
    problems = [f"{' '.join(words)}: {p}" for words in invocations for p in _problems(words)]
    assert problems == []


def test_the_command_table_lists_every_command():
    table = _section(README.read_text(), "Commands")
    expected = []
    code, text = _help(())
    commands = _commands(text)
    assert code == 0 and len(commands) >= 5, f"could not read the commands from mlx-openelm --help:\n{text}"
    for name in commands:
        code, sub = _help((name,))
        assert code == 0, sub
        subcommands = _commands(sub) if _is_group(sub) else []
        expected += [f"mlx-openelm {name} {s}" for s in subcommands] or [f"mlx-openelm {name}"]
    missing = [c for c in expected if not re.search(rf"`{re.escape(c)}(\s[^`]*)?`", table)]
    assert missing == [], f"the README's command table lacks {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", FENCE.sub("", page.read_text()), re.M):
        slug = _slug(heading)
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_every_relative_link_resolves(page):
    text = _without_code(page.read_text())
    targets = re.findall(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, re.M)
    broken = []
    for target in targets:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//", target):
            continue  # https:, mailto: ...
        path, _, anchor = target.partition("#")
        resolved = (page.parent / unquote(path)).resolve() if path else page
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and resolved.is_file() and anchor not in _anchors(resolved):
            broken.append(f"{target}: no such heading in {resolved.name}")
    assert broken == []


def test_the_quick_start_is_two_commands_run_from_the_clone():
    section = _section(README.read_text(), "Quick start")
    commands = [line for lang, body in _blocks(section, SHELL) for line in _command_lines(lang, body)]
    assert len(commands) == 2, commands
    first, second = commands
    # 1. installs the package and runs the main job on its no-download default (random weights)
    assert re.search(r"pip install -e \.(\s|$)", first) and "[test]" not in first, first
    assert [w[0] for w in _invocations(first)] == ["bench"] and "--model" not in first, first
    # 2. installs with the test extra and runs the tests, as the CI script does
    assert 'pip install -e ".[test]"' in second and re.search(r"\bpytest\b", second), second
    ci = (REPO / ".ci" / "run").read_text()
    assert 'install --quiet -e ".[test]"' in ci or 'install -e ".[test]"' in ci
    assert re.search(r"/pytest\b", ci)
    # where they run: the clone
    assert "git clone" in section and "root of the clone" in section
