"""``streamtrack run``: options, layered configuration, and how the run is hosted.

Every option that is also a configuration key defaults to "not given", so the
layers (defaults < ``--config`` YAML < ``STREAMTRACK_*`` < command line) can be
merged by :func:`streamtrack.config.load_config`.

Hosting: with ``--publish`` (or ``--show``) the tracker runs in a supervised child
process that is restarted and re-seeded if it dies; otherwise it runs in this
process.  ``--show`` starts a viewer process subscribed to the tracker.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
import threading
from dataclasses import fields
from typing import TYPE_CHECKING

from streamtrack.config import CONFIG_DIR, Config, load_config
from streamtrack.errors import UserError
from streamtrack.models import CHECKPOINT_DIR, MODELS

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from streamtrack.pipeline import RunSummary, Tracker

_KEYS = {f.name for f in fields(Config)}


class _Once(argparse.Action):
    """An option given at most once: argparse would keep the last ``--config`` silently."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice: a run reads one config file (it can set "
                         "every key; the environment and options override it)")
        setattr(namespace, self.dest, values)


_GIVEN = argparse.SUPPRESS  # absent from the namespace unless given on the command line


def _int_or_null(text: str) -> int | None:
    """A number option that can also undo what a config file set: ``null`` (or none)."""
    return None if text.strip().lower() in ("null", "none") else int(text)


def _float_or_null(text: str) -> float | None:
    return None if text.strip().lower() in ("null", "none") else float(text)


_int_or_null.__name__, _float_or_null.__name__ = "int", "float"  # argparse: "invalid int value"
_FLAG = argparse.BooleanOptionalAction  # --no-X undoes a config file's X: true


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    # @FILE reads arguments from a file, one per line: a camera URL with its password
    # stays out of the process list (`ps`), which every local user can read.
    p = sub.add_parser("run", parents=[common], help="track objects in a webcam, RTSP stream or video file",
                       argument_default=_GIVEN, fromfile_prefix_chars="@")
    p.add_argument("source", help="webcam index (0), /dev/videoN, an rtsp(s)://, http(s)://, rtmp(s)://, "
                                  "srt://, udp:// or tcp:// URL, or a file (@FILE: read it, and any "
                                  "other argument, from FILE, one per line)")
    g = p.add_argument_group("configuration")
    g.add_argument("--config", default=None, metavar="FILE|PRESET", action=_Once,
                   help="YAML configuration, or a preset (default, webcam, rtsp, file); it sets any key, "
                        f"also those without an option here ({CONFIG_DIR / 'default.yaml'} lists them "
                        "all, --print-config shows the result)")
    g.add_argument("--print-config", action="store_true", default=False,
                   help="print the merged configuration as YAML and exit")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(MODELS), metavar="NAME",
                   help="SAM 2 model (default sam2.1_hiera_tiny; see `streamtrack models`)")
    g.add_argument("--checkpoint", help=f"official-format .pt (default {CHECKPOINT_DIR}/<model>.pt)")
    g.add_argument("--device", help="auto|cpu|cuda[:N]|mps (default auto)")
    g.add_argument("--image-size", type=_int_or_null, metavar="N",
                   help="model input size, a multiple of 32 from 64 to 2048 (default: the model's 1024)")
    g.add_argument("--preprocess", choices=["auto", "exact", "fast"],
                   help="exact = the official predictor's resize; fast = on-device (default auto: "
                        "exact on a CPU, fast on a GPU)")
    g.add_argument("--lost-after", type=_float_or_null, metavar="S", help="seconds absent before 'lost' (3)")
    g.add_argument("--max-objects", type=_int_or_null, metavar="N",
                   help="objects tracked at once; a prompt for one more is refused (64)")
    g = p.add_argument_group("prompts")
    g.add_argument("--box", action="append", default=None, metavar="x0,y0,x1,y1",
                   help="a new object (repeatable)")
    g.add_argument("--point", action="append", default=None, metavar="x,y[,label]",
                   help="a point of one more object; label 1 = foreground (default), 0 = background")
    g.add_argument("--prompts", default=None, metavar="FILE.json",
                   help="prompts file (boxes, points, masks, later frames)")
    g = p.add_argument_group("source")
    g.add_argument("--max-frames", type=_int_or_null, metavar="N", help="stop after N frames")
    g.add_argument("--realtime", action=_FLAG,
                   help="pace a file at its frame rate, as if live")
    g.add_argument("--loop", action=_FLAG,
                   help="start a file over at its end (demos)")
    g.add_argument("--give-up-after", type=_float_or_null, metavar="S",
                   help="live sources: stop after S seconds of failed reconnects (default: never)")
    g = p.add_argument_group("outputs")
    g.add_argument("--save-jsonl", metavar="FILE", help="write one JSON result per frame (- is stdout)")
    g.add_argument("--save-masks", metavar="DIR", help="write a palette PNG per frame (value = object id)")
    g.add_argument("--save-video", metavar="FILE", help="write an overlay MP4")
    g.add_argument("--publish", metavar="ENDPOINT", help="publish results over ZeroMQ, e.g. tcp://127.0.0.1:5555")
    g.add_argument("--control", metavar="ENDPOINT", help="accept prompts over ZeroMQ, e.g. tcp://127.0.0.1:5556")
    g.add_argument("--publish-frames", action=_FLAG,
                   help="also publish JPEG frames on frames/<stream> (for remote viewers)")
    g.add_argument("--stream", help="stream name used in topics and results (default cam0)")
    g.add_argument("--show", action=_FLAG,
                   help="open a viewer window (masks, latency HUD, clicks)")
    g.add_argument("--max-restarts", type=_int_or_null, metavar="N",
                   help="supervised runs: give up after N restarts of a crashed tracker (default: never)")
    g.add_argument("--hang-timeout", type=_float_or_null, metavar="S",
                   help="supervised runs: kill and restart a tracker that shows no sign of life for "
                        "S seconds (default 300; 0 = never)")
    g.add_argument("--start-timeout", type=_float_or_null, metavar="S",
                   help="supervised runs: kill and restart a tracker that has not started tracking "
                        "(source opened, model loaded and warmed up) after S s (default 900; 0 = never)")
    g = p.add_argument_group("security (CURVE; keys from `streamtrack keys DIR`)")
    g.add_argument("--curve-secret", metavar="FILE",
                   help="encrypt --publish/--control with this server secret key (server.key_secret)")
    g.add_argument("--curve-clients", metavar="DIR",
                   help="folder of authorised client public keys (*.key); others get nothing")
    p.set_defaults(func=command)


