"""The compiled engine: padded object batches, no recompilation after warm-up, same results.

Dynamo's ``eager`` backend keeps the test fast on a CPU: tracing, guards and
recompilation are dynamo's and the same whatever backend runs the graphs, so a
shape that would recompile under inductor shows up here as a new graph.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from torch._dynamo.mutation_guard import GenerationTracker
from torch._dynamo.utils import counters

from streamtrack.compiled import slot_count
from streamtrack.engine import EngineConfig, Prompt, StreamingEngine
from streamtrack.models import build_model
from streamtrack.synthetic import make_clip

IMAGE_SIZE = 128  # dynamo traces every graph once per batch size: keep it small


@pytest.fixture(autouse=True)
def _fresh_dynamo_caches():
    """Dynamo keeps compiled code per Python function, for every model in the process, up
    to a recompile limit; past it, a unit runs eagerly.  Each test here compiles its own
    model, so none leaves its graphs to the tests after it."""
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(("n", "slots"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (16, 16), (17, 32)])
def test_slot_count(n, slots):
    assert slot_count(n) == slots


def _prompts_for(clip, frame: int) -> list[Prompt]:
    """Object 1 boxed on frame 0; on frame 3 three objects join in one batch (a box,
    a box and a three-click prompt, whose shape no tracked frame has); on frame 6
    object 1 is refined with clicks."""
    if frame == 0:
        return [Prompt.make(1, box=clip.box(1, 0))]
    if frame == 3:
        x0, y0, x1, y1 = clip.box(3, 3)
        clicks = [[(x0 + x1) / 2, (y0 + y1) / 2], [x0 + 1, y0 + 1], [x1 - 1, y1 - 1]]
        return [Prompt.make(2, box=clip.box(2, 3)), Prompt.make(3, box=clip.box(1, 3)),
                Prompt.make(4, points=clicks, labels=[1, 0, 1])]
    if frame == 6:
        x0, y0, x1, y1 = clip.box(1, 6)
        return [Prompt.make(1, points=[[(x0 + x1) / 2, (y0 + y1) / 2]], labels=[1])]
    return []


def _run(engine: StreamingEngine, clip, frames: int | None = None) -> list:
    return [engine.step(f, _prompts_for(clip, i), return_logits=True)
            for i, f in enumerate(clip.frames[:frames])]


def test_compiled_engine_pads_batches_and_never_recompiles_after_warmup(tiny_checkpoint):
    clip = make_clip(12, 160, 120, num_objects=3, seed=5)
    eager = StreamingEngine(build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=IMAGE_SIZE),
                            EngineConfig(preprocess="exact"))
    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=IMAGE_SIZE)
    compiled = StreamingEngine(model, EngineConfig(preprocess="exact", compile=True, compile_backend="eager",
                                                   compile_slots=4))
    assert compiled.pad_batches and not eager.pad_batches

    decoder_batches: list[int] = []
    model.sam_mask_decoder.register_forward_pre_hook(
        lambda _m, _a, kw: decoder_batches.append(kw["image_embeddings"].shape[0]), with_kwargs=True
    )
    compiled.warmup()
    assert {1, 2, 4} <= set(decoder_batches)  # every slot count was compiled at warm-up
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    decoder_batches.clear()

    expected, got = _run(eager, clip), _run(compiled, clip)

    # Objects 2-4 (one batch of three) ran padded to four slots; nothing ran at three.
    assert 4 in decoder_batches and 3 not in decoder_batches
    # New objects, a batch size never used before and a three-click prompt: no new graph.
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup
    for a, b in zip(expected, got, strict=True):
        assert [o.obj_id for o in a.objects] == [o.obj_id for o in b.objects]
        for oa, ob in zip(a.objects, b.objects, strict=True):
            assert np.array_equal(oa.mask, ob.mask), (a.frame_idx, oa.obj_id)
            assert torch.allclose(oa.logits, ob.logits, atol=1e-4), (a.frame_idx, oa.obj_id)
            assert oa.object_score_logit == pytest.approx(ob.object_score_logit, abs=1e-4)
    # Padding slots are not kept: the memory banks are the same size.
    assert compiled.state_bytes() == eager.state_bytes()
    for obj_id in eager.object_ids:
        assert compiled.retained_frames(obj_id) == eager.retained_frames(obj_id)


# --------------------------------------------------------------------- CUDA graphs
# CUDA graphs without a backward pass (inductor's cudagraph trees): a new call of any
# compiled function starts a new "generation", and its graphs may reuse the memory of
# every output of the generations before.  This backend makes that happen on a CPU:
# the first graph of a new call (by the generation counter cudagraph trees read)
# poisons (NaN) every output of earlier calls that does not alias a graph input, so a
# stale output cannot go unnoticed.


def _poisoning_backend(gm, example_inputs):
    def run(*args):
        if GenerationTracker.generation != _last_generation[0]:
            _last_generation[0] = GenerationTracker.generation
            for ref in _returned:
                t = ref()
                if t is not None and t.is_floating_point():
                    t.fill_(float("nan"))
            _returned.clear()
        outs = gm(*args)
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        _returned.extend(weakref.ref(o) for o in outs
                         if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in inputs)
        return outs

    return run


_returned: list[weakref.ref] = []
_last_generation = [-1]
POISONING = "streamtrack_test_poisoning"
torch._dynamo.register_backend(_poisoning_backend, name=POISONING)


def _poisoned_engine(checkpoint, mode: str) -> StreamingEngine:
    model = build_model("sam2.1_hiera_tiny", checkpoint, image_size=IMAGE_SIZE)
    return StreamingEngine(model, EngineConfig(preprocess="exact", compile=True, compile_backend=POISONING,
                                               compile_mode=mode, compile_slots=1))


def _same_results(a_run, b_run) -> bool:
    for a, b in zip(a_run, b_run, strict=True):
        for oa, ob in zip(a.objects, b.objects, strict=True):
            if not (np.array_equal(oa.mask, ob.mask) and torch.allclose(oa.logits, ob.logits, atol=1e-4)):
                return False
    return True


def test_cudagraph_mode_copies_outputs_out_of_graph_memory(tiny_checkpoint):
    clip = make_clip(12, 160, 120, num_objects=3, seed=5)
    eager = StreamingEngine(build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=IMAGE_SIZE),
                            EngineConfig(preprocess="exact"))
    expected = _run(eager, clip)

    graphs = _poisoned_engine(tiny_checkpoint, "reduce-overhead")
    encoder_calls = []
    forward_image = graphs.model.forward_image  # counted from outside: a hook would be traced

    def counted(*args, **kwargs):
        encoder_calls.append(1)
        return forward_image(*args, **kwargs)

    graphs.model.forward_image = counted
    graphs.warmup()
    # A graph per shape: warm-up runs until the pointer window is full.
    assert len(encoder_calls) == max(graphs.mem_window, graphs.ptr_window) + 2
    got = _run(graphs, clip)
    assert _same_results(expected, got)
    assert graphs.state_bytes() == eager.state_bytes()

    # The same graphs without the copies: stale outputs are read, and tracking goes wrong.
    # (Shows the backend above does bite.)
    uncopied = _poisoned_engine(tiny_checkpoint, "default")
    assert not _same_results(expected[:3], _run(uncopied, clip, frames=3))  # three frames are enough


def test_compiling_for_a_cpu_says_it_is_slow_there(tiny_checkpoint, caplog, monkeypatch):
    """Inductor on a CPU takes minutes to warm up (and CUDA graphs do nothing there): allowed,
    but said, as the options are documented for CUDA."""
    import streamtrack.engine as engine_module

    monkeypatch.setattr(engine_module, "compile_model", lambda *a, **k: None)  # not minutes here
    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=IMAGE_SIZE)
    with caplog.at_level("WARNING", logger="streamtrack.engine"):
        StreamingEngine(model, EngineConfig(compile=True, compile_mode="reduce-overhead"))
        StreamingEngine(model, EngineConfig(compile=True, compile_backend="eager"))  # a test backend
    said = [r.getMessage() for r in caplog.records if "compile is meant for CUDA" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("compiling the model (compile/compile_mode) on cpu")


def test_compile_modes_are_checked(tiny_checkpoint):
    from streamtrack.compiled import compile_model
    from streamtrack.errors import UserError
    from streamtrack.multistream import SharedImageEncoder

    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=IMAGE_SIZE)
    with pytest.raises(UserError, match="compile_mode must be one of"):
        StreamingEngine(model, EngineConfig(compile=True, compile_mode="fastest"))
    with pytest.raises(UserError, match="compile_slots must be an integer >= 1, got 0"):
        StreamingEngine(model, EngineConfig(compile=True, compile_slots=0))
    # In a run's configuration a compile mode other than default turns compiling on.
    from streamtrack.config import Config
    from streamtrack.pipeline import RunConfig

    run = RunConfig.from_config(Config(compile_mode="reduce-overhead"), "clip.mp4", {})
    assert run.engine.compile and run.engine.compile_mode == "reduce-overhead"
    assert not RunConfig.from_config(Config(), "clip.mp4", {}).engine.compile
    compile_model(model, POISONING, "reduce-overhead")
    with pytest.raises(UserError, match="compiled in mode 'reduce-overhead', not 'default'"):
        compile_model(model, POISONING, "default")
    # CUDA graphs are recorded per thread; a stream group's steps run on several threads.
    with pytest.raises(UserError, match="recorded per thread"):
        config = EngineConfig(compile=True, compile_backend=POISONING, compile_mode="reduce-overhead")
        StreamingEngine(model, config, encoder=SharedImageEncoder(model))


def test_guards_checked_by_dict_tags_still_see_a_changed_model(tiny_checkpoint):
    """Compiled units skip the guards of module subtrees whose dictionaries are untouched
    (``guard_by_dict_tags``); an attribute assigned mid-stream must still reach the graphs.
    ``sigmoid_scale_for_mem_enc`` is a float that ``_encode_new_memory``'s graph holds as
    a constant: a graph that missed the change would keep encoding memories the old way."""
    clip = make_clip(8, 160, 120, num_objects=1, seed=7)
    prompts = {0: [Prompt.make(1, box=clip.box(1, 0))]}

    def run(engine, change_at: int | None) -> list:
        outs = []
        for i, frame in enumerate(clip.frames):
            if i == change_at:
                engine.model.sigmoid_scale_for_mem_enc *= 3.0
            outs.append(engine.step(frame, prompts.get(i, []), return_logits=True))
        return outs

    def engine(compiled: bool) -> StreamingEngine:
        model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=IMAGE_SIZE)
        config = EngineConfig(preprocess="exact", compile=compiled, compile_backend="eager", compile_slots=1)
        return StreamingEngine(model, config)

    compiled = engine(compiled=True)
    assert torch._dynamo.config.use_recursive_dict_tags_for_guards
    compiled.warmup()
    got = run(compiled, change_at=4)
    assert _same_results(run(engine(compiled=False), change_at=4), got)
    # (The change does move the results: a stale graph would not match.)
    assert not _same_results(run(engine(compiled=False), change_at=None)[5:], got[5:])
