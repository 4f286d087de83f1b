"""``streamtrack fleet FLEET.yaml``: run many streams as Ray actors (see docs/scaling.md).

The whole file is validated before Ray is touched, so a bad file costs a second
and one line on stderr (exit 2).  Exit codes afterwards: 0 every stream ended
normally, 1 a stream failed, 130/143/129 stopped by SIGINT/SIGTERM/SIGHUP.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("fleet", parents=[common], help="run many streams as Ray actors (one driver)")
    p.add_argument("file", metavar="FLEET.yaml", help="fleet file: streams and fleet options")
    p.add_argument("--address", help="Ray cluster address (overrides fleet.address; default: a local Ray)")
    p.add_argument("--directory", metavar="FILE.json",
                   help="where to write the endpoint directory (overrides fleet.directory)")
    p.add_argument("--check", action="store_true", help="validate the file, list its streams and exit")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from streamtrack.fleet_spec import load_fleet
    from streamtrack.sources import redact_url

    spec = load_fleet(args.file)
    overrides = {k: v for k, v in (("address", args.address), ("directory", args.directory)) if v}
    if overrides:
        spec.options = dataclasses.replace(spec.options, **overrides)
    if args.check:
        for s in spec.streams:
            prompts = sum(len(v) for v in s.prompts.values())
            print(f"{s.name}: {redact_url(str(s.source))} ({s.config.model}, "
                  f"image size {s.config.image_size or 'default'}, {prompts} prompt(s)"
                  f"{', prompt later' if s.prompt_later else ''})")
        return 0
    from streamtrack.fleet import Fleet, require_ray

    require_ray()  # one line if Ray is not installed, before anything starts
    fleet = Fleet(spec)
    if not args.quiet:
        threading.Thread(target=_announce, args=(fleet,), name="announce", daemon=True).start()
    summary = fleet.run()
    if not args.quiet:
        for name, s in summary.streams.items():
            extra = f", {s['restarts']} restart(s)" if s["restarts"] else ""
            err = f": {s['error']}" if s["error"] else ""
            print(f"{name}: {s['state']}, {s['frames']} frames{extra}{err}", file=sys.stderr)
    if summary.interrupted_by in (signal.SIGTERM, signal.SIGHUP):
        return 128 + summary.interrupted_by
    if summary.interrupted_by is not None:
        return 130
    return 1 if summary.failed else 0


def _announce(fleet) -> None:
    """Once the fleet runs: where clients find its streams (the run blocks the main thread)."""
    if not fleet.wait_started():
        return
    directory = fleet.options.directory
    control = f"control {fleet.control_endpoint}" if fleet.control_endpoint else "no control endpoint"
    print(f"fleet: {len(fleet.streams)} stream(s) on Ray {fleet.options.address or '(local)'}; directory "
          f"{directory}, {control}; watch them with `streamtrack subscribe {directory}`", file=sys.stderr)
