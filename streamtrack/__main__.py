"""``python -m streamtrack`` and the ``streamtrack`` command."""

import sys


def main() -> int:
    try:
        from streamtrack.cli import main as run_cli  # torch and sam2 load here: a second or two

        return run_cli()
    except KeyboardInterrupt:  # Ctrl-C that early is still an answer, not a traceback
        print("streamtrack: interrupted", file=sys.stderr)
        return 130
    except ImportError as exc:  # a package not installed, at start-up (pyzmq) or in a command
        from streamtrack.errors import missing_dependency  # (cv2 for segment): one line

        message = missing_dependency(exc)
        if message is None:
            raise
        print(f"streamtrack: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
