"""The real ``mlx-openelm chat`` command, driven in a pseudo-terminal as a user would; asserts on what is seen.

The tiny random model echoes the last prompt token, so its replies are runs of ":" (the cue the test template
ends with) and it never ends a reply by itself: the words are noise, the structure is what is checked.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from spm_util import train_spm
from tiny import tiny_args

from mlx_openelm import random_model, save
from mlx_openelm.tokenizer import Tokenizer

CLI = str(Path(sys.executable).with_name("mlx-openelm"))
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>:{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>:{% endif %}"
)
STATS = re.compile(r"\[prefilled (\d+) of (\d+) prompt tokens \((\d+) from cache\) at [\d.]+ tok/s; "
                   r"generated (\d+) tokens at [\d.]+ tok/s \((\w+)\); peak memory [\d.]+ GB\]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    spm_path = train_spm(root / "spm")
    args = tiny_args(vocab_size=Tokenizer.from_file(spm_path).vocab_size, max_context_length=8192)
    path = save(random_model(args, dtype="float32"), root / "model")
    (path / "tokenizer.model").write_bytes(spm_path.read_bytes())
    (path / "chat.jinja").write_text(TEMPLATE)
    return path


def spawn(model_dir: Path, tmp_path: Path, *options: str):
    """``mlx-openelm chat`` in a terminal, followed by ``stty -a`` to show the state it leaves the terminal in."""
    pexpect = pytest.importorskip("pexpect")
    argv = [CLI, "chat", "-m", str(model_dir), "--chat-template", str(model_dir / "chat.jinja"), "-v", *options]
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TERM": "xterm"}
    shell = f"trap : INT; {shlex.join(argv)}; echo exit=$?; stty -a"  # the shell outlives Ctrl-C
    child = pexpect.spawn("sh", ["-c", shell], env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))
    child.expect_exact("/help for commands, Ctrl-D to leave")
    child.expect_exact(">>> ")
    return child


def turn(child, line: str) -> tuple[str, dict[str, int | str]]:
    """Send a message; return the reply as shown and the ``--verbose`` figures."""
    child.sendline(line)
    child.expect(STATS)
    prefilled, prompt, reused, generated, reason = child.match.groups()
    reply = child.before.split(line, 1)[-1].strip() if line else ""
    child.expect_exact(">>> ")
    return reply, {"prefilled": int(prefilled), "prompt": int(prompt), "reused": int(reused),
                   "generated": int(generated), "reason": reason}


def command(child, line: str, expect: str) -> None:
    child.sendline(line)
    child.expect_exact(expect)
    child.expect_exact(">>> ")


def assert_left_cleanly(child) -> None:
    child.expect_exact("exit=0")
    child.expect(pytest.importorskip("pexpect").EOF)
    settings = child.before.split()
    assert "icanon" in settings and "echo" in settings  # readline gave the terminal back as it found it


def test_two_turns_reset_save_load_and_bad_input(model_dir, tmp_path):
    saved = tmp_path / "chat.json"
    child = spawn(model_dir, tmp_path, "-n", "24", "--system", "Be brief.")
    reply1, t1 = turn(child, "Hello world!")
    assert reply1.startswith(":") and t1["prefilled"] == t1["prompt"] and t1["generated"] == 24
    _, t2 = turn(child, "Numbers 1234567890?")
    # All of turn 1 is reused, but perhaps its last token, which the model had not been fed yet.
    assert t1["prompt"] + t1["generated"] - 1 <= t2["reused"] and t2["prefilled"] < t2["prompt"] // 2

    child.sendline("for i in range(10): \\")  # a trailing backslash continues the message
    child.expect_exact("... ")
    _, t3 = turn(child, 'print(i * 2, end=" ")')
    child.send("\x1b[200~pasted line\nand another\x1b[201~")  # a bracketed paste of two lines is one message
    turn(child, "")
    command(child, f"/save {saved}", f"saved 9 messages to {saved}")
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * 4
    assert messages[5]["content"] == 'for i in range(10): \nprint(i * 2, end=" ")'
    assert messages[7]["content"] == "pasted line\nand another"
    assert messages[2]["content"] == reply1

    command(child, "/reset", "new conversation")
    _, t4 = turn(child, "Hello world!")
    assert t4["prompt"] == t1["prompt"] and 0 < t4["reused"] < t4["prompt"]  # only the system prompt was kept
    command(child, f"/load {saved}", f"loaded 9 messages from {saved}")
    _, t5 = turn(child, "And again?")
    assert t5["prompt"] > t3["prompt"] + t3["generated"]  # the whole loaded conversation is in the prompt

    command(child, "/bogus", "error: unknown command /bogus: type /help for the list")
    command(child, f"/load {tmp_path / 'missing.json'}", "error: no such file")
    command(child, "/help", "/save FILE")
    child.sendintr()  # Ctrl-C at an empty prompt leaves
    assert_left_cleanly(child)
    history = (tmp_path / "state" / "mlx-openelm" / "chat_history").read_text()
    assert "Numbers 1234567890?" in history and "/reset" in history  # kept for the next session's up-arrow


def test_ctrl_c_stops_the_reply_keeps_it_and_ctrl_d_leaves(model_dir, tmp_path):
    saved = tmp_path / "chat.json"
    child = spawn(model_dir, tmp_path, "-n", "8000")
    child.send("half-typed")
    child.expect_exact("half-typed")  # readline has it (Ctrl-C flushes what the terminal has not passed on yet)
    child.sendintr()  # Ctrl-C on a line being typed drops the line, not the chat
    child.expect_exact(">>> ")
    child.sendline("Hello world!")
    child.expect_exact("::::::::")
    child.sendintr()
    child.expect_exact("[interrupted: the reply so far is kept]")
    child.expect(STATS)
    prompt, generated = int(child.match.group(2)), int(child.match.group(4))
    assert child.match.group(5) == "interrupted" and 8 <= generated < 8000
    child.expect_exact(">>> ")
    command(child, f"/save {saved}", "saved 2 messages")
    kept = json.loads(saved.read_text())["messages"][1]["content"]
    assert kept.startswith("::::::::") and len(kept) <= generated + 1

    child.sendline("Go on.")
    child.expect_exact("::::")
    child.sendintr()
    child.expect(STATS)
    assert int(child.match.group(3)) == prompt + generated  # the kept reply is still in the cache
    child.expect_exact(">>> ")
    child.sendeof()
    assert_left_cleanly(child)


def test_piped_stdin_gives_one_reply_line_per_message(model_dir, tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    argv = [CLI, "chat", "-m", str(model_dir), "--chat-template", str(model_dir / "chat.jinja"), "-n", "5"]
    done = subprocess.run(argv, input="Hello world!\n/bogus\nNumbers?\n", capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0
    assert done.stdout.splitlines() == [":" * 5, ":" * 5]
    assert done.stderr.strip() == "error: unknown command /bogus: type /help for the list"

    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    done = subprocess.run([*argv[:5], str(tmp_path / "bad.jinja")], input="Hi\n", capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert re.fullmatch(r"error: bad chat template in \S+bad.jinja: line \d+: .+\n", done.stderr)
