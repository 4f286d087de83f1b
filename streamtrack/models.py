"""Model registry, model building and the one checkpoint loader used everywhere.

Every model is built from the official sam2 hydra configs with the official
builders (``sam2.build_sam``); streamtrack only adds an input-size override and
a stricter checkpoint check that names the model and the file when they do not
match.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from streamtrack.errors import CheckpointError, UserError, exists

if TYPE_CHECKING:  # imported where used: a process that runs no model (a supervisor) never loads it
    import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "sam2.1_hiera_tiny"


def default_checkpoint_dir(package_file: str = __file__) -> Path:
    """The checkout's ``checkpoints/`` when run from a source checkout (``pip install -e``,
    the quick start); otherwise the user's cache, not a folder inside site-packages."""
    checkout = Path(package_file).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / "checkpoints"
    cache = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache):  # unset, or relative: which the XDG spec says to ignore
        cache = str(Path.home() / ".cache")
    return Path(cache) / "streamtrack" / "checkpoints"


CHECKPOINT_DIR = default_checkpoint_dir()

_BASE_URL_SAM2 = "https://dl.fbaipublicfiles.com/segment_anything_2/072824"
_BASE_URL_SAM21 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"


@dataclass(frozen=True)
class ModelSpec:
    """One official SAM 2 checkpoint: its hydra config and where to get it."""

    name: str
    config: str
    url: str
    size_mb: int

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"

    def default_path(self, checkpoint_dir: Path | None = None) -> Path:
        return (checkpoint_dir or CHECKPOINT_DIR) / self.filename


def _spec(family: str, size: str, short: str, size_mb: int) -> ModelSpec:
    name = f"{family}_hiera_{size}"
    base = _BASE_URL_SAM21 if family == "sam2.1" else _BASE_URL_SAM2
    return ModelSpec(
        name=name,
        config=f"configs/{family}/{family}_hiera_{short}.yaml",
        url=f"{base}/{name}.pt",
        size_mb=size_mb,
    )


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for family in ("sam2", "sam2.1")
    for s in (
        _spec(family, "tiny", "t", 149),
        _spec(family, "small", "s", 176),
        _spec(family, "base_plus", "b+", 309),
        _spec(family, "large", "l", 856),
    )
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


# SAM 2 is trained at 1024; twice that is already 4x the encoder's work and memory, and
# a mistyped size (an extra digit) would otherwise run the machine out of memory.
MAX_IMAGE_SIZE = 2048


def check_image_size(image_size: int) -> int:
    # Hiera downsamples by 32 overall and the memory encoder by 16; anything that
    # is not a multiple of 32 would make the feature grids disagree.
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
        raise UserError(f"image size must be an integer, got {image_size!r} ({type(image_size).__name__})")
    if not 64 <= image_size <= MAX_IMAGE_SIZE or image_size % 32:
        raise UserError(f"image size must be a multiple of 32 from 64 to {MAX_IMAGE_SIZE}, got {image_size}")
    return int(image_size)  # a numpy integer too


def hydra_overrides(image_size: int | None) -> list[str]:
    """Overrides that change the model input resolution.

    ``image_size`` drives the prompt encoder, mask decoder and memory encoder;
    the RoPE memory attention is told the new feature grid so it does not
    recompute its frequencies on the first frame (it would, correctly, anyway).
    """
    if image_size is None:
        return []
    check_image_size(image_size)
    grid = image_size // 16
    attn = "++model.memory_attention.layer"
    return [
        f"++model.image_size={image_size}",
        f"{attn}.self_attention.feat_sizes=[{grid},{grid}]",
        f"{attn}.cross_attention.feat_sizes=[{grid},{grid}]",
    ]


VOS_COMPILE_MODE = "max-autotune"  # what sam2's SAM2VideoPredictorVOS compiles with


@contextmanager
def torch_compile_mode(mode: str) -> Iterator[None]:
    """Every ``torch.compile`` call made inside compiles in ``mode``.  sam2's VOS build
    hard-codes ``max-autotune``, whose autotuning can take longer than a benchmark run
    has; ``reduce-overhead`` gives the same CUDA graphs without it (the mode the
    engine's own CUDA-graph figures use)."""
    import torch

    compile_ = torch.compile

    def compile_in_mode(*args, **kwargs):
        kwargs["mode"] = mode
        return compile_(*args, **kwargs)

    torch.compile = compile_in_mode
    try:
        yield
    finally:
        torch.compile = compile_


