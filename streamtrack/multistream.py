"""Several streams on one model: the image encoder batched across streams.

The image encoder is most of SAM 2's per-frame cost, and on a GPU one forward
pass over N frames costs far less than N passes.  Each stream keeps its own
``StreamingEngine`` (its own memory bank, objects and frame numbering) on its
own thread; they share one model and one :class:`SharedImageEncoder`, which
collects the frames the engines submit and runs them through the encoder as
one batch.  Memory attention, mask decoding and memory encoding stay per
stream (their memory frames never line up across streams) but run on the
thread that led the batch, one stream after another: capture, publishing and
file output stay on the streams' own threads.

Batching trades a little latency for throughput: an engine waits at most
``max_wait`` seconds for the other streams' frames.  A stream whose source
stalls only costs the others that wait.

:class:`StreamGroup` runs several ``streamtrack run`` configurations this way in
one process (the fleet's actors use it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from streamtrack.compiled import slot_count
from streamtrack.engine import StreamingEngine
from streamtrack.models import build_model, resolve_device
from streamtrack.pipeline import RunConfig, RunSummary, Tracker

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: 'req in pending' must not compare requests' contents
class _Request:
    member: object
    prepare: Callable[[], torch.Tensor]  # -> (1, 3, S, S), the preprocessed frame
    finish: Callable[[torch.Tensor, dict], Any] | None  # (image, its backbone output) -> result
    done: threading.Event = field(default_factory=threading.Event)
    image: torch.Tensor | None = None
    result: Any = None
    error: BaseException | None = None


class SharedImageEncoder:
    """Runs ``model.forward_image`` once for the frames several engines submit together.

    Thread-safe.  Engines call :meth:`run` from their own threads; the first caller
    to find the batch complete (every member has submitted) or the wait expired
    leads it: on its own thread it prepares every member's frame, runs one encoder
    pass, and runs each member's ``finish`` (the rest of its step) with its slice of
    the outputs, while the other callers wait.  One batch runs at a time.  On a GPU,
    where a step is mostly Python launching kernels, this keeps the model work on one
    thread at a time instead of several threads trading the interpreter lock op by op.
    """

    def __init__(self, model: torch.nn.Module, max_wait: float = 0.01, max_batch: int = 16,
                 pad_batches: bool | None = None):
        self.model = model
        self.max_wait = max_wait
        self.max_batch = max_batch
        # A compiled encoder has static shapes: pad each batch to a power of two (1, 2, 4 ...)
        # so a stream joining or pausing never triggers a recompile on a live frame.
        if pad_batches is None:
            pad_batches = getattr(model, "streamtrack_compiled", False)
        self.pad_batches = pad_batches
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._active: set = set()  # members with a frame in flight or expected
        self._running = threading.Lock()  # one batch at a time
        self.batches = 0  # forward passes run (for inspection and benchmarks)
        self.frames = 0  # frames encoded

    def idle(self, member: object) -> None:
        """``member`` has no frame to encode for now (no objects, or it stopped):
        batches stop waiting for it until it submits again."""
        with self._cond:
            self._active.discard(member)
            self._cond.notify_all()

    @property
    def active(self) -> int:
        return len(self._active)

    def encode(self, image: torch.Tensor, member: object = None) -> dict:
        """The backbone output for ``image`` (batch of one), as ``model.forward_image`` gives it."""
        return self.run(member, prepare=lambda: image)

    def run(self, member: object, prepare: Callable[[], torch.Tensor],
            finish: Callable[[torch.Tensor, dict], Any] | None = None) -> Any:
        """``finish(image, backbone_output)`` for the frame ``prepare()`` makes, its encoder
        pass batched with other members'; without ``finish``, the backbone output.  Both
        callables may run on another member's thread.  Their errors reach this caller."""
        req = _Request(member, prepare, finish)
        with self._cond:
            self._active.add(member)
            self._pending.append(req)
            self._cond.notify_all()
            deadline = time.monotonic() + self.max_wait
            while not req.done.is_set():
                full = len(self._pending) >= min(len(self._active), self.max_batch)
                # Only a caller whose frame is in the next batch leads it: one beyond it
                # waits for a later batch rather than running one without its own frame.
                if req in self._pending[: self.max_batch] and (full or time.monotonic() >= deadline):
                    batch = self._pending[: self.max_batch]
                    del self._pending[: self.max_batch]
                    break
                self._cond.wait(timeout=max(deadline - time.monotonic(), 0.0) or self.max_wait)
        if not req.done.is_set():
            self._run(batch)
            req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result

    def _run(self, batch: list[_Request]) -> None:
        # Runs on the thread of the member leading the batch.
        with self._running, torch.inference_mode():
            try:
                ready = []
                for r in batch:
                    try:
                        r.image = r.prepare()
                        ready.append(r)
                    except Exception as exc:  # this member's frame only
                        r.error = exc
                if ready:
                    images = [r.image for r in ready]
                    if self.pad_batches:
                        images += [torch.zeros_like(images[0])] * (slot_count(len(images)) - len(images))
                    with _autocast_of(ready[0].member):
                        out = self.model.forward_image(torch.cat(images))
                    for k, r in enumerate(ready):
                        try:
                            part = _slice(out, k)
                            r.result = part if r.finish is None else r.finish(r.image, part)
                        except Exception as exc:  # this member's step only
                            r.error = exc
            except BaseException as exc:  # the encoder pass: every member of the batch sees it
                for r in batch:
                    r.error = r.error or exc
            finally:
                with self._cond:
                    self.batches += 1
                    self.frames += len(batch)
                    for r in batch:
                        r.done.set()
                    self._cond.notify_all()


