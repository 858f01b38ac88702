"""The CLI's errors and exit codes: one line for people, one number for scripts.

Every failure ends as a :class:`CliError`: the engine's fault (its ``reason``, ``detail`` and
stable ``key``) or the CLI's own (same three parts; the keys the CLI makes up are listed in
``docs/cli.md``). ``main`` prints :meth:`CliError.line` on stderr and exits with
``exit_code``.
"""

from __future__ import annotations

OK = 0
REFUSED = 1  # the engine (or the CLI on its behalf) refused: its reason, detail and key
USAGE = 2  # bad options or arguments
NOT_FOUND = 3  # no such VM, disk, host, LUN, target
UNREACHABLE = 4  # network, TLS, no answer in time
AUTH = 5  # not logged in, token expired, bad credentials, not allowed

EXIT_CODES = {
    OK: "success",
    REFUSED: "the engine refused (its reason, detail and key are printed)",
    USAGE: "usage error (bad options or arguments)",
    NOT_FOUND: "not found (VM, disk, host, LUN, iSCSI target)",
    UNREACHABLE: "cannot reach the engine (network, TLS, no answer in time)",
    AUTH: "authentication (not logged in, token expired, bad credentials, not allowed)",
}

# 401s that are not about the caller's login (an iSCSI target's CHAP refusal).
_NOT_LOGIN_401 = frozenset({"ACTION_TYPE_FAILED_ISCSI_AUTHENTICATION"})


def exit_code_for(status: int, key: str = "") -> int:
    """The exit code for an engine answer with HTTP ``status`` and fault ``key``."""
    if status == 404:
        return NOT_FOUND
    if status == 403 or (status == 401 and key not in _NOT_LOGIN_401):
        return AUTH
    return REFUSED


class CliError(Exception):
    """A failure to report in one line, with the exit code scripts rely on."""

    def __init__(self, reason: str, detail: str = "", key: str = "", *,
                 exit_code: int = REFUSED, status: int | None = None, hint: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.key = key
        self.exit_code = exit_code
        self.status = status
        self.hint = hint

    def line(self) -> str:
        """``Reason: detail (KEY); hint`` on one line."""
        text = self.reason
        if self.detail:
            text += f": {self.detail}"
        if self.key:
            text += f" ({self.key})"
        if self.hint:
            text += f"; {self.hint}"
        return " ".join(text.split())
