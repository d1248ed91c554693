"""Child processes as a user's terminal starts them."""

from __future__ import annotations

import signal


def default_signals() -> None:
    """`preexec_fn` for a child that a signal test stops: SIGINT, SIGTERM and SIGHUP back to their default
    handling. A test run started in the background (`make test &`, `nohup`) ignores SIGINT or SIGHUP, and
    a child inherits that, so the CLI would rightly keep them ignored and the test would measure nothing."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_DFL)
