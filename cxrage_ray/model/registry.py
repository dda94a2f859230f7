"""The weights registry, the local weights cache, and verified downloads.

In:  ``weights/registry.json`` (shipped as ``cxrage_ray.weights_data``), a cache folder, optionally a path.
Out: `ResolvedWeights` — the file to load and its sha256 — or a `WeightsError` that says how to get them.

The published model is only ever used after its sha256 matched the registry; nothing here falls back
to other weights. Verification of the cached 257 MB file is remembered in a sidecar
(``<file>.sha256.json``, keyed by size and mtime) so it is hashed once, not on every run.
This module does not import torch.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, Mapping

from cxrage_ray.errors import WeightsError
from cxrage_ray.model.packaged import packaged_file
from cxrage_ray.storage.atomic import move_into_place, write_atomic
from cxrage_ray.storage.digest import hash_file_into, sha256_file

DEFAULT_MODEL = "plco-fine-tuned-120419"
_CHUNK = 1 << 20  # download read size
_TIMEOUT_S = 60.0  # per socket operation, not for the whole download
_SIDECAR_SUFFIX = ".sha256.json"


@dataclass(frozen=True)
class WeightsSpec:
    """One registry entry: a weights file that can be downloaded and verified.

    Args:
        id: registry key, e.g. ``plco-fine-tuned-120419``.
        file: file name in the cache folder.
        size: exact size in bytes.
        sha256: hex sha256 of the file.
        url: HTTP(S) download URL.
        license: licence terms of the weights.
        citation: the paper to cite.
        model_card: the model card's file name inside ``cxrage_ray.weights_data``.
        description: one line about the model.
        format: the checkpoint's container/layout.
        provenance: where the size and sha256 come from.
    """

    id: str
    file: str
    size: int
    sha256: str
    url: str
    license: str = ""
    citation: str = ""
    model_card: str = ""
    description: str = ""
    format: str = ""
    provenance: str = ""


@dataclass(frozen=True)
class ResolvedWeights:
    """The weights a job will use.

    Args:
        path: the file to hand to `cxrage_ray.model.checkpoint.load_state_dict`.
        sha256: its hex sha256 (recorded with every output row).
        source: "explicit" (a path the user gave), "cache" (verified published model already cached)
            or "fetched" (downloaded and verified by this call).
    """

    path: Path
    sha256: str
    source: Literal["explicit", "cache", "fetched"]


def load_registry() -> dict[str, WeightsSpec]:
    """All registry entries by id, read from the packaged ``registry.json``."""
    text = packaged_file("registry.json").read_text(encoding="utf-8")
    models = json.loads(text)["models"]
    known = {f.name for f in fields(WeightsSpec)} - {"id"}
    # fields a newer registry adds are ignored, so an older package still reads it
    return {model_id: WeightsSpec(id=model_id, **{k: v for k, v in entry.items() if k in known})
            for model_id, entry in models.items()}


def model_card(spec: WeightsSpec) -> str:
    """The text of `spec`'s model card (Markdown)."""
    return packaged_file(spec.model_card).read_text(encoding="utf-8")


