"""Every command written in README.md and docs/*.md, found and checked against the real argument parsers.

:func:`commands` reads a markdown text: shell lines in fenced blocks (no language, ``bash``, ``sh``,
``shell``, ``console``) and inline code spans of more than one word, joined over ``\\`` continuations and
open quotes, split at ``|``, ``&&``, ``||`` and ``;``, with ``VAR=value``, ``export``, ``timeout N``,
``nice`` and ``env`` prefixes removed. Commands of other tools (``cog``, ``docker``, ``curl``, …) are left alone.

:func:`problems` judges one command without running it:

* ``make TARGET`` — the Makefile has that target;
* ``python``/``python3`` running a file of this repository or ``-m jsd`` — must be ``.venv/bin/python``
  (after ``make demo`` the bare name is the system Python, which lacks the dependencies); a line that sets
  ``PYTHONPATH`` itself is exempt (an environment prepared by hand);
* ``accelerate``, ``torchrun``, ``pytest`` — must be the venv's (``.venv/bin/…``);
* the file run must exist.

The argument check runs in a separate interpreter (``python tests/doccommands.py`` reads jobs as JSON on
stdin, :func:`check_arguments`): each script or ``-m jsd`` is started with runpy, and its own
``ArgumentParser.parse_args`` parses exactly the documented argument list (then stops the script by an
exception, before it does anything). ``accelerate launch`` and ``torchrun`` are parsed by their own
parsers first, which name the script and its arguments. A command with a placeholder (``…``, ``...`` or a
``$VAR``) is not parsed: each ``--flag`` it shows must be an option of the script's (sub)parser.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import runpy
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
SEPARATORS = {"|", "||", "&&", ";", "&", "(", ")"}
REDIRECTIONS = {">", ">>", "<", "2>", "&>"}
PREFIXES = {"nice", "env", "nohup", "exec", "time"}
PLACEHOLDERS = {"…", "...", "[...]", "[…]"}
VENV_TOOLS = {"accelerate", "torchrun", "pytest"}
PYTHONS = {"python", "python3"}


@dataclass
class Command:
    """One command of a doc: where it is, its words (prefixes removed), and the whole logical line."""

    doc: str
    line: int
    words: list[str]
    text: str


@dataclass
class Invocation:
    """A Python entry point to run with ``argv``: a repo file (``path``) or ``-m module``."""

    command: Command
    path: str | None = None
    module: str | None = None
    argv: list[str] = field(default_factory=list)
    elided: bool = False  # a placeholder in the command: check the flags exist, do not parse
    launcher: str | None = None  # "accelerate" or "torchrun": their own arguments come first


# ------------------------------------------------------------------------------------------------- reading
def logical_lines(markdown: str) -> list[tuple[int, str]]:
    """``(line number, text)`` of every shell line: fenced shell blocks and inline code spans."""
    found: list[tuple[int, str]] = []
    language: str | None = None  # None: outside a fence
    pending: tuple[int, str] | None = None
    for number, line in enumerate(markdown.splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            language = fence.group(2).lower() if language is None else None
            pending = None
            continue
        if language is None:
            # a span of one word names a program (`torchrun`), it does not run it
            found.extend((number, m.group(2)) for m in INLINE_CODE.finditer(line) if " " in m.group(2).strip())
            continue
        if language not in SHELL_LANGUAGES:
            continue
        start, text = pending if pending else (number, "")
        text = f"{text}\n{line}" if pending else line
        if text.rstrip().endswith("\\") or _open_quote(text):
            pending = (start, text.rstrip().removesuffix("\\") if text.rstrip().endswith("\\") else text)
            continue
        pending = None
        found.append((start, text.strip().removeprefix("$ ")))
    return found


def _open_quote(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:
        return True
    return False


def commands(markdown: str, doc: str = "<doc>") -> list[Command]:
    """The commands of a markdown text (see the module docstring)."""
    found = []
    for number, text in logical_lines(markdown):
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            tokens = list(lexer)
        except ValueError:
            continue  # prose in backticks, not shell
        words: list[str] = []
        for token in [*tokens, ";"]:
            if token in SEPARATORS:
                if words := _strip_prefixes(words):
                    found.append(Command(doc, number, words, text))
                words = []
            else:
                words.append(token)
    return found


def _strip_prefixes(words: list[str]) -> list[str]:
    words = _strip_redirections(words)
    while words:
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] in PREFIXES:
            words = words[1:]
        elif words[0] == "timeout" and len(words) > 1:
            words = words[2:]
        elif words[0] == "export":
            return []  # sets variables only
        else:
            break
    return words


def _strip_redirections(words: list[str]) -> list[str]:
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in REDIRECTIONS:
            skip = True
        else:
            out.append(word)
    return out


# ------------------------------------------------------------------------------------------------- judging
def makefile_targets(makefile: Path = REPO / "Makefile") -> set[str]:
    return {m[1] for line in makefile.read_text().splitlines() if (m := re.match(r"^([\w.-]+)\s*:(?!=)", line))}


def invocation(command: Command, repo: Path = REPO) -> tuple[Invocation | None, list[str]]:
    """The Python entry point a command runs (or None) and what is wrong with the command as written."""
    words, where = command.words, f"{command.doc}:{command.line}: `{' '.join(command.words)}`"
    program = words[0]
    tool = program.removeprefix(".venv/bin/")
    if program == "make":
        missing = [t for t in words[1:] if not t.startswith("-") and "=" not in t and t not in makefile_targets()]
        return None, [f"{where}: no make target {t!r}" for t in missing]
    if tool in VENV_TOOLS:
        if program == tool:
            return None, [f"{where}: write `.venv/bin/{tool}` (the bare name is not on PATH after `make demo`)"]
        if tool == "pytest":
            paths = [w.split("::")[0] for w in words[1:] if w.startswith("tests/")]
            return None, [f"{where}: no file {p}" for p in paths if not (repo / p).exists()]
        return _launched(command, tool, words[1:], where)
    if tool not in PYTHONS:
        return None, []
    rest = words[1:]
    if rest[:2] == ["-m", "jsd"]:
        inv = Invocation(command, module="jsd", argv=rest[2:])
    elif rest and rest[0].endswith(".py"):
        inv = Invocation(command, path=rest[0], argv=rest[1:])
    else:
        return None, []  # python -c …, python -m pip …: the standard library, any Python
    errors = []
    if program in PYTHONS and "PYTHONPATH=" not in command.text:
        errors.append(f"{where}: write `.venv/bin/python` (after `make demo`, `{program}` is the system Python)")
    return _finish(inv, where, errors, repo)


def _launched(command: Command, tool: str, args: list[str], where: str) -> tuple[Invocation | None, list[str]]:
    if tool == "accelerate":
        if args[:1] != ["launch"]:
            return None, []
        args = args[1:]
    inv = Invocation(command, launcher=tool, argv=args)
    return _finish(inv, where, [], REPO)


def _finish(inv: Invocation, where: str, errors: list[str], repo: Path) -> tuple[Invocation, list[str]]:
    inv.elided = any(w in PLACEHOLDERS or w.startswith("$") for w in inv.argv)
    inv.argv = [w.strip("[]") if w.startswith("[-") else w for w in inv.argv]  # "[--flag]": optional
    if inv.path is not None and not (repo / inv.path).is_file():
        errors.append(f"{where}: no script {inv.path}")
        return None, errors
    return inv, errors


def problems(markdown: str, doc: str = "<doc>", *, repo: Path = REPO) -> tuple[list[Invocation], list[str]]:
    """The Python entry points of a doc (for :func:`check_arguments`) and every problem found without running."""
    found, errors = [], []
    for command in commands(markdown, doc):
        inv, wrong = invocation(command, repo)
        errors += wrong
        if inv is not None:
            found.append(inv)
    return found, errors


# ------------------------------------------------------------------------------------------------- parsing
class _Parsed(BaseException):  # a BaseException: a script's `except Exception` must not stop it
    """Raised from the patched ``parse_args``: the script's parser accepted the arguments (or was found)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def check_arguments(job: dict) -> str | None:
    """Parse one documented command's arguments with the real parsers; the error text, or None."""
    argv, path, module = list(job["argv"]), job["path"], job["module"]
    if job["launcher"]:
        try:
            path, argv, module = _launcher_split(job["launcher"], argv)
        except _ArgparseExit as err:
            return f"{job['launcher']} rejects its arguments: {err}"
        if module is None and not (REPO / path).is_file():
            return f"no script {path}"
    argv = [w for w in argv if w not in PLACEHOLDERS]
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        if not job["elided"]:
            original(self, args, namespace)
        raise _Parsed(self)

    stderr, stdout = io.StringIO(), io.StringIO()
    argparse.ArgumentParser.parse_args = parse_args
    saved_argv = sys.argv
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            if module:
                sys.argv = [module, *argv]
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                sys.argv = [path, *argv]
                sys.path.insert(0, str((REPO / path).parent))  # as `python FILE` does: its folder first
                try:
                    runpy.run_path(str(REPO / path), run_name="__main__")
                finally:
                    sys.path.remove(str((REPO / path).parent))
        return "the script ended without parsing its arguments"
    except _Parsed as parsed:
        return _unknown_flags(parsed.parser, argv) if job["elided"] else None
    except SystemExit as err:  # argparse: 0 after --help, 2 on a bad argument
        if err.code in (0, None):
            return None
        return (stderr.getvalue().strip().splitlines() or [f"exit status {err.code}"])[-1]
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved_argv