def build_model(
    name: str = DEFAULT_MODEL,
    checkpoint: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    kind: str = "video",
    random_init: bool = False,
    vos_optimized: bool = False,
    vos_compile_mode: str = VOS_COMPILE_MODE,
) -> torch.nn.Module:
    """Build an official SAM 2 model and load its checkpoint.

    ``kind="video"`` builds ``SAM2VideoPredictor`` (the configuration the official
    video predictor uses, which the streaming engine also runs); ``kind="image"``
    builds the plain ``SAM2Base`` used by ``SAM2ImagePredictor``.
    ``checkpoint=None`` means ``<name>.pt`` in :data:`CHECKPOINT_DIR`; ``random_init=True``
    skips loading (tests and benchmarks only); ``vos_optimized=True`` builds sam2's
    compiled ``SAM2VideoPredictorVOS`` (benchmark baseline, CUDA), its components
    compiled in ``vos_compile_mode`` (sam2's own: ``max-autotune``).
    """
    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    spec = get_spec(name)
    builder = {"video": build_sam2_video_predictor, "image": build_sam2}.get(kind)
    if builder is None:
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    overrides = hydra_overrides(image_size)  # a bad size is reported before a missing file
    path = None
    if not random_init:
        path = checkpoint_path(spec.name, checkpoint)
        if not exists(path, f"checkpoint for {spec.name}"):
            raise CheckpointError(missing_checkpoint_message(spec, path, given=bool(checkpoint)))
    extra = {"vos_optimized": True} if vos_optimized and kind == "video" else {}
    if extra:
        from streamtrack.compiled import guard_by_dict_tags

        guard_by_dict_tags()  # the engine's compiled units check guards this way too
    with torch_compile_mode(vos_compile_mode) if extra else nullcontext():
        model = builder(
            spec.config, ckpt_path=None, device="cpu", hydra_overrides_extra=overrides, **extra
        )
    if path is not None:
        load_checkpoint(model, path, spec.name)
    return model.to(device).eval()


def checkpoint_path(name: str, checkpoint: str | Path | None = None) -> Path:
    """The file a model is loaded from: ``checkpoint`` as given, else its default place."""
    return Path(checkpoint).expanduser() if checkpoint else get_spec(name).default_path()


def missing_checkpoint_message(spec: ModelSpec, path: Path, given: bool = False) -> str:
    """``given``: the user named ``path`` (a typo then, more likely than a download to make)."""
    if given:
        return (f"checkpoint {path} not found: check the path (`streamtrack download {spec.name}` "
                f"fetches the official {spec.name} checkpoint into {spec.default_path()})")
    return (
        f"checkpoint for {spec.name} not found at {path}; run `streamtrack download {spec.name}`"
        f" or fetch {spec.url} and save it as {spec.default_path()} (or name a file: --checkpoint FILE,"
        f" checkpoint= in Python)"
    )


def read_state_dict(path: str | Path, model_name: str) -> dict[str, torch.Tensor]:
    """Read an official-format checkpoint (a dict with key ``model``), safely.

    ``weights_only=True``: a checkpoint is data, never code.
    """
    import torch

    path = Path(path)
    where = f"checkpoint {path} for {model_name}"
    if path.is_dir():
        raise CheckpointError(f"{where} is a directory, not a file")
    if not path.exists():
        raise CheckpointError(f"{where}: no such file")
    if not path.is_file():  # a pipe, a device: the checkpoint's zip format is read by seeking
        raise CheckpointError(f"{where} is not a regular file (a checkpoint is read by seeking in it)")
    try:
        with warnings.catch_warnings():
            # torch warns about what it then fails on (a plain pickle's protocol): the
            # error below says it in one line.
            warnings.simplefilter("ignore", UserWarning)
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means "not a checkpoint"
        raise CheckpointError(f"{where} is not a readable PyTorch checkpoint "
                              f"({_load_problem(path, e, model_name)})") from None
    if not isinstance(blob, dict) or "model" not in blob or not isinstance(blob["model"], dict):
        raise CheckpointError(
            f"{where} is not in the official format (a dict with key 'model' holding the state dict)"
        )
    return blob["model"]


