"""Emitting tracked frames -- RLE, publishing, result files -- off the engine's thread.

The tracker hands each tracked frame to an emitter (its result without the masks
encoded, the boolean masks, the image) and goes on to the next frame.  Two emitters,
the same results on the wire and on disk:

* :class:`ThreadEmitter` (``emit: thread``, the default): a worker thread in the
  tracker's process.
* :class:`ProcessEmitter` (``emit: process``): a child process (``python -m
  streamtrack.emitter``) fed over a ZeroMQ PAIR socket (ipc).  It owns the publish
  socket and the files; the tracker's status events and stats travel through it too, in
  order with the results.  Where a step is mostly Python (a GPU launching kernels) and
  frames come faster than the engine steps, a thread in the tracker's process waits for
  the interpreter lock at every hand-off, up to the 5 ms switch interval: the process
  takes that wait out of capture->publish latency, for ~0.3-0.5 ms of the tracker's
  time per frame to hand the masks over.  At a live camera's pace the tracker idles
  between frames with the lock free, and the thread is the faster (figures in
  docs/benchmarks.md).

Either way the tracker learns when a result went out (``on_published``: the result it
submitted, with ``t.publish`` filled in), which feeds its latency statistics: at once from the thread,
in batches of a few frames from the process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from streamtrack import childproc
from streamtrack.curve import CurveServer
from streamtrack.errors import HelperProcessError, ReaderGone, UserError, file_name
from streamtrack.overlay import Annotation, annotate
from streamtrack.protocol import FrameResult, Stats, StatusEvent, encode_mask, now
from streamtrack.publisher import Publisher, status_event

EMIT_MODES = ("thread", "process")

OnPublished = Callable[[FrameResult], None]


@dataclass(frozen=True)
class OutputsConfig:
    """Where a stream's results go: its publish endpoint and result files."""

    stream: str = "cam0"
    publish: str | None = None
    save_jsonl: str | None = None
    save_masks: str | None = None
    save_video: str | None = None
    publish_frames: bool = False  # JPEG previews on frames/<stream>
    restarts: int = 0  # a restarted tracker's mask PNGs replace the dead one's quietly
    video_part: int = 1  # 1: NAME.mp4; n: NAME.partn.mp4 (a restarted tracker's)
    # Frames up to this id are in earlier parts: a file's frames processed again after a
    # restart go to the JSONL again, not to the video.
    video_through: int = -1
    # Results of this run are in the files already (a restart after some were written):
    # the JSONL is appended to instead of replaced.
    continued: bool = False
    curve: CurveServer | None = None
    # The source file's declared frame rate: the video's until two frames' pts give one
    # (a one-frame video would otherwise say 30 fps).
    fps: float | None = None

    @property
    def needs_image(self) -> bool:
        return bool(self.save_video or self.publish_frames)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> OutputsConfig:
        d = json.loads(text)
        curve = d.pop("curve")
        return cls(**d, curve=CurveServer(**curve) if curve else None)


def video_part_path(path: str | Path, part: int) -> Path:
    """Where part ``part`` of ``--save-video PATH`` goes: PATH itself, then NAME.part2.EXT, ..."""
    path = Path(path)
    return path if part == 1 else path.with_name(f"{path.stem}.part{part}{path.suffix}")


def earlier_video_parts(path: str | Path) -> list[Path]:
    """The NAME.partN.EXT files (N >= 2) next to ``--save-video PATH``."""
    path = Path(path)
    pattern = re.compile(re.escape(path.stem) + r"\.part([2-9]|[1-9][0-9]+)" + re.escape(path.suffix))
    try:
        return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file())
    except OSError:  # no folder yet: nothing earlier
        return []


def with_rle(result: FrameResult, masks: Sequence[np.ndarray]) -> FrameResult:
    """``result`` with each object's mask as COCO RLE (masks in ``result.objects``' order)."""
    objects = tuple(replace(o, rle=encode_mask(m)) for o, m in zip(result.objects, masks, strict=True))
    return replace(result, objects=objects)


