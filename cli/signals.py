"""What the command does when it is told to stop: Ctrl-C (SIGINT), `timeout`, schedulers and `docker stop`
(SIGTERM) and a closed terminal (SIGHUP) all stop it the same way.

While `stop_on_signals()` is open, each of those signals raises `Stopped` in the main thread, so every
`with` and `finally` on the way out runs: `atomic_output` removes its temporary file, claims on output
files are released, finished part files stay. The command then prints one sentence and exits with
128 + the signal number (130, 143, 129), also where library code swallowed the exception (a
handler's exception raised inside a library's `try/except`) and the command ran on to its end.
Every signal raises again, so a run whose first stop was swallowed can still be stopped; a second
signal that cuts the clean-up short may leave a temporary folder, which the next run writing the
same output removes (`analyses.files`). A signal that was ignored when the process started
(`nohup`, a background job of a shell script) stays ignored.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """Raised in the main thread when the process receives one of `SIGNALS`."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def exit_status(signum: int) -> int:
    return 128 + signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@contextmanager
def stop_on_signals():
    """Inside the block, `SIGNALS` raise `Stopped` (module docstring); yields the list of signals
    received, so a caller can tell a stop from an error an interrupted import caused. The handlers
    in place before are restored at the end."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signum, frame):
        received.append(signum)
        raise Stopped(signum)

    previous = {number: signal.getsignal(number) for number in SIGNALS}
    for number, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(number, stop)
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