def _load_problem(path: Path, e: Exception, model_name: str) -> str:
    """Why ``torch.load`` failed, in words for the user (torch's own text suggests
    unsafe loading, or is a bare key such as '101' for a text file)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as unreadable:  # e.g. no permission: torch.load failed on the same
        return unreadable.strerror or str(unreadable)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive (the official checkpoints are)
        return "not a zip archive as torch.save writes: another kind of file, or a damaged download"
    if "central directory" in str(e):
        return (f"the archive is cut short: an unfinished download? fetch it again, e.g. "
                f"`streamtrack download {model_name} --force`")
    if "Weights only load failed" in str(e):
        return ("it holds Python objects besides tensors, and streamtrack loads checkpoints as data "
                "only (weights_only), never as code")
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch's text has terminal colours
    first = text.splitlines()[0] if text else type(e).__name__
    return first if len(first) <= 160 else first[:157] + "..."


def check_state_dict(model: torch.nn.Module, state: dict, path: str | Path, model_name: str,
                     advice: str | None = "use model {0}, --model {0}") -> None:
    """Refuse a state dict whose keys or shapes differ from the model's; where it is another
    model's, the message names that one, with ``advice`` (formatted with its name) for
    the command at hand."""
    import torch

    expected = model.state_dict()
    unnamed = [repr(k) for k in state if not isinstance(k, str)]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in state if isinstance(k, str) and k not in expected)
    not_tensors = [f"{k} is a {type(state[k]).__name__}" for k in expected
                   if k in state and not torch.is_tensor(state[k])]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and torch.is_tensor(state[k]) and state[k].shape != v.shape
    ]
    problems = []
    if unnamed:
        problems.append(f"{len(unnamed)} keys that are not parameter names (e.g. {unnamed[0]})")
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if not_tensors:
        problems.append(f"{len(not_tensors)} values that are not tensors (e.g. {not_tensors[0]})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensors of the wrong shape (e.g. {wrong_shape[0]})")
    if problems:
        other = _model_of(state)
        hint = ""
        if other not in (None, model_name):
            hint = f" (it looks like a {other} checkpoint{': ' + advice.format(other) if advice else ''})"
        raise CheckpointError(
            f"checkpoint {path} does not match model {model_name}: " + "; ".join(problems) + hint
        )
    # A checkpoint that diverged in training (or was damaged) loads, then gives NaN scores
    # and empty masks on every frame: it is refused here, by name.
    not_finite = [k for k in expected if state[k].is_floating_point()
                  and not bool(torch.isfinite(state[k]).all())]
    if not_finite:
        raise CheckpointError(
            f"checkpoint {path} for {model_name} is unusable: {len(not_finite)} tensors hold NaN or "
            f"infinite values (e.g. {not_finite[0]}); a diverged training run or a damaged file")


# (Hiera blocks, embedding width) of each size's image encoder: what tells the sizes apart.
_HIERA_SIZES = {(12, 96): "tiny", (16, 96): "small", (24, 112): "base_plus", (48, 144): "large"}


def _model_of(state: dict) -> str | None:
    """Which official model a state dict belongs to, from its image encoder's depth and
    width (and SAM 2.1's extra keys), or None if it is none of them."""
    import torch

    blocks = {k.split(".")[3] for k in state
              if isinstance(k, str) and k.startswith("image_encoder.trunk.blocks.")}
    embed = state.get("image_encoder.trunk.patch_embed.proj.weight")
    if not torch.is_tensor(embed) or embed.ndim == 0 or not all(b.isdigit() for b in blocks):
        return None
    size = _HIERA_SIZES.get((len(blocks), embed.shape[0]))
    family = "sam2.1" if "no_obj_embed_spatial" in state else "sam2"
    return f"{family}_hiera_{size}" if size else None


def load_checkpoint(model: torch.nn.Module, path: str | Path, model_name: str) -> None:
    """The one checkpoint loader: read, check against the model, load strictly."""
    state = read_state_dict(path, model_name)
    check_state_dict(model, state, path, model_name)
    model.load_state_dict(state, strict=True)
    log.info("loaded %s from %s", model_name, path)


def check_device_name(device: str) -> str:
    """The form of a device name, whether or not this machine has that device."""
    if device not in ("auto", "cpu", "mps") and not re.fullmatch(r"cuda(:[0-9]+)?", device):
        raise UserError(f"device must be auto, cpu, cuda[:N] or mps, got {device!r}")
    return device


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable device is a user error."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    check_device_name(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"device {device!r} requested but this machine has "
                        f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 is the first)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' requested but MPS is not available here")
    return torch.device(device)


def save_random_checkpoint(
    name: str, path: str | Path, *, seed: int = 0, sharpen: bool = True
) -> Path:
    """Write a seeded random-weight checkpoint of ``name`` in the official format.

    No trained weights can be assumed offline, so tests and benchmarks run the
    real architecture on random weights.  Random init gives near-zero mask logits
    (about ±0.05); ``sharpen`` scales the mask decoder's hypernetwork output
    layers by 100 and lifts the object-score bias by 2, so masks depend on the
    prompt and the memory, which makes equivalence tests sharper.  Test-only.
    """
    import torch

    torch.manual_seed(seed)
    model = build_model(name, random_init=True)
    state = model.state_dict()
    if sharpen:
        for k in state:
            if k.startswith("sam_mask_decoder.output_hypernetworks_mlps.") and ".layers.2." in k:
                state[k] = state[k] * 100.0
        state["sam_mask_decoder.pred_obj_score_head.layers.2.bias"] += 2.0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return path
