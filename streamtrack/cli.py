"""Command line: ``streamtrack <command>``.

User errors (bad input, config, checkpoint, offline download) print one line on
stderr and exit with code 2; runtime failures exit with 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

from streamtrack import __version__, cli_fleet, cli_run, curve
from streamtrack.errors import (
    HelperProcessError,
    UserError,
    discard_output,
    dump_stacks_on_usr1,
    exists,
    same_file,
    stdout_dash,
)
from streamtrack.models import CHECKPOINT_DIR, DEFAULT_MODEL, MODELS, checkpoint_path, get_spec
from streamtrack.tracking import COMPILE_MODES

log = logging.getLogger("streamtrack")
SILENCE_HINT_S = 5.0  # subscribe: say it is still waiting after this long without a message


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: a download removes its .part file


_TERMINATED = threading.Event()


def _interrupt_on_sigterm(signum, frame) -> None:
    """SIGTERM stops a benchmark as Ctrl-C does (its tracker after the frame in flight, its
    helper processes, its temporary folder with a random checkpoint of ~150 MB removed),
    and the exit code says SIGTERM (143)."""
    _TERMINATED.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def _on_sigterm(handler) -> Iterator[None]:
    """``handler`` for SIGTERM while a command runs (signals reach the main thread only),
    then the caller's own handling again (main() called as a library)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _TERMINATED.clear()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cmd_download(args: argparse.Namespace) -> int:
    with _on_sigterm(_stop_on_sigterm):
        return _download(args)