class Outputs:
    """A stream's publisher and writers; ``emit`` sends one frame's result to all of them."""

    def __init__(self, cfg: OutputsConfig):
        from streamtrack.outputs import JsonlWriter, MaskPngWriter, VideoWriter

        self.config = cfg
        self.publisher: Publisher | None = None
        self.jsonl = self.masks = self.video = None
        try:
            if cfg.save_jsonl:
                self.jsonl = JsonlWriter(cfg.save_jsonl, append=cfg.continued)
            if cfg.save_masks:
                self.masks = MaskPngWriter(cfg.save_masks, warn_earlier=not cfg.restarts)
            if cfg.save_video:
                file_name(cfg.save_video, "--save-video")  # before Path() drops a final "/"
                # An MP4 cannot be appended to: each restart writes the next part.
                path = video_part_path(cfg.save_video, cfg.video_part)
                # The first part replaces an earlier run's parts too: left, they would pass
                # for this run's.
                stale = earlier_video_parts(cfg.save_video) if cfg.video_part == 1 else []
                self.video = VideoWriter(str(path), **({"fps": cfg.fps} if cfg.fps else {}), replaces=stale)
            if cfg.publish:
                self.publisher = Publisher(cfg.publish, stream=cfg.stream, curve=cfg.curve)
        except BaseException:
            self.close()
            raise

    def emit(self, result: FrameResult, masks: Sequence[np.ndarray], image: np.ndarray | None) -> FrameResult:
        """RLE-encode, publish and write one frame; returns what was published."""
        result = with_rle(result, masks)
        if self.publisher is not None:
            if self.config.publish_frames and image is not None:
                self.publisher.publish_frame(result.frame_id, image)
            result = self.publisher.publish_result(result)
        else:
            result = result.with_timestamps(publish=now())
        if self.jsonl is not None:
            self.jsonl.write(result)
        if self.masks is not None:
            by_id = {o.obj_id: m for o, m in zip(result.objects, masks, strict=True)}
            self.masks.write(result.frame_id, by_id, (result.height, result.width))
        if self.video is not None and image is not None and result.frame_id > self.config.video_through:
            self.video.write(annotate(image, [
                Annotation(o.obj_id, m, o.bbox, o.score) for o, m in zip(result.objects, masks, strict=True)
            ]), result.pts)
        return result

    def close(self) -> None:
        failed = None
        for w in (self.jsonl, self.masks, self.video, self.publisher):
            if w is not None:
                try:
                    w.close()
                except Exception as e:  # noqa: BLE001 - the others still close (the port is freed)
                    failed = failed or e
        if failed is not None:
            raise failed


@dataclass(frozen=True)
class _StatusAfter:
    kind: str
    data: dict[str, Any]


