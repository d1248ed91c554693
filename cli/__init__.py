"""`llm-heatmap`: the command line. Each command is a module here with `register(subparsers)`, which
sets `run` on its parser; `run` imports torch and the library only when the command runs. The command
modules themselves are imported inside `main`, once its signal handling is in place, so a stop during
start-up is reported like any other."""

from __future__ import annotations

import sys

try:  # Ctrl-C while this module loads: one line, no traceback
    import argparse
    import signal

    from llm_heatmap.errors import InputError

    from .errors import cli_message
    from .options import add_quiet_option
    from .signals import Stopped, exit_status, signal_name, stop_on_signals
except KeyboardInterrupt:
    print("llm-heatmap: stopped by SIGINT while starting", file=sys.stderr)
    raise SystemExit(130) from None

# Nothing the tool starts reaches the network, or runs a kernel from the hub, unless the user asks: the hub
# libraries read these switches when they are first imported (after this module), so each is set for the run
# unless the environment already sets it (HF_HUB_OFFLINE=0 is how a user asks for a hub download).
# bitsandbytes asks the `kernels` package for a hub CPU kernel when it is imported: HF_HUB_OFFLINE keeps
# `kernels` off the network and KERNELS_CACHE (its cache folder) pointed at nothing leaves it no kernel to load,
# so bitsandbytes runs its own; DISABLE_KERNEL_MAPPING turns off `kernels`' swaps of model layers.
NETWORK_SWITCHES = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_KERNEL_MAPPING": "1",
                    "KERNELS_CACHE": "/dev/null/no-hub-kernels"}

COMMAND_NAMES = ("grid", "render", "metrics", "attribute", "ablate", "generate", "compare", "kv_similarity", "qk_map", "batch", "atlas",
                 "models")


def command_modules() -> list:
    """The command modules, in the order `--help` lists them."""
    from importlib import import_module

    return [import_module(f"{__name__}.{name}") for name in COMMAND_NAMES]


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one sentence (no usage block): a bad flag, a value that is not a number,
    an invalid choice (listing the valid ones)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="llm-heatmap",
        description="Capture every attention head of a transformer and turn it into heatmap grids and metric tables.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    add_quiet_option(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in command_modules():
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit status 0, 2 for bad input (one sentence on stderr), or 128 + the signal
    number when stopped by SIGINT, SIGTERM or SIGHUP (`signals.py`), also where library code swallowed
    the stop and the command ran to its end."""
    import os

    command, args = "llm-heatmap", None
    for name, value in NETWORK_SWITCHES.items():
        os.environ.setdefault(name, value)
    with stop_on_signals() as received:
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            if args.command is None:
                parser.print_help()
                return 2
            command = f"llm-heatmap {args.command}"
            from llm_heatmap.analyses.runs.progress import progress_shown

            from .run import progress_off

            with progress_shown(not progress_off(args)):
                status = args.run(args) or 0
            if received:
                raise Stopped(received[0])
            return status
        except InputError as error:
            if received:  # a stop that surfaced as a refusal (an import or a load it cut short)
                return _stopped(command, received[0])
            if args is not None and args.debug:
                raise
            print(f"{command}: {cli_message(str(error))}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # `llm-heatmap ... | head`: the reader left; the files are complete
            _silence_stdout()
            return 0 if not received else exit_status(received[0])
        except (KeyboardInterrupt, Exception) as error:
            # a signal can surface as another error, e.g. an import it cut short; the stop is what happened
            if not received and not isinstance(error, KeyboardInterrupt):
                from llm_heatmap.models.files import disk_full, is_disk_full

                if not is_disk_full(error) or (args is not None and args.debug):
                    raise
                print(f"{command}: {disk_full(getattr(error, 'filename', None) or 'the output files')}",
                      file=sys.stderr)
                return 2
            return _stopped(command, received[0] if received else signal.SIGINT)


def _stopped(command: str, signum: int) -> int:
    print(f"{command}: stopped by {signal_name(signum)}; no output file was left half-written", file=sys.stderr)
    return exit_status(signum)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's own flush at exit does not fail on the closed pipe
    (Python's documented way to handle SIGPIPE)."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