def _download(args: argparse.Namespace) -> int:
    from streamtrack.download import download_checkpoint

    names = list(MODELS) if args.model == "all" else [args.model]
    if args.url is not None and not args.url.strip():  # an unset shell variable
        raise UserError("--url: empty (give the checkpoint's URL, or leave --url out for the official one)")
    if args.url and len(names) > 1:
        raise UserError("--url names one file: download one model with it, not 'all'")
    for name in names:
        had = not args.force and get_spec(name).default_path().exists()
        path = download_checkpoint(name, force=args.force, url=args.url, progress=not args.quiet)
        # A file in place is verified and kept, not fetched again: say so, since a --url
        # given to replace it would otherwise go unheard.
        kept = f" (already there and verified; --force fetches it again{' from --url' if args.url else ''})"
        print(f"{name}: {path}{kept if had else ''}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    for spec in MODELS.values():
        path = spec.default_path()
        have = "no"
        if exists(path, "checkpoint"):
            if path.is_dir():
                have = f"no (a directory is in its place: {path})"  # not "incomplete?": download refuses it
            else:
                # A copy cut short shows in its size (checking every file would load each model).
                size = path.stat().st_size / 2**20
                have = "yes" if size >= 0.95 * spec.size_mb else \
                    f"incomplete? ({size:.0f} of ~{spec.size_mb} MB)"
        print(f"{spec.name:24} {spec.config:40} {spec.size_mb:5d} MB  downloaded: {have}")
    return 0


def _cmd_subscribe(args: argparse.Namespace) -> int:
    import json
    import time

    from streamtrack.curve import client_from_args
    from streamtrack.protocol import cross_process_endpoint
    from streamtrack.subscriber import Subscriber

    if args.count is not None and args.count < 1:
        raise UserError(f"--count must be >= 1, got {args.count}")
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        raise UserError(f"--timeout must be a finite number of seconds > 0 (leave it out to wait "
                        f"for ever), got {args.timeout}")
    printed = 0
    client_keys = client_from_args(args)
    if args.fleet:
        from streamtrack.fleet_directory import fleet_address

        subscriber = Subscriber.from_fleet(fleet_address(args.endpoint), topics=args.topics,
                                           curve=client_keys)
    else:
        if str(args.endpoint).strip().startswith("inproc://"):  # (not a fleet's directory file)
            cross_process_endpoint(args.endpoint)
        subscriber = Subscriber(args.endpoint, topics=args.topics, curve=client_keys)
    why = (" (if it uses CURVE: is this client's key authorised there?)" if client_keys
           else " (if it uses CURVE, pass --curve-server-key and --curve-secret)")
    with subscriber as sub:
        last = time.monotonic()
        hinted = False
        while args.count is None or printed < args.count:
            msg = sub.recv(timeout=0.25)
            if msg is None:
                silent = time.monotonic() - last
                if args.timeout is not None and silent >= args.timeout:
                    print(f"streamtrack: no message for {args.timeout:g} s from {args.endpoint}{why}",
                          file=sys.stderr)
                    return 1
                if silent >= SILENCE_HINT_S and not hinted and not args.quiet:
                    # Waiting is right for a subscriber, but a silent terminal looks like a hang.
                    hinted = True
                    print(f"streamtrack: nothing from {args.endpoint} in {SILENCE_HINT_S:g} s, still "
                          "waiting: is a tracker running there, with a source and objects to track?",
                          file=sys.stderr)
                continue
            last, hinted = time.monotonic(), False
            # A reader gone (`| head`) raises BrokenPipeError here: main() ends the command.
            print(json.dumps(_message_json(msg, args.rle), separators=(",", ":")), flush=True)
            printed += 1
    return 0


def _message_json(msg, rle: bool) -> dict:
    """One received message as a JSON-ready dict: the topic, then its payload."""
    import json

    out: dict = {"topic": msg.topic}
    if msg.result is not None:
        d = msg.result.to_dict()
        if not rle:  # the counts are most of the bytes and useless on a terminal
            for o in d["objects"]:
                if o.get("rle"):
                    o["rle"] = {"size": o["rle"]["size"]}
        if msg.skipped:
            out["skipped"] = msg.skipped
        out.update(d)
    elif msg.status is not None:
        out.update(msg.status.to_dict())
    elif msg.stats is not None:
        out.update(msg.stats.to_dict())
    elif msg.frame is not None:
        out.update(json.loads(msg.frame.to_json()), jpeg_bytes=len(msg.jpeg or b""))
    return out


def _cmd_bench(args: argparse.Namespace) -> int:
    from streamtrack import bench, bench_stream

    bench_stream.apply_defaults(args)  # per-benchmark defaults for the shared options
    with _on_sigterm(_interrupt_on_sigterm):
        return bench.main(args)


def _cmd_segment(args: argparse.Namespace) -> int:
    from streamtrack import segment as seg

    args.save_rle = stdout_dash(args.save_rle)
    image = seg.load_image(args.image)
    objects = seg.prompts_from_args(args.box, args.point, args.prompts)
    seg.check_prompts(objects, *image.shape[:2])  # fail on a bad prompt before building the model
    # The outputs too: a mistyped path should not cost a model run, nor any file the user has.
    outputs = seg.check_output_paths(args.out, args.save_masks, args.save_rle, [p.obj_id for p in objects])
    if args.checkpoint is not None and not args.checkpoint.strip():  # an unset shell variable
        raise UserError("--checkpoint: empty path")
    checkpoint = checkpoint_path(args.model, args.checkpoint)
    inputs = [("the input image", args.image), ("the model's checkpoint", checkpoint),
              ("the prompts file", args.prompts)]
    for i, (what, path) in enumerate(outputs):
        for name, read in inputs:
            if read is not None and same_file(path, read):
                raise UserError(f"{what} {path} is {name}, which it would overwrite: write elsewhere")
        for other, other_path in outputs[i + 1:]:
            if same_file(path, other_path):
                raise UserError(f"{what} {path} and {other} {other_path} are the same file: "
                                "give each output its own path")
    seg.warn_earlier_masks(args.save_masks, [p.obj_id for p in objects])
    segmenter = seg.Segmenter(args.model, args.checkpoint, args.device, args.image_size)
    results = segmenter.segment(image, objects, multimask=args.multimask)
    masks = None if args.save_masks is None else os.path.join(args.save_masks, "")  # always a folder here
    # An output written to stdout (--save-rle /dev/stdout | jq) keeps it to itself; asked
    # before the files are written, which replace a file stdout may be redirected to.
    scores_to = sys.stderr if any(_is_stdout(path) for _, path in outputs) else sys.stdout
    # The files first: a reader of stdout that has gone (`| head`) must not cost them.
    seg.save_outputs(args.out, image, results, objects, masks=masks, rle=args.save_rle)
    if args.quiet:
        return 0
    try:
        for r in results:
            print(seg.format_scores(r), file=scores_to, flush=True)
    except BrokenPipeError:
        discard_output(scores_to)  # the reader is done: the files are written
    return 0


def _is_stdout(path) -> bool:
    """Whether ``path`` is where stdout goes (/dev/stdout, or the file it is redirected to)."""
    try:
        out, written = os.fstat(sys.stdout.fileno()), os.stat(path)
    except (OSError, ValueError):  # no stdout (closed, or not a real file)
        return False
    return (out.st_dev, out.st_ino) == (written.st_dev, written.st_ino)


def _add_model_options(p: argparse.ArgumentParser, image_size_default: str = "the model's 1024",
                       checkpoint_default: str = f"{CHECKPOINT_DIR}/<model>.pt") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODELS), metavar="NAME",
                   help=f"SAM 2 model (default {DEFAULT_MODEL}; see `streamtrack models`)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help=f"official-format .pt (default {checkpoint_default})")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda[:N]|mps (default auto)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help=f"model input size, a multiple of 32 from 64 to 2048 (default: {image_size_default})")