class ThreadEmitter:
    """Emits on a worker thread, in order.  The queue is short, so a slow disk slows the
    tracker rather than building a backlog; the first error stops the emitting and is
    raised on the tracker's thread (``submit``/``check``)."""

    def __init__(self, cfg: OutputsConfig, on_published: OnPublished, depth: int = 2):
        self.outputs = Outputs(cfg)
        self.publisher = self.outputs.publisher
        self._on_published = on_published
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="emit", daemon=True)
        self._thread.start()

    def submit(self, result: FrameResult, masks: Sequence[np.ndarray], image: np.ndarray | None) -> None:
        self.check()
        self._queue.put((result, masks, image))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def publish_status_after_results(self, kind: str, **data: Any) -> None:
        """A status event published after every result submitted so far (the publisher's
        own ``publish_status`` is called at once, from any thread)."""
        if self.publisher is not None and not self._closed:
            self._queue.put(_StatusAfter(kind, data))

    def close(self) -> None:
        """Emit everything submitted, then close the outputs (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self.outputs.close()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, _StatusAfter):
                with contextlib.suppress(Exception):  # a status is news, not an output to fail on
                    self.publisher.publish_status(item.kind, **item.data)
                continue
            if self.error is None:  # after a failure keep draining, so submit never blocks
                try:
                    result = item[0]
                    published = self.outputs.emit(*item)
                    self._on_published(result.with_timestamps(publish=published.t.publish))
                except BaseException as exc:
                    self.error = exc


class EmitterError(HelperProcessError):
    """The emit process failed (a write error, or it died)."""


class ProcessEmitter:
    """Emits in a child process; the tracker's side of it.  Thread-safe for the
    publisher calls (the capture thread publishes status events); ``submit``,
    ``check`` and ``close`` belong to the tracker's thread."""

    START_TIMEOUT = 60.0
    CLOSE_TIMEOUT = 120.0  # the child flushes the files (an MP4's last frames) first

    def __init__(self, cfg: OutputsConfig, on_published: OnPublished, depth: int = 2):
        self.config = cfg
        self._on_published = on_published
        self._pending: dict[int, FrameResult] = {}
        # A Ctrl-C in a send may cut a message between two parts: the child would read the
        # next message as the rest of it, so nothing more goes over the channel.
        self._torn = False
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._closed = False
        self._dir = childproc.private_dir("streamtrack-emit-")
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PAIR)
        self._sock.setsockopt(zmq.SNDHWM, depth)
        self._sock.setsockopt(zmq.LINGER, 0)
        endpoint = f"ipc://{self._dir}/emit"
        self._proc: subprocess.Popen | None = None
        self._leftovers: weakref.finalize | None = None
        try:
            self._sock.bind(endpoint)
            self._proc = childproc.spawn("streamtrack.emitter", endpoint, cfg.to_json())
            # Not closed by exit (a second Ctrl-C cut the tracker's cleanup short): the
            # child still closes its files, and the socket folder goes.
            self._leftovers = weakref.finalize(self, childproc.end, self._proc, self._dir)
            info = self._wait_for(b"ready", self.START_TIMEOUT)
        except BaseException:
            self._shut(kill=True)
            raise
        self.publisher = _RemotePublisher(self, info["publish"], cfg.stream) if info["publish"] else None

    # ----------------------------------------------------------- tracker thread
    def submit(self, result: FrameResult, masks: Sequence[np.ndarray], image: np.ndarray | None) -> None:
        # Each frame: an acknowledgement is what a supervisor resumes after, and one left
        # unread when the tracker is killed is a frame written twice (the check for none
        # waiting is a socket option read).
        self._drain()
        self.check()
        masks = [np.ascontiguousarray(m, dtype=bool) for m in masks]
        send_image = image is not None and self.config.needs_image
        header = {"result": result.to_dict(), "masks": [m.shape for m in masks],
                  "image": list(image.shape) if send_image else None}
        parts: list[Any] = [b"result", json.dumps(header).encode(), *masks]
        if send_image:
            parts.append(np.ascontiguousarray(image))
        self._send(parts)
        # Pending once sent: a Ctrl-C in the send (waiting on a child that is behind) left
        # a result that never went out, and close() waited CLOSE_TIMEOUT for its
        # acknowledgement.  (Its acknowledgement is read on this thread, never before this.)
        self._pending[result.seq] = result

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        if not self._closed and self._proc.poll() is not None:
            self.error = EmitterError(childproc.exited("emit", self._proc, "exited unexpectedly"))
            raise self.error

    def close(self) -> None:
        """Emit everything submitted, close the outputs in the child, then stop it (idempotent)."""
        if self._closed:
            return
        try:
            if self._torn:  # the child closes its outputs on the exit signal instead (a second Ctrl-C)
                if self._proc.poll() is None:
                    self._proc.send_signal(childproc.EXIT_SIGNAL)
                return
            # The last results' acknowledgements carry their publish times (the run's
            # latency statistics): wait for them before closing the child.
            deadline = time.monotonic() + self.CLOSE_TIMEOUT
            while (self._pending and self.error is None and self._proc.poll() is None
                   and time.monotonic() < deadline):  # after an error the child acknowledges nothing
                self._drain(100, until=b"published")
            if self._proc.poll() is None:
                self._send([b"close"])
                self._wait_for(b"closed", self.CLOSE_TIMEOUT)
        except BaseException as exc:
            if self.error is None:
                self.error = exc if isinstance(exc, EmitterError) else EmitterError(str(exc))
        finally:
            self._closed = True
            self._shut(kill=False)

    # ----------------------------------------------------------------- plumbing
    def _send(self, parts: list[Any]) -> None:
        """Send, waiting while the child is behind (the backpressure a full queue gives
        the thread emitter) but never on a dead child."""
        with self._lock:  # the socket is closed under it too
            if self._sock.closed:
                raise UserError("publisher is closed")
            if self._torn:
                raise EmitterError("the emit channel was cut by an interrupt")
            # Copied, not zero-copy: measured the same for 720p masks, and pyzmq's
            # zero-copy frees buffers from a thread of its own (one more for the GIL).
            if not childproc.send(self._sock, parts, self._proc, on_cut=self._cut):
                raise EmitterError(childproc.exited("emit", self._proc))

    def _drain(self, timeout_ms: int = 0, until: bytes | None = None) -> dict | None:
        """Handle the child's messages; returns ``until``'s payload when it arrives."""
        while True:
            with self._lock:
                if self._sock.closed:
                    return None
                # EVENTS is a cheap check; poll() builds a poller, worth it only to wait.
                ready = (self._sock.poll(timeout_ms, zmq.POLLIN) if timeout_ms
                         else self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)
                if not ready:
                    return None
                kind, payload = self._sock.recv_multipart()
            info = json.loads(payload) if payload else {}
            if kind == b"published":
                result = self._pending.pop(info["seq"], None)
                if result is not None and self.error is None:
                    try:
                        self._on_published(result.with_timestamps(publish=info["publish"]))
                    except BaseException as exc:
                        self.error = exc
            elif kind == b"error" and self.error is None:
                # A user error in the child (a file it cannot write) stays one: one line, exit 2.
                cls = ReaderGone if info.get("gone") else UserError if info.get("user") else EmitterError
                self.error = cls(info["message"])
            elif kind == b"failed":  # the child could not start its outputs
                cls = UserError if info.get("user") else EmitterError
                raise cls(info["message"])
            if kind == until:
                return info

    def _wait_for(self, kind: bytes, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self._drain(100, until=kind)
            if info is not None:
                return info
            if self._proc.poll() is not None:
                info = self._drain(0, until=kind)  # it may have said so just before exiting
                if info is not None:
                    return info
                raise EmitterError(childproc.exited("emit", self._proc))
        raise EmitterError(f"the emit process did not answer within {timeout:g} s")

    def _cut(self) -> None:
        self._torn = True

    def _shut(self, kill: bool) -> None:
        childproc.stop(self._proc, kill)
        if self._leftovers is not None:
            self._leftovers.detach()
        with self._lock:
            self._sock.close(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    def publish_status_after_results(self, kind: str, **data: Any) -> None:
        """A status event published after every result submitted so far (the emit
        channel keeps everything in order), timed when the child publishes it: after the
        results queued ahead of it, as the thread emitter's (after a failed write too: the
        "stopped" event of a run whose reader went away)."""
        if self.publisher is not None and not self._closed:
            with contextlib.suppress(EmitterError, OSError):  # news, not an output to fail on
                self._send([b"status_after", json.dumps({"kind": kind, "data": data}).encode()])


class _RemotePublisher:
    """The tracker's handle on the child's publisher: status events, stats and
    preview frames go through the emit channel, in order with the results."""

    def __init__(self, emitter: ProcessEmitter, endpoint: str, stream: str):
        self._emitter = emitter
        self.endpoint = endpoint
        self.stream = stream

    def publish_status(self, event: StatusEvent | str, data: dict | None = None,
                       **fields: Any) -> StatusEvent:
        event = status_event(self.stream, event, data, fields, now)
        self._emitter._send([b"status", event.to_json().encode()])
        return event

    def publish_stats(self, stats: Stats) -> None:
        self._emitter._send([b"stats", stats.to_json().encode()])

    def publish_frame(self, frame_id: int, rgb: np.ndarray) -> bool:
        img = np.ascontiguousarray(rgb)
        self._emitter._send([b"frame", json.dumps({"frame_id": frame_id, "shape": img.shape}).encode(), img])
        return True


def check_emit_mode(mode: str) -> str:
    if mode not in EMIT_MODES:
        raise UserError(f"emit must be one of {', '.join(EMIT_MODES)}, got {mode!r}")
    return mode


def make_emitter(mode: str, cfg: OutputsConfig, on_published: OnPublished) -> ThreadEmitter | ProcessEmitter:
    check_emit_mode(mode)
    return (ProcessEmitter if mode == "process" else ThreadEmitter)(cfg, on_published)


# --------------------------------------------------------------------- the child
def _child(endpoint: str, config_json: str, parent_pid: int) -> int:
    # A tracker that dies without closing us (killed by its supervisor, a crash): stop at
    # once, closing the files and freeing the publish endpoint for its successor.
    if not childproc.become_child(parent_pid):
        return 0
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(endpoint)

    def tell(kind: bytes, info: dict | None = None) -> None:
        childproc.tell(sock, kind, info)

    try:
        outputs = Outputs(OutputsConfig.from_json(config_json))
    except UserError as exc:
        tell(b"failed", {"message": str(exc), "user": True})
        return 2
    except Exception as exc:  # noqa: BLE001 - reported to the tracker, which raises it
        tell(b"failed", {"message": f"{type(exc).__name__}: {exc}", "user": False})
        return 1
    tell(b"ready", {"publish": outputs.publisher.endpoint if outputs.publisher else None})
    failed = False
    try:
        while True:
            if not sock.poll(500, zmq.POLLIN):
                if childproc.parent_gone(parent_pid):
                    return 0  # the tracker died without closing us: nobody to emit for
                continue
            parts = sock.recv_multipart(copy=False)
            kind = parts[0].bytes
            if kind == b"close":
                break
            if failed and kind == b"result":
                continue  # keep reading so the tracker never blocks; it raises the error
            try:
                _handle(outputs, kind, parts, tell)
            except Exception as exc:  # noqa: BLE001
                if not failed:  # the first error is the one the tracker raises
                    failed = True
                    tell(b"error", _error_info(exc))
    finally:
        childproc.closing_outputs = True
        if childproc.parent_gone(parent_pid):  # no exit signal to come: the deadline now
            childproc.close_deadline()
        try:
            outputs.close()
        except Exception as exc:  # noqa: BLE001
            if not failed:
                tell(b"error", _error_info(exc))
    tell(b"closed")
    return 0


def _error_info(exc: Exception) -> dict[str, Any]:
    """What the tracker needs to raise the child's error again as the same kind of error."""
    user = isinstance(exc, UserError)
    return {"message": str(exc) if user else f"{type(exc).__name__}: {exc}", "user": user,
            "gone": isinstance(exc, ReaderGone)}


def _handle(outputs: Outputs, kind: bytes, parts: list, tell: Callable[[bytes, dict], None]) -> None:
    if kind == b"result":
        header = json.loads(parts[1].bytes)
        result = FrameResult.from_dict(header["result"], validate_masks=False)
        n = len(header["masks"])
        masks = [np.frombuffer(p.buffer, dtype=bool).reshape(shape)
                 for p, shape in zip(parts[2:2 + n], header["masks"], strict=True)]
        image = None
        if header["image"] is not None:
            image = np.frombuffer(parts[2 + n].buffer, dtype=np.uint8).reshape(header["image"])
        published = outputs.emit(result, masks, image)
        tell(b"published", {"seq": published.seq, "publish": published.t.publish})
    elif outputs.publisher is None:
        return
    elif kind == b"status":
        outputs.publisher.publish_status(StatusEvent.from_json(parts[1].bytes))
    elif kind == b"status_after":
        info = json.loads(parts[1].bytes)
        outputs.publisher.publish_status(info["kind"], info["data"])
    elif kind == b"stats":
        outputs.publisher.publish_stats(Stats.from_json(parts[1].bytes))
    elif kind == b"frame":
        info = json.loads(parts[1].bytes)
        image = np.frombuffer(parts[2].buffer, dtype=np.uint8).reshape(info["shape"])
        outputs.publisher.publish_frame(info["frame_id"], image)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="streamtrack emit: %(message)s")
    sys.exit(_child(sys.argv[1], sys.argv[2], int(sys.argv[3])))