def weights_home(env: Mapping[str, str] | None = None) -> Path:
    """The weights cache folder: ``$CXRAGE_HOME/weights``, else ``$XDG_CACHE_HOME/cxrage/weights``,
    else ``~/.cache/cxrage/weights``.

    Args:
        env: the environment to read; the CLI passes ``os.environ`` (None means ``os.environ`` too).
    """
    env = os.environ if env is None else env
    if env.get("CXRAGE_HOME"):
        return Path(env["CXRAGE_HOME"]).expanduser() / "weights"
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "cxrage" / "weights"
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".cache" / "cxrage" / "weights"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def _write_sidecar(path: Path, sha256: str) -> None:
    stat = path.stat()
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    try:
        write_atomic(_sidecar(path), json.dumps(record).encode("utf-8"))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def cached_sha256(path: Path) -> str:
    """sha256 of `path`, taken from its sidecar when size and mtime still match, else computed (and recorded)."""
    stat = path.stat()
    try:
        record = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        if record["size"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    sha256 = sha256_file(path)
    _write_sidecar(path, sha256)
    return sha256


def how_to_obtain(spec: WeightsSpec, home: Path) -> str:
    """The three ways to get `spec`'s weights, for error messages."""
    return (
        "Get them in one of these ways:\n"
        f"  1. run `cxrage weights fetch` (downloads {spec.size:,} bytes from the URL below, verifies the sha256 "
        f"and stores the file as {home / spec.file});\n"
        f"  2. download {spec.url} yourself (on a machine with internet access) and put it at "
        f"{home / spec.file} (size {spec.size:,} bytes, sha256 {spec.sha256});\n"
        "  3. pass `--weights PATH` to use a checkpoint you already have (fastai .pth, state dict or .safetensors).\n"
        "The cache folder is $CXRAGE_HOME/weights, else $XDG_CACHE_HOME/cxrage/weights, else ~/.cache/cxrage/weights."
    )


def _open(url: str, offset: int) -> "urllib.response.addinfourl | None":
    """GET `url`, asking for bytes from `offset` on; None when the server says that range is empty (416)."""
    headers = {"User-Agent": "cxrage-ray"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return None
        raise


def _download(url: str, part: Path, spec: WeightsSpec, progress: bool) -> "hashlib._Hash":
    """Bring `part` up to `spec.size` bytes from `url`, resuming what is there; return the sha256 of `part`."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    digest = hashlib.sha256()
    response = _open(url, offset)
    if response is None:  # nothing left to send: the part is complete (or too long; verification decides)
        hash_file_into(part, digest)
        return digest
    with response:
        content_range = response.headers.get("Content-Range", "")
        if offset and response.status == 206 and content_range.startswith(f"bytes {offset}-"):
            hash_file_into(part, digest)
            mode = "ab"
        else:  # the server ignored the Range header: start over
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and offset + int(length) != spec.size:
            # a wrong file (an HTML error page, another model): refuse before downloading it
            raise WeightsError(
                f"{url} serves {offset + int(length):,} bytes, but {spec.id} has {spec.size:,}; check the URL "
                "(or mirror)"
            )
        with open(part, mode) as out, tqdm(total=spec.size, initial=offset, unit="B", unit_scale=True,
                                           desc=spec.file, disable=not progress, file=sys.stderr) as bar:
            written = offset
            while chunk := response.read(_CHUNK):
                written += len(chunk)
                if written > spec.size:
                    raise WeightsError(f"{url} sent more than the expected {spec.size:,} bytes")
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if written < spec.size:  # http.client may end a cut-off body quietly instead of raising
            raise ConnectionError(f"the connection closed after {written:,} of {spec.size:,} bytes")
    return digest


def fetch_weights(spec: WeightsSpec, dest_dir: Path, progress: bool = True, url: str | None = None) -> Path:
    """Download `spec` into `dest_dir`, verify its size and sha256, and return the final path.

    The bytes go to ``<file>.part``; an interrupted download resumes from there with an HTTP Range
    request. Only a verified file is renamed (atomically) to ``<file>``. An already cached, verified
    file is returned without a download.

    Args:
        spec: the registry entry.
        dest_dir: the cache folder (see `weights_home`).
        progress: show a tqdm progress bar on stderr.
        url: download from here instead of ``spec.url`` (e.g. an internal mirror).

    Raises:
        WeightsError: network failure (the part file is kept for a resume), or a size/sha256 mismatch
            (the part file is deleted).
    """
    url = url or spec.url
    dest_dir = Path(dest_dir).expanduser()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / spec.file
    if dest.is_file() and dest.stat().st_size == spec.size and cached_sha256(dest) == spec.sha256:
        return dest
    part = dest.with_name(dest.name + ".part")
    if part.exists() and part.stat().st_size > spec.size:
        part.unlink()
    try:
        digest = _download(url, part, spec, progress)
    except WeightsError:
        part.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        # HTTP errors, refused/reset connections, timeouts, a body cut short, a malformed URL
        have = part.stat().st_size if part.exists() else 0
        kept = (f" {have:,} of {spec.size:,} bytes are in {part} and the next `cxrage weights fetch` resumes "
                "from there." if have else "")
        raise WeightsError(
            f"downloading {url} failed ({type(exc).__name__}: {exc}).{kept}\n" + how_to_obtain(spec, dest_dir)
        ) from exc
    size = part.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        part.unlink()
        raise WeightsError(
            f"the file downloaded from {url} is not {spec.id}: got {size:,} bytes with sha256 "
            f"{digest.hexdigest()}, expected {spec.size:,} bytes with sha256 {spec.sha256}. The partial file "
            "was deleted; check the URL (or mirror) and retry."
        )
    move_into_place(part, dest)  # only a verified file gets the real name, flushed to disk first
    _write_sidecar(dest, spec.sha256)
    return dest


def resolve_weights(path: str | None, home: Path, allow_fetch: bool, *, spec: WeightsSpec | None = None,
                    progress: bool = True) -> ResolvedWeights:
    """Decide which weights file a job uses.

    Args:
        path: a weights file chosen by the user (any form `load_state_dict` reads), or None for the
            published model.
        home: the weights cache folder (see `weights_home`).
        allow_fetch: download the published model when it is not cached.
        spec: the registry entry to use when `path` is None (default: the published model).
        progress: show a progress bar while fetching.

    Raises:
        WeightsError: the file is missing, the cached copy fails verification, or it is not cached and
            cannot be fetched (the message says how to obtain it).
    """
    if path is not None:
        explicit = Path(path).expanduser()
        if not explicit.is_file():
            raise WeightsError(f"weights file not found: {path} (--weights expects a .pth or .safetensors file)")
        return ResolvedWeights(explicit.resolve(), sha256_file(explicit), "explicit")
    spec = spec or load_registry()[DEFAULT_MODEL]
    home = Path(home).expanduser()
    cached = home / spec.file
    if cached.is_file():
        size = cached.stat().st_size
        sha256 = cached_sha256(cached)
        if size != spec.size or sha256 != spec.sha256:
            raise WeightsError(
                f"the cached {cached} is not the published {spec.id} ({size:,} bytes, sha256 {sha256}; expected "
                f"{spec.size:,} bytes, sha256 {spec.sha256}). Delete it and run `cxrage weights fetch`, or pass "
                "`--weights PATH` to use it deliberately."
            )
        return ResolvedWeights(cached, sha256, "cache")
    if not allow_fetch:
        raise WeightsError(
            f"the published CXR-Age weights ({spec.file}) are not in the weights cache {home} and fetching is "
            "disabled (--no-fetch).\n" + how_to_obtain(spec, home)
        )
    return ResolvedWeights(fetch_weights(spec, home, progress=progress), spec.sha256, "fetched")


#: `weights_name` of the seeded random weights (`--weights demo`, `cxrage_ray.model.demo`): every row, record and
#: served answer scored with them says so, and the report and the serve page show a red banner.
DEMO_WEIGHTS_NAME = "demo"


def weights_label(requested: str | None) -> str | None:
    """The name `--weights` itself gives the weights (`ScoreConfig`/`ServeConfig.weights_name`): `demo` for the demo
    weights, None for a file or the published model (named by `weights_name` once resolved)."""
    return DEMO_WEIGHTS_NAME if requested == DEMO_WEIGHTS_NAME else None


def weights_name(label: str | None, resolved: ResolvedWeights) -> str:
    """What the weights are, written beside their sha256 in every output row and served answer: `label`
    (`weights_label`) when given, else the published model's registry id, else the weights file's name."""
    return label or (DEFAULT_MODEL if resolved.source != "explicit" else resolved.path.name)
