"""Download official SAM 2 checkpoints into ``checkpoints/``."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from streamtrack.errors import DownloadError
from streamtrack.models import ModelSpec, build_model, check_state_dict, get_spec, read_state_dict


def download_checkpoint(
    name: str,
    checkpoint_dir: Path | None = None,
    *,
    url: str | None = None,
    force: bool = False,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Fetch ``name``'s checkpoint, verify it against the model, move it into place.

    The file is written to ``<name>.pt.part`` and renamed only once it loads and
    its keys and shapes match the model, so an interrupted or bad download never
    leaves a file that looks usable.
    """
    spec = get_spec(name)
    target = spec.default_path(checkpoint_dir)
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    source = url or spec.url
    try:
        _fetch(source, part, spec, timeout=timeout, progress=progress)
        verify_checkpoint(part, spec)
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return target


def _fetch(url: str, dest: Path, spec: ModelSpec, *, timeout: float, progress: bool) -> None:
    hint = f"download {url} by other means and save it as {spec.default_path()}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=spec.filename, disable=not progress
            ) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise DownloadError(f"cannot download {spec.name}: HTTP {e.code} from {url}; {hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        if isinstance(reason, str) and reason.startswith("unknown url type"):  # not a network problem
            raise DownloadError(f"cannot download {spec.name} from {url}: {reason} "
                                "(give an http://, https:// or file:// URL)") from None
        raise DownloadError(f"cannot download {spec.name} (offline? {reason}); {hint}") from None


def verify_checkpoint(path: Path, spec: ModelSpec) -> None:
    state = read_state_dict(path, spec.name)
    check_state_dict(build_model(spec.name, random_init=True), state, path, spec.name)

