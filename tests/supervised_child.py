"""A child program for tests/test_supervisor.py: ``python -m tests.supervised_child MODE [ARG]``.

- ``echo``: print the payload read from stdin, then exit 0;
- ``exit N``: print a line, then exit with code N;
- ``sleep``: print "sleeping" and sleep until killed;
- ``stubborn``: like ``sleep``, ignoring SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import time

from fastgen.supervisor import read_payload


def main() -> int:
    mode = sys.argv[1]
    if mode == "echo":
        print(f"payload: {read_payload().decode()}", flush=True)
        return 0
    if mode == "exit":
        print(f"giving up with {sys.argv[2]}", flush=True)
        return int(sys.argv[2])
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("sleeping", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
