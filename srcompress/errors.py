"""User-facing errors: one line that names the problem and the fix."""

from __future__ import annotations


class SrcompressError(Exception):
    """An error caused by the user's input or request; the CLI prints it on one line.

    ``exit_code`` 2 means bad input, 3 means the request could not be met (target missed, no-op).
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(".")
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.problem if not self.fix else f"{self.problem}; {self.fix}"
        return " ".join(text.split())


class TargetNotMet(SrcompressError):
    """Pruning ran but did not reach the request (or changed nothing)."""

    exit_code = 3
