"""``python -m tests.hosts setup HOST [--checkout DIR]``: build the host (once) and print ``export VAR=...`` lines
for its tier (``eval "$(python -m tests.hosts setup forge)"``). ``python -m tests.hosts run HOST``: start its full
UI with this repository installed, the tier's tiny model and LoRAs, and wait (Ctrl-C stops it)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .recipes import RECIPES
from .setup import SetupError, setup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.hosts", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("setup", "build a host and print its tier's variables"), ("run", "start a host's full UI")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("host", choices=sorted(RECIPES))
        sub.add_argument("--checkout", type=Path, help="an existing checkout to use instead of the tarball")
        if name == "run":
            sub.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    try:
        host = setup(args.host, args.checkout)
    except SetupError as exc:
        print(f"tests.hosts: {exc}", file=sys.stderr)
        return 2
    if args.command == "setup":
        for var, value in host.env().items():
            print(f"export {var}={shlex.quote(value)}")
        return 0
    from .ui import serve

    return serve(host, args.port)


if __name__ == "__main__":
    sys.exit(main())
