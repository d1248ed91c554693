"""Run a command several times in a row while busy processes keep every core loaded: `make test-stress`.

    python tests/stress.py --rounds 3 -- pytest -q tests/test_hostile_processes.py

One busy-looping process per core (os.cpu_count) runs for the whole time and is stopped at the end, also
when a round fails or the run is interrupted. Exits with the first failing round's status.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys


def spin() -> None:
    while True:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    busy = [multiprocessing.Process(target=spin, daemon=True) for _ in range(os.cpu_count() or 1)]
    for process in busy:
        process.start()
    try:
        for round_ in range(1, args.rounds + 1):
            print(f"stress round {round_}/{args.rounds}: {len(busy)} busy processes beside {' '.join(command)}", flush=True)
            status = subprocess.call(command)
            if status != 0:
                print(f"stress round {round_} failed with exit status {status}", file=sys.stderr)
                return status
        return 0
    finally:
        for process in busy:
            process.terminate()
        for process in busy:
            process.join()


if __name__ == "__main__":
    raise SystemExit(main())
