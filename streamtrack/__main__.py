"""``python -m streamtrack`` and the ``streamtrack`` command."""

import sys


def main() -> int:
    try:
        from streamtrack.cli import main as run_cli  # torch and sam2 load here: a second or two
    except KeyboardInterrupt:  # Ctrl-C that early is still an answer, not a traceback
        print("streamtrack: interrupted", file=sys.stderr)
        return 130
    return run_cli()


if __name__ == "__main__":
    raise SystemExit(main())
