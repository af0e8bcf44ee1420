"""The terminal front-end of ``mlx-openelm chat``: line editing, streamed replies, Ctrl-C and Ctrl-D.

Part of the command line (it prints): slash commands and every line the user sees; the conversation and its cache
live in ``chat.py``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

from .chat import ChatSession, Notice, TurnStats

PROMPT, MORE = ">>> ", "... "
COMMANDS = {  # name -> (argument, help)
    "help": ("", "show this help"),
    "reset": ("", "start a new conversation (the system prompt stays)"),
    "system": ("TEXT", "set the system prompt (no TEXT: remove it)"),
    "save": ("FILE", "save the conversation as JSON"),
    "load": ("FILE", "load a conversation saved with /save"),
    "quit": ("", "leave the chat (also Ctrl-D)"),
}


def history_file() -> Path:
    """Where typed lines are kept between sessions: ``$XDG_STATE_HOME/mlx-openelm/chat_history``."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "mlx-openelm" / "chat_history"


def run_chat(session: ChatSession, *, verbose: bool = False, banner: str = "", **reply_options: Any) -> None:
    """Chat on the terminal until ``/quit``, Ctrl-D or Ctrl-C at an empty prompt.

    When stdin is not a terminal, each input line is one message and only the replies go to stdout (one line
    each); notices and errors go to stderr. ``reply_options`` go to :meth:`ChatSession.reply`.
    """
    interactive = sys.stdin.isatty()
    readline = _start_readline() if interactive else None
    if interactive and banner:
        print(banner)
    try:
        while (line := _read_message(interactive, readline)) is not None:
            try:
                command = parse_command(line)
                if command and command[0] == "quit":
                    break
                if command:
                    _say(run_command(session, *command))
                elif line.strip():
                    _stream(session, message_text(line), verbose, reply_options)
            except (ValueError, OSError) as e:
                _say(f"error: {e}")
    finally:
        if readline:
            _save_history(readline)


def _read_message(interactive: bool, readline: Any) -> str | None:
    """One message (lines ending in ``\\`` continue it); ``None`` means leave."""
    lines: list[str] = []
    while True:
        try:
            line = input(MORE if lines else PROMPT) if interactive else _stdin_line()
        except EOFError:
            if interactive:
                print()
            return "\n".join(lines) if lines else None
        except KeyboardInterrupt:
            # Ctrl-C drops an unfinished message; at an empty prompt it leaves.
            print()
            if lines or (readline and readline.get_line_buffer()):
                lines = []
                continue
            return None
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        return "\n".join([*lines, line])


def _stdin_line() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


def _stream(session: ChatSession, text: str, verbose: bool, reply_options: dict[str, Any]) -> None:
    """Print the reply as it comes. Ctrl-C stops it at the next token; a second Ctrl-C stops it at once."""
    state = {"stop": False, "armed": True}

    def on_sigint(signum: int, frame: Any) -> None:
        if state["stop"] and state["armed"]:
            state["armed"] = False  # raise once, never while the session settles its cache
            raise KeyboardInterrupt
        state["stop"] = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    events = session.reply(text, **reply_options)
    try:
        for event in events:
            if isinstance(event, Notice):
                _say(event.text)
            else:
                sys.stdout.write(event)
                sys.stdout.flush()
            if state["stop"]:
                break
    except KeyboardInterrupt:
        pass
    finally:
        state["armed"] = False
        events.close()
        signal.signal(signal.SIGINT, previous)
    print(flush=True)
    turn = session.last_turn
    if turn and turn.finish_reason == "interrupted":
        _say("[interrupted: the reply so far is kept]")
    if verbose and turn:
        _say(format_stats(turn))


def format_stats(turn: TurnStats) -> str:
    """The ``--verbose`` line of a turn."""
    speculative = "" if turn.acceptance_rate is None else (
        f", {100 * turn.acceptance_rate:.0f}% of drafted tokens accepted, {turn.tokens_per_pass:.2f} tokens per pass")
    return (
        f"[prefilled {turn.prefilled} of {turn.prompt_tokens} prompt tokens ({turn.reused} from cache) at "
        f"{turn.prompt_tps:.1f} tok/s; generated {turn.generation_tokens} tokens at {turn.generation_tps:.1f} tok/s "
        f"({turn.finish_reason}){speculative}; peak memory {turn.peak_memory:.3f} GB]"
    )


def _say(text: str) -> None:
    sys.stdout.flush()
    print(text, file=sys.stderr, flush=True)


def _start_readline() -> Any:
    try:
        import readline
    except ImportError:  # no GNU readline (some Python builds): plain input() still works
        return None
    readline.set_history_length(1000)
    try:
        readline.read_history_file(history_file())
    except OSError:
        pass
    return readline


def _save_history(readline: Any) -> None:
    # Written beside the target and renamed, so an interrupted exit never leaves a truncated history.
    path = history_file()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def parse_command(line: str) -> tuple[str, str] | None:
    """``"/save a.json"`` -> ``("save", "a.json")``; ``None`` for a message (``//text`` sends ``/text``).

    Raises ``ValueError`` for an unknown command or a missing argument.
    """
    if not line.startswith("/") or line.startswith("//"):
        return None
    name, _, arg = line[1:].strip().partition(" ")
    name, arg = name.lower(), arg.strip()
    if name not in COMMANDS:
        raise ValueError(f"unknown command /{name}: type /help for the list")
    takes = COMMANDS[name][0]
    if takes == "FILE" and not arg:
        raise ValueError(f"/{name} needs a file name, e.g. /{name} chat.json")
    if not takes and arg:
        raise ValueError(f"/{name} takes no argument")
    return name, arg


def message_text(line: str) -> str:
    """The message a non-command input line sends (``//`` escapes a leading slash)."""
    return line[1:] if line.startswith("//") else line


def help_text() -> str:
    """The list of slash commands and input keys, one per line."""
    rows = [(f"/{name} {arg}".rstrip(), about) for name, (arg, about) in COMMANDS.items()]
    rows += [("line ending in \\", "continue the message on the next line"), ("Ctrl-C", "stop the reply")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {left.ljust(width)}  {about}" for left, about in rows)


def run_command(session: ChatSession, name: str, arg: str = "") -> str:
    """Run a slash command (from :func:`parse_command`) other than ``quit``; returns the line to show."""
    if name == "help":
        return help_text()
    if name == "reset":
        session.reset()
        return "new conversation"
    if name == "system":
        session.set_system(arg or None)
        return "system prompt set" if arg else "system prompt removed"
    if name == "save":
        return f"saved {len(session.messages)} messages to {session.save(arg)}"
    if name == "load":
        session.load(arg)
        return f"loaded {len(session.messages)} messages from {arg}"
    raise ValueError(f"unknown command /{name}: type /help for the list")