class _ArgparseExit(Exception):
    pass


def _launcher_split(launcher: str, argv: list[str]) -> tuple[str, list[str], str | None]:
    """The script (or, with ``-m``, the module) and its arguments, from accelerate's or torchrun's own parser."""
    if launcher == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        parser = launch_command_parser()
    else:
        from torch.distributed.run import get_args_parser

        parser = get_args_parser()
    values = ["1" if w.startswith("$") else w for w in argv if w not in PLACEHOLDERS]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(values)
    except SystemExit:
        raise _ArgparseExit(stderr.getvalue().strip()) from None
    module = args.training_script if getattr(args, "module", False) else None  # `-m jsd …`: both launchers
    return args.training_script, list(args.training_script_args), module


def _unknown_flags(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """With placeholders: every ``-flag`` shown must be an option of the (sub)parser the command reaches."""
    for word in argv:
        sub = _subparser(parser, word)
        if sub is None:
            break
        parser = sub
    options = {opt for action in parser._actions for opt in action.option_strings}
    unknown = [w.split("=")[0] for w in argv if w.startswith("-") and not _is_number(w)]
    unknown = [w for w in unknown if w not in options]
    return f"unknown option(s) {', '.join(unknown)}" if unknown else None


def _subparser(parser: argparse.ArgumentParser, word: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and word in action.choices:
            return action.choices[word]
    return None


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def job(inv: Invocation) -> dict:
    """What the argument check needs of an invocation, as JSON."""
    data = asdict(inv)
    command = data.pop("command")
    return data | {"where": f"{command['doc']}:{command['line']}: `{' '.join(command['words'])}`"}


if __name__ == "__main__":  # jobs on stdin, {where: error or null} on stdout
    import os

    os.chdir(REPO)  # documented paths are relative to the repository root
    jobs = json.load(sys.stdin)
    results = {}
    for item in jobs:
        try:
            results[item["where"]] = check_arguments(item)
        except Exception as err:  # a script that breaks while being started is a finding too
            results[item["where"]] = f"{type(err).__name__}: {err}"
    sys.stdout.write("\n" + json.dumps(results) + "\n")
