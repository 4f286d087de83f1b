"""``torch.compile`` of the model's per-frame work, with shapes that never change mid-stream.

What is compiled, following sam2's own ``SAM2VideoPredictorVOS`` but in larger units
(each compiled call costs the host guard checks and, with CUDA graphs, a replay; the
small operators between the modules cost a launch each):

* the image encoder (``forward_image``: with the decoder's projections of the
  high-resolution features), static shapes (the input size is fixed; a shared encoder
  pads its batches to slot counts);
* memory encoding (``_encode_new_memory``: the memory encoder with the mask's scaling
  and the no-object embedding around it), static shapes;
* memory attention, dynamic shapes (the number of memory frames grows during the
  first frames and with every prompt);
* the SAM heads (``_forward_sam_heads``: the prompt encoder and mask decoder with the
  masks' upsampling, the best mask's choice and the object pointer's projection),
  static shapes, on tracked frames only.

Tracked objects run as batches padded to slot counts (1, 2, 4, 8 ...), so a new
object joins a batch size that is already compiled.  Prompted frames keep the
eager SAM heads: their shapes depend on how many clicks a
prompt has, and a recompile there would stall the stream on the frame the user
is looking at.  ``StreamingEngine.warmup`` compiles every slot count up to
``EngineConfig.compile_slots`` before the first live frame.

Modes (``EngineConfig.compile_mode``) are torch.compile's.  ``reduce-overhead`` and
``max-autotune`` replay CUDA graphs: on a GPU a SAM 2 step is mostly the host
launching small kernels, and a graph replay launches a whole module at once.  A
graph's outputs live in memory that its next replay overwrites (and, without a
backward pass, every new compiled call may reuse), so in those modes every
compiled module's outputs are cloned as they come out, as sam2's
``SAM2VideoPredictorVOS`` does: memory features outlive the frame, and several
object batches share one decoder graph within a frame.  CUDA graphs are recorded
per thread: run a cudagraph-mode engine's warm-up and steps on one thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch
from sam2.modeling.position_encoding import PositionEmbeddingSine
from torch.utils._pytree import tree_map_only

from streamtrack.errors import UserError
from streamtrack.tracking import COMPILE_MODES, CUDAGRAPH_MODES

log = logging.getLogger(__name__)

_tracking = threading.local()  # per thread: engines of a multi-stream group share the model


def slot_count(n: int) -> int:
    """The compiled batch size that holds ``n`` objects: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


def is_compiled(model: torch.nn.Module) -> bool:
    return getattr(model, "streamtrack_compiled", False)


def uses_cudagraphs(model: torch.nn.Module) -> bool:
    return getattr(model, "streamtrack_compile_mode", None) in CUDAGRAPH_MODES


def compile_model(model: torch.nn.Module, backend: str = "inductor", mode: str = "default") -> None:
    """Compile ``model``'s per-frame modules in place, once (engines sharing the model
    share the compiled code).  ``mode`` is torch.compile's (see the module docstring);
    it applies to the inductor backend, but the outputs are cloned in a CUDA-graph mode
    whatever the backend, so tests can stand in a backend with the same output rule."""
    if mode not in COMPILE_MODES:
        raise UserError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if is_compiled(model):
        if model.streamtrack_compile_mode != mode:
            raise UserError(f"this model is compiled in mode {model.streamtrack_compile_mode!r}, "
                            f"not {mode!r}: engines sharing a model share one mode")
        return
    cudagraphs = mode in CUDAGRAPH_MODES
    guard_by_dict_tags()
    _fill_position_caches(model)
    options = {"mode": mode} if backend == "inductor" and mode != "default" else {}

    def comp(fn, dynamic: bool):
        compiled = torch.compile(fn, dynamic=dynamic, backend=backend, **options)
        return _cloning_outputs(compiled) if cudagraphs else compiled

    # sam2's methods around the image encoder, the prompt encoder, the decoder and the
    # memory encoder, not just the modules: their glue (the decoder's projections of the
    # high-resolution features, the masks' upsampling and choice, the object pointer's
    # projection, the memory's scaling) then runs inside the same graph instead of as
    # dozens of small launches between graphs.
    model.forward_image = comp(model.forward_image, dynamic=False)
    model.memory_attention.forward = comp(model.memory_attention.forward, dynamic=True)
    model._encode_new_memory = comp(model._encode_new_memory, dynamic=False)
    model._forward_sam_heads = _on_tracked_frames(
        model._forward_sam_heads, comp(model._forward_sam_heads, dynamic=False))
    model.streamtrack_compiled = True
    model.streamtrack_compile_mode = mode
    log.info("torch.compile (%s, mode %s) of the image encoder and the per-frame step; "
             "compilation happens at warm-up", backend, mode)


def guard_by_dict_tags() -> None:
    """Let dynamo check a module subtree's guards by its dictionaries' version tags.

    Every compiled call first checks its guards: for sam2's units about a thousand, most
    on the parameters and attributes of the modules inside (each tensor's type, shape,
    strides and dynamic-shape markings).  With this on, a subtree whose dictionaries are
    untouched since the last call is passed at once; any assignment to a module's
    attribute (a new parameter, a changed flag, a new cache entry) changes a tag and
    the subtree is checked in full.  Nothing here assigns to the model while it streams.
    What the tags do not see is a tensor changed in place, as ``model.to()`` and
    ``model.half()`` change parameters: move or cast a model before an engine compiles
    it (CUDA graphs hold the old tensors' addresses anyway).  It cuts the guard checks'
    time per frame by about 30 % (``docs/benchmarks.md``).  A process-wide dynamo setting,
    read when a function is compiled; the official ``vos_optimized`` baseline gets it
    too, so both sides run under the same torch configuration."""
    torch._dynamo.config.use_recursive_dict_tags_for_guards = True


def _fill_position_caches(model: torch.nn.Module) -> None:
    """Compute sam2's cached sine position encodings now, eagerly, at every feature size of
    this input size.  sam2 does so at construction only on CUDA and for 1024 inputs;
    otherwise the first compiled call fills the cache with a tensor of its own, which in
    a CUDA-graph mode lives in graph memory that later replays overwrite."""
    size = model.image_size
    device = next(model.parameters()).device
    for module in model.modules():
        if isinstance(module, PositionEmbeddingSine):
            for stride in (4, 8, 16, 32):
                module._pe(1, device, size // stride, size // stride)


def _cloning_outputs(fn):
    """``fn`` with every output tensor copied out of the CUDA graph's memory."""

    def forward(*args, **kwargs):
        return tree_map_only(torch.Tensor, torch.Tensor.clone, fn(*args, **kwargs))

    return forward


def _on_tracked_frames(eager, compiled):
    def forward(*args, **kwargs):
        fn = compiled if getattr(_tracking, "active", False) else eager
        return fn(*args, **kwargs)

    return forward


@contextlib.contextmanager
def tracked_frame():
    """Within this block (on this thread) the SAM heads run compiled."""
    previous = getattr(_tracking, "active", False)
    _tracking.active = True
    try:
        yield
    finally:
        _tracking.active = previous
