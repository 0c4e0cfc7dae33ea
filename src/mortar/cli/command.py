"""The command table of the `mortar` CLI: GlusterFS-style word commands (`volume create ...`).

Each command is a sequence of words, a synopsis, a one-line summary, and a function that takes the
remaining arguments and returns a `Result` (text for people, a dict for `--json`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class CliError(Exception):
    """A user-facing failure: printed as one line on stderr, exit status non-zero."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Result:
    text: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """Global options every command sees."""

    json: bool = False
    remote_host: str | None = None


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    synopsis: str
    summary: str
    run: Callable[[list[str], Context], Result]
    details: str = ""

    def help(self) -> str:
        text = f"usage: mortar {self.synopsis}\n\n{self.summary}\n"
        return text + (f"\n{self.details.strip()}\n" if self.details else "")


COMMANDS: list[Command] = []


def command(words: str, synopsis: str, summary: str, details: str = "") -> Callable[
    [Callable[[list[str], Context], Result]], Callable[[list[str], Context], Result]
]:
    """Register a function as the command `words` (space separated)."""

    def register(fn: Callable[[list[str], Context], Result]) -> Callable[[list[str], Context], Result]:
        COMMANDS.append(Command(tuple(words.split()), synopsis, summary, fn, details))
        return fn

    return register


def find(tokens: list[str]) -> tuple[Command | None, list[str]]:
    """The command whose words are the longest prefix of `tokens`, and the arguments after them."""
    best: Command | None = None
    for cmd in COMMANDS:
        n = len(cmd.words)
        if tuple(tokens[:n]) == cmd.words and (best is None or n > len(best.words)):
            best = cmd
    if best is None:
        return None, tokens
    return best, tokens[len(best.words) :]


def expect(args: list[str], count: int, synopsis: str) -> list[str]:
    """Exactly `count` positional arguments, or a usage error."""
    if len(args) != count:
        raise CliError(f"usage: mortar {synopsis}", status=2)
    return args