def given_options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in _KEYS}


def command(args: argparse.Namespace) -> int:
    from streamtrack import prompts as prompt_io
    from streamtrack.pipeline import RunConfig, Tracker

    cfg = load_config(args.config, given_options(args))
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    prompts = prompt_io.merge(
        prompt_io.from_cli(args.box, args.point),
        prompt_io.load_prompts_file(args.prompts) if args.prompts else {},
    )
    if not prompts and not cfg.control and not cfg.show:
        raise UserError(
            "no prompt given: pass --box x0,y0,x1,y1, --point x,y[,label] or --prompts FILE.json"
            " (or --show to draw a box on the first frame, or --control ENDPOINT to prompt later)"
        )
    viewer = None
    if cfg.show:
        from streamtrack.viewer import check_display

        check_display()  # before the model loads: fail in a second, not after
        cfg.publish = cfg.publish or f"tcp://127.0.0.1:{_free_port()}"
        cfg.control = cfg.control or f"tcp://127.0.0.1:{_free_port()}"
        cfg.publish_frames = True
    read_files = (("the prompts file", args.prompts),) if args.prompts else ()
    run_config = RunConfig.from_config(cfg, args.source, prompts, progress=not args.quiet,
                                       read_files=read_files)
    if run_config.curve is not None:
        run_config.curve.load()  # bad key files fail now, in one line, not after the model load
        if not (cfg.publish or cfg.control):
            log.warning("--curve-secret/--curve-clients secure --publish and --control; this run "
                        "opens neither, so they are not used")
    # A file (not paced) waits on its first frame for the first prompt, from the window or
    # from --control, instead of running to its end with nothing tracked.
    run_config.wait_for_prompt = bool(cfg.show or cfg.control) and not prompts

    if not cfg.publish:
        summary, stopped_by = _run_in_process(Tracker(run_config))
        return _finish(summary, args, "", stopped_by)
    from streamtrack.supervisor import Supervisor, SupervisorConfig, SupervisorGaveUp

    supervisor = Supervisor(run_config, SupervisorConfig(max_restarts=cfg.max_restarts,
                                                         hang_timeout=cfg.hang_timeout,
                                                         start_timeout=cfg.start_timeout))
    supervisor.on_interrupt = _say_stopping
    if cfg.show:
        from streamtrack.viewer import spawn_viewer

        viewer = spawn_viewer(cfg.publish, cfg.control, cfg.stream,
                              curve=run_config.curve.as_client() if run_config.curve else None)
        # Closing the window ends the run, as quitting a player would.
        threading.Thread(target=lambda: (viewer.wait(), supervisor.stop()), daemon=True).start()
    viewer_failed = None
    try:
        summary = supervisor.run()
        # Closed by the user (0) or interrupted with the run: fine. Anything else is a
        # window that failed, which ended the run: not a success.
        if viewer is not None and viewer.poll() not in (None, 0, 129, 130, 143, -signal.SIGHUP,
                                                         -signal.SIGINT, -signal.SIGTERM):
            viewer_failed = viewer.returncode
    except SupervisorGaveUp as e:
        print(f"streamtrack: error: {e}", file=sys.stderr)
        return 1
    finally:
        if viewer is not None and viewer.poll() is None:
            viewer.terminate()
            viewer.wait(timeout=10)
    restarts = f", {supervisor.restarts} restart(s)" if supervisor.restarts else ""
    code = _finish(summary, args, restarts, supervisor.interrupted_by)
    if viewer_failed is not None:
        print(f"streamtrack: error: the viewer window failed (exit {viewer_failed}; its messages are "
              "above), which ended the run", file=sys.stderr)
        # Its stop is no interruption of the user's (130) unless a signal came too.
        return code if supervisor.interrupted_by is not None else 1
    return code


