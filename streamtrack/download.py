"""Download official SAM 2 checkpoints into ``models.CHECKPOINT_DIR`` (the checkout's
``checkpoints/``, or the user's cache for an installed package)."""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from streamtrack.errors import CheckpointError, DownloadError, exists
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
    leaves a file that looks usable.  A file already in place is verified too (a copy
    cut short by hand would otherwise pass for downloaded); ``force`` replaces it.
    """
    spec = get_spec(name)
    target = spec.default_path(checkpoint_dir)
    if exists(target, "checkpoint") and target.is_dir():  # --force would not replace it either
        raise DownloadError(f"{target} is a directory where the checkpoint goes: move it away")
    if target.exists() and not force:
        try:
            verify_checkpoint(target, spec)
        except CheckpointError as e:
            fix = "" if "--force" in str(e) else f"; `streamtrack download {name} --force` replaces it"
            raise DownloadError(f"{e}{fix}") from None
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the folder {target.parent} for {spec.filename}: "
                            f"{e.strerror or e}") from None
    part = target.with_name(target.name + ".part")
    source = url or spec.url
    try:
        _fetch(source, part, spec, target, timeout=timeout, progress=progress, given_url=url is not None)
        verify_checkpoint(part, spec, shown_as=f"the file from {source}")
        os.replace(part, target)
    except BaseException:
        with contextlib.suppress(OSError):  # a read-only folder: there is no .part to remove
            part.unlink(missing_ok=True)
        raise
    return target


def _fetch(url: str, dest: Path, spec: ModelSpec, target: Path, *, timeout: float, progress: bool,
           given_url: bool = False) -> None:
    hint = f"download {spec.url} by other means and save it as {target}"
    if given_url:  # that one may be the problem: the official file is the way out
        hint = f"check the URL, or {hint}"

    def cannot_write(e: OSError) -> DownloadError:  # the disk, not the network
        return DownloadError(f"cannot write {dest}: {e.strerror or e}")

    try:
        out = open(dest, "wb")
    except OSError as e:
        raise cannot_write(e) from None
    with out:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise DownloadError(f"cannot download {spec.name}: HTTP {e.code} from {url}; {hint}") from None
        except ValueError as e:  # no scheme at all: not a URL
            raise DownloadError(f"cannot download {spec.name} from {url}: {e} "
                                "(give an http://, https:// or file:// URL)") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            if isinstance(reason, str) and reason.startswith("unknown url type"):  # not a network problem
                raise DownloadError(f"cannot download {spec.name} from {url}: {reason} "
                                    "(give an http://, https:// or file:// URL)") from None
            if url.startswith("file:"):  # a local file: the network has nothing to do with it
                reason = getattr(reason, "strerror", None) or reason
                raise DownloadError(f"cannot read {spec.name} from {url}: {reason}") from None
            raise DownloadError(f"cannot download {spec.name} (offline? {reason}); {hint}") from None
        total = int(response.headers.get("Content-Length") or 0) or None
        got = 0
        with response, tqdm(total=total, unit="B", unit_scale=True, desc=spec.filename,
                            disable=not progress) as bar:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except OSError as e:
                    raise DownloadError(f"download of {spec.name} from {url} broke off ({e}); {hint}") \
                        from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as e:
                    raise cannot_write(e) from None
                got += len(chunk)
                bar.update(len(chunk))
        if total is not None and got < total:  # the server closed early: not a bad file
            raise DownloadError(f"download of {spec.name} from {url} broke off after {got} of {total} "
                                f"bytes; run it again, or {hint}")
        try:
            out.flush()
        except OSError as e:
            raise cannot_write(e) from None


def verify_checkpoint(path: Path, spec: ModelSpec, shown_as: str | None = None) -> None:
    """Refuse a file that does not load as ``spec``'s model; messages name it ``shown_as``
    (a download's temporary file is gone by the time the message is read)."""
    try:
        state = read_state_dict(path, spec.name)
        # No --model to advise: `download` names its model, and the file is that model's or none.
        check_state_dict(build_model(spec.name, random_init=True), state, path, spec.name, advice=None)
    except CheckpointError as e:
        if shown_as is None:
            raise
        raise CheckpointError(str(e).replace(f"checkpoint {path}", shown_as, 1)) from None
