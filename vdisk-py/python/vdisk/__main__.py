"""The ``vdisk`` command, installed on ``PATH`` with the package (also ``python -m vdisk``).

It runs the same code as the standalone ``vdisk`` binary, inside this process: the arguments,
output, exit statuses and messages are the binary's.
"""

from __future__ import annotations

import signal
import sys

from ._vdisk import cli_main


def main() -> None:
    """Run ``vdisk`` with this process's arguments and exit with its status."""
    # Behave like a native program: SIGINT ends a command at once unless the command handles it
    # (convert stops between work items and exits 130); Python would otherwise only set a flag.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(cli_main(["vdisk", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