def _say_stopping() -> None:
    with contextlib.suppress(OSError):  # a terminal gone
        print("streamtrack: stopping after the current frame (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)


def _run_in_process(tracker: Tracker) -> tuple[RunSummary, int | None]:
    """Run ``tracker`` here; the first SIGINT or SIGTERM stops it after the frame in
    flight, so every output is flushed whole.  A KeyboardInterrupt at an arbitrary point
    could land inside the capture's or the emitter's locks; a second Ctrl-C still
    interrupts at once (e.g. during a long model load)."""
    from streamtrack.supervisor import install_stop_signals

    stopped_by: list[int] = []

    def stop(signum: int) -> None:
        if stopped_by:
            return
        stopped_by.append(signum)
        tracker.stop()
        if signum == signal.SIGINT:
            _say_stopping()

    restore = install_stop_signals(stop, interrupt_again=True)
    try:
        summary = tracker.run()
    finally:
        restore()
    if stopped_by:
        # Stopped and over: a Ctrl-C pressed again now would only interrupt the exit
        # (its finalizers, torch's) with a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        summary.interrupted = True
    return summary, (stopped_by[0] if stopped_by else None)


def _finish(summary, args: argparse.Namespace, extra: str, stopped_by: int | None = None) -> int:
    """Print the run's summary line; the exit code: 143 if SIGTERM stopped it (129: SIGHUP),
    130 if it was interrupted otherwise, 1 (and one more line) if its source failed, else 0."""
    if not args.quiet:
        with contextlib.suppress(OSError):  # the terminal closed (SIGHUP): nowhere to say it
            print(summary.line() + extra, file=sys.stderr)
    if stopped_by in (signal.SIGTERM, signal.SIGHUP):
        return 128 + stopped_by
    if summary.interrupted:
        return 130
    failure = summary.source_failure(str(args.source))
    if failure is not None:  # e.g. a service manager restarts a camera given up on
        print(f"streamtrack: error: {failure}", file=sys.stderr)
        return 1
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
