"""Exit codes of every fedgrid command, each with the help text the commands print."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    UNREACHABLE = 3
    REFUSED = 4
    INTERRUPTED = 130


HELP: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.FAILED: "the command ran and failed (the message says why; a job that failed ends here too)",
    ExitCode.BAD_INPUT: "bad input: a project file, kit, job folder or option is wrong; nothing was changed",
    ExitCode.UNREACHABLE: "the server could not be reached: is it running, and are host and port right?",
    ExitCode.REFUSED: "the server refused the request (identity or authorization)",
    ExitCode.INTERRUPTED: "interrupted by the user (Ctrl-C)",
}


def describe() -> str:
    """The exit-code table for --help epilogs."""
    return "exit codes: " + "; ".join(f"{int(code)} {text}" for code, text in HELP.items())