class _OneLineErrors(argparse.ArgumentParser):
    """A mistyped option is one line, as every other error is (argparse prints the whole
    usage block first: 14 lines for `run`); the subcommands' parsers are of this class too."""

    def error(self, message: str):
        if message.startswith("[Errno") and "] " in message:  # an @FILE of arguments it could not read
            message = "cannot read the @FILE of arguments: " + message.split("] ", 1)[1]
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog="streamtrack",
        description="Real-time object tracking on live video with SAM 2.",
    )
    parser.add_argument("--version", action="version", version=f"streamtrack {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # -v/-q after the command too (`streamtrack run ... -q`); SUPPRESS keeps a value
    # given before the command from being reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors")

    p = sub.add_parser(
        "download", parents=[common], help=f"download an official SAM 2 checkpoint into {CHECKPOINT_DIR}")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"model name or 'all' (default {DEFAULT_MODEL})")
    p.add_argument("--force", action="store_true", help="download even if the file exists")
    p.add_argument("--url", help="download from this URL instead of the official one")
    p.set_defaults(func=_cmd_download)

    cli_run.add_parser(sub, common)
    cli_fleet.add_parser(sub, common)

    p = sub.add_parser(
        "subscribe", parents=[common], help="print one JSON line per message of a running tracker")
    p.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5555",
                   help="publisher endpoint (default tcp://127.0.0.1:5555), or a fleet's directory file "
                        "(fleet.json: all its streams)")
    p.add_argument("--fleet", action="store_true",
                   help="ENDPOINT is a fleet's control endpoint (fleet.control, e.g. tcp://head:41003): "
                        "subscribe to all its streams, without its directory file (from another machine)")
    p.add_argument("--topics", nargs="+", default=["masks/", "status/", "stats/"], metavar="PREFIX",
                   help="topic prefixes (default masks/ status/ stats/; frames/ for JPEG headers)")
    p.add_argument("--rle", action="store_true", help="include the masks' RLE counts")
    p.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="exit with code 1 after S seconds without a message")
    curve.add_client_options(p)
    p.set_defaults(func=_cmd_subscribe)

    p = sub.add_parser(
        "bench", parents=[common], help="benchmarks, each against a baseline measured in the same run")
    p.add_argument("what", choices=["engine", "preprocess", "pipeline", "latency", "memory", "multistream"],
                   help="engine: streaming engine vs the official predictor; "
                        "preprocess: how far 'fast' preprocessing moves masks from 'exact'; "
                        "pipeline: tracker fps (file -> capture -> engine -> ZeroMQ) vs the bare engine; "
                        "latency: capture->publish latency of a paced source vs the engine step; "
                        "memory: RSS and state over a long stream vs the official predictor; "
                        "multistream: streams on one model with a batched encoder vs one after another")
    # Small inputs by default, so each benchmark runs in minutes on a CPU; GPU figures use 1024.
    _add_model_options(p, "engine, preprocess, multistream 256; pipeline, latency 128; memory 64",
                       "seeded random weights: speed does not depend on them")
    p.add_argument("--frames", type=int, default=None, metavar="N",
                   help="frames per run (default 24; pipeline, latency 60; memory 2000; multistream 12)")
    p.add_argument("--objects", type=int, nargs="+", default=None, metavar="N",
                   help="object counts (default 1 4; pipeline, latency, memory, multistream: one count, "
                        "default 1)")
    p.add_argument("--state-frames", type=int, nargs="*", default=[50, 500], metavar="N",
                   help="engine: report engine state bytes after these frames (default 50 500)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="engine, pipeline, latency: torch.compile the image encoder and the per-frame step "
                        "(compiled at warm-up, before timing)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None, metavar="MODE",
                   help="with --compile (implied): torch.compile's mode, one of "
                        f"{', '.join(COMPILE_MODES)}; reduce-overhead replays CUDA graphs")
    p.add_argument("--compile-slots", type=int, default=4, metavar="N",
                   help="with --compile: warm-up compiles object batches of 1, 2, 4 ... up to N (default 4)")
    p.add_argument("--emit", choices=["thread", "process"], default="thread",
                   help="pipeline, latency: the tracker's RLE, publishing and files on a thread (default) "
                        "or in a process of their own")
    p.add_argument("--decode", choices=["thread", "process"], default="thread",
                   help="pipeline, latency: the tracker's source decoded on a thread (default) "
                        "or in a process of its own")
    p.add_argument("--official-vos-optimized", action="store_true",
                   help="engine: baseline is sam2's compiled SAM2VideoPredictorVOS (CUDA)")
    p.add_argument("--official-vos-mode", choices=COMPILE_MODES, default=None, metavar="MODE",
                   help="engine, with --official-vos-optimized: compile its components in MODE instead "
                        "of sam2's max-autotune, whose autotuning can take many minutes "
                        "(reduce-overhead: the same CUDA graphs without it)")
    p.add_argument("--launch-ahead", action="store_true",
                   help="engine: also time the engine launching frame f+1 before finishing frame f "
                        "(the device works on the next frame while the host builds this one's output); "
                        "pipeline, latency: the tracker does so with a frame waiting (launch_ahead)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4], metavar="N",
                   help="multistream: stream counts (default 1 2 4)")
    p.add_argument("--processes", action="store_true",
                   help="multistream: also run each stream in its own process (own model copy)")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="timed runs per side, median reported (default 1)")
    p.add_argument("--preprocess", default="auto", choices=["auto", "exact", "fast"],
                   help="engine preprocessing (auto: exact on CPU, fast on CUDA)")
    p.add_argument("--frame-size", default=None, metavar="WxH",
                   help="synthetic clip size (engine, pipeline, latency, multistream 320x240; memory 128x96)")
    p.add_argument("--warmup", type=int, default=5, metavar="N",
                   help="pipeline, latency: untimed first frames (default 5)")
    p.add_argument("--fps", type=float, default=None,
                   help="latency: source frame rate (default: the larger of 30 and 3x the engine's rate)")
    p.add_argument("--queue-depth", type=int, default=None, metavar="N",
                   help="latency: live queue depth (default 2)")
    p.add_argument("--clip-frames", type=int, default=None, metavar="N",
                   help="latency, memory: length of the looped clip (default 60, 50)")
    p.add_argument("--early-frame", type=int, default=200, metavar="N",
                   help="memory: first sample; growth is measured from here to --frames (default 200)")
    p.add_argument("--official-frames", type=int, nargs="*", default=[50, 100, 200], metavar="N",
                   help="memory: official predictor samples (default 50 100 200; none to skip)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "segment", parents=[common], help="segment objects in one image (SAM 2 image predictor)")
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    _add_model_options(p)
    p.add_argument("--box", action="append", metavar="x0,y0,x1,y1",
                   help="an object (repeatable); one --box with --point = one object prompted by both")
    p.add_argument("--point", action="append", metavar="x,y[,label]",
                   help="a point; all points are one object; label 1 = foreground (default), 0 = background")
    p.add_argument("--prompts", metavar="FILE.json",
                   help="prompts file; each entry is an object (frame ignored)")
    p.add_argument("--multimask", action="store_true",
                   help="3 candidate masks per object; prints their scores")
    p.add_argument("--out", metavar="OUT.png",
                   help="write the overlay image here (one of --out, --save-masks, --save-rle is needed)")
    p.add_argument("--save-masks", metavar="DIR", help="write DIR/object_<id>.png (0/255) per object")
    p.add_argument("--save-rle", metavar="FILE.json",
                   help="write each object's mask as COCO RLE with score (predicted IoU), bbox "
                        "[x0,y0,x1,y1] and area (README: segment's outputs); - is stdout")
    p.set_defaults(func=_cmd_segment)

    def _cmd_view(args: argparse.Namespace) -> int:
        from streamtrack import viewer  # lazy: loads OpenCV's GUI only for this command

        return viewer.main(args)

    p = sub.add_parser(
        "view", parents=[common], help="live window of a tracker: masks, latency HUD, click to prompt",
        description="A live window of a running tracker. The picture comes from the tracker's "
                    "frames/ topic: run it with --publish-frames (--show does), or the masks are "
                    "drawn on a blank canvas.")
    p.add_argument("endpoint", help="publisher endpoint, e.g. tcp://127.0.0.1:5555, or a fleet's directory "
                                    "file (fleet.json) with --stream")
    p.add_argument("--control", metavar="ENDPOINT",
                   help="tracker control endpoint; clicks become prompts (without it: view only; a fleet "
                        "stream's own by default)")
    p.add_argument("--stream", help="stream to show (default: the first one seen; a fleet's only stream)")
    p.add_argument("--fleet", action="store_true",
                   help="ENDPOINT is a fleet's control endpoint (fleet.control): view --stream of that fleet")
    p.add_argument("--max-size", default="1280x720", metavar="WxH",
                   help="largest window image; the frame is scaled to fit (default 1280x720)")
    p.add_argument("--screenshots", default=".", metavar="DIR", help="where `s` saves PNGs (default .)")
    p.add_argument("--control-timeout", type=float, default=2.0, metavar="S",
                   help="seconds to wait for a control reply (default 2; a tracker replies after its "
                        "frame in hand, so raise it for one that takes seconds per frame)")
    curve.add_client_options(p)
    p.set_defaults(func=_cmd_view)

    curve.add_parser(sub, common)

    p = sub.add_parser(
        "models", parents=[common], help="list the models streamtrack knows")
    p.set_defaults(func=_cmd_models)
    return parser


def _join_negative_coordinates(argv: list[str]) -> list[str]:
    """``--box -10,5,60,80`` as ``--box=-10,5,60,80``: argparse takes a value starting with
    '-' for an option and says only "expected one argument"; the prompt's own check then
    says what is wrong with it (a coordinate outside the frame)."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--box", "--point") and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """The ``streamtrack`` command.  Its own stdout failing is no traceback: a reader that
    went away (``| head``) ends it quietly (0), a full disk is one line (1), and a command
    that failed, or dealt with the error itself, keeps its own exit code.  Left to
    Python, the flush at exit prints "Exception ignored" (a traceback unbuffered) and
    exits 120."""
    _standard_streams_open()
    stdout = sys.stdout = _Watched(sys.stdout)
    code: int | None = None
    exiting: SystemExit | None = None  # argparse's --help and --version swallow a write that failed
    try:
        try:
            code = _main(argv)
        except SystemExit as e:
            exiting = e
        except OSError as e:
            if e is not stdout.error:
                raise  # else code stays None: the command ended on stdout failing
        with contextlib.suppress(OSError):
            stdout.flush()
    finally:
        if sys.stdout is stdout:
            sys.stdout = stdout.stream
    if stdout.error is None:
        if exiting is not None:
            raise exiting
        return code
    with contextlib.suppress(OSError, ValueError):
        discard_output(stdout)
    if code:
        return code
    if stdout.error.errno == errno.EPIPE:
        return 0
    with contextlib.suppress(OSError):
        print(f"streamtrack: error: cannot write to stdout: {stdout.error.strerror}", file=sys.stderr,
              flush=True)
    return 1


class _Watched:
    """A text stream that keeps the error its last write or flush raised (so main() tells
    stdout's own failures from an error of the same kind anywhere else)."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.error: OSError | None = None

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _standard_streams_open() -> None:
    """Give a closed stdin, stdout or stderr (``2>&-``) /dev/null: else the next file this
    process opens takes descriptor 2 and gets whatever a library writes to stderr (FFmpeg,
    libzmq), and Python has no ``sys.stderr`` to print an error to."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            # The lowest free descriptor: this one (the ones below are open); inherited, so
            # child processes (the tracker, FFmpeg's) start with it open too.
            os.set_inheritable(os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY), True)
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))  # noqa: SIM115


def _main(argv: list[str] | None) -> int:
    dump_stacks_on_usr1()
    parser = build_parser()
    args = parser.parse_args(_join_negative_coordinates(sys.argv[1:] if argv is None else argv))
    level = logging.ERROR if args.quiet else (logging.DEBUG if args.verbose > 1 else
                                              logging.INFO if args.verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"streamtrack: error: {e}", file=sys.stderr)
        return 2
    except HelperProcessError as e:
        print(f"streamtrack: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("streamtrack: " + ("terminated" if _TERMINATED.is_set() else "interrupted"), file=sys.stderr)
        return 143 if _TERMINATED.is_set() else 130
    except (OSError, RuntimeError) as e:
        what = _out_of_resources(e)
        if what is None:
            raise
        print(f"streamtrack: error: {what}", file=sys.stderr)
        return 1


def _out_of_resources(e: BaseException) -> str | None:
    """The line for a limit of this machine or process reached (not a bug to report)."""
    if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return f"too many open files (this process may open {soft}: raise it with `ulimit -n`)"
    if isinstance(e, OSError) and e.errno in (errno.EAGAIN, errno.ENOMEM) and e.filename is None:
        return f"cannot start a process or thread: {e.strerror} (the process limit, `ulimit -u`, or memory)"
    if isinstance(e, RuntimeError) and str(e) == "can't start new thread":
        return "cannot start a thread (the process limit, `ulimit -u`, or memory)"
    return None


if __name__ == "__main__":
    raise SystemExit(main())