def _autocast_of(member: object):
    """The member engine's autocast context (bf16 on CUDA), or none (e.g. a test's member)."""
    autocast = getattr(member, "autocast", None)
    return autocast() if callable(autocast) else contextlib.nullcontext()


def _slice(out, k: int):
    if torch.is_tensor(out):
        return out[k : k + 1]
    if isinstance(out, dict):
        return {key: _slice(v, k) for key, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_slice(v, k) for v in out)
    return out


class StreamGroup:
    """Several streams, one model, one batched image encoder, one thread per stream.

    Each stream is a full tracker (capture, engine, publisher, control) exactly
    as ``streamtrack run`` builds it; only the model and the encoder pass are
    shared.  All streams must use the same model, checkpoint and input size.
    """

    def __init__(self, configs: list[RunConfig], *, max_wait: float = 0.01,
                 model: torch.nn.Module | None = None):
        if not configs:
            raise ValueError("a stream group needs at least one stream")
        first = configs[0].engine
        for c in configs[1:]:
            e = c.engine
            if (e.model, e.checkpoint, e.image_size, e.device) != (
                first.model, first.checkpoint, first.image_size, first.device
            ):
                raise ValueError(
                    f"stream {c.stream!r}: all streams of a group share one model "
                    "(same model, checkpoint, image size and device)"
                )
        names = [c.stream for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"stream names must be unique, got {names}")
        if model is None:
            model = build_model(first.model, first.checkpoint, device=resolve_device(first.device),
                                image_size=first.image_size)
        self.model = model
        self.encoder = SharedImageEncoder(model, max_wait=max_wait)
        self.trackers = {
            c.stream: Tracker(c, engine=StreamingEngine(model, c.engine, encoder=self.encoder))
            for c in configs
        }
        self.summaries: dict[str, RunSummary] = {}
        self.errors: dict[str, BaseException] = {}

    def stop(self) -> None:
        for t in self.trackers.values():
            t.stop()

    def run(self) -> dict[str, RunSummary]:
        """Run every stream to its end (or until ``stop``); a stream that fails is
        logged and recorded in ``errors`` while the others go on."""
        # Kernel selection and compilation once for the group, before any live frame (the
        # trackers were handed their engines, so they do not warm up themselves).
        seconds = next(iter(self.trackers.values())).engine.warmup_once()
        if seconds is not None:
            log.info("model warmed up in %.1f s", seconds)
        threads = [
            threading.Thread(target=self._run_one, args=(name,), name=f"stream-{name}", daemon=True)
            for name in self.trackers
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.summaries

    def _run_one(self, name: str) -> None:
        try:
            self.summaries[name] = self.trackers[name].run()
        except BaseException as exc:
            log.error("stream %s failed: %s", name, exc)
            self.errors[name] = exc
        finally:
            self.encoder.idle(self.trackers[name].engine)
