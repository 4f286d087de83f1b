"""``torch.compile`` of the model's per-frame work, with shapes that never change mid-stream.

What is compiled, following sam2's own ``SAM2VideoPredictorVOS``:

* the image encoder, static shapes (the input size is fixed; a shared encoder pads
  its batches to slot counts);
* the memory encoder, static shapes;
* memory attention, dynamic shapes (the number of memory frames grows during the
  first frames and with every prompt);
* the prompt encoder and mask decoder, static shapes, on tracked frames only.

Tracked objects run as batches padded to slot counts (1, 2, 4, 8 ...), so a new
object joins a batch size that is already compiled.  Prompted frames keep the
eager prompt encoder and decoder: their shapes depend on how many clicks a
prompt has, and a recompile there would stall the stream on the frame the user
is looking at.  ``StreamingEngine.warmup`` compiles every slot count up to
``EngineConfig.compile_slots`` before the first live frame.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch

log = logging.getLogger(__name__)

_tracking = threading.local()  # per thread: engines of a multi-stream group share the model


def slot_count(n: int) -> int:
    """The compiled batch size that holds ``n`` objects: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


def is_compiled(model: torch.nn.Module) -> bool:
    return getattr(model, "streamtrack_compiled", False)


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> None:
    """Compile ``model``'s per-frame modules in place, once (engines sharing the model
    share the compiled code)."""
    if is_compiled(model):
        return

    def comp(fn, dynamic: bool):
        return torch.compile(fn, dynamic=dynamic, backend=backend)

    model.image_encoder.forward = comp(model.image_encoder.forward, dynamic=False)
    model.memory_encoder.forward = comp(model.memory_encoder.forward, dynamic=False)
    model.memory_attention.forward = comp(model.memory_attention.forward, dynamic=True)
    for module in (model.sam_prompt_encoder, model.sam_mask_decoder):
        module.forward = _on_tracked_frames(module.forward, comp(module.forward, dynamic=False))
    model.streamtrack_compiled = True
    log.info("torch.compile (%s) of the image encoder and the per-frame step; "
             "compilation happens at warm-up", backend)


def _on_tracked_frames(eager, compiled):
    def forward(*args, **kwargs):
        fn = compiled if getattr(_tracking, "active", False) else eager
        return fn(*args, **kwargs)

    return forward


@contextlib.contextmanager
def tracked_frame():
    """Within this block (on this thread) the prompt encoder and decoder run compiled."""
    previous = getattr(_tracking, "active", False)
    _tracking.active = True
    try:
        yield
    finally:
        _tracking.active = previous
