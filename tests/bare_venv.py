"""A virtual environment holding only some distributions of this one (and what they require), for checking that a
script runs on a machine that has just those — the GPU benchmark machine has torch, numpy, pillow, pandas and
pyarrow, and no Ray, pydicom or install of this project.

The distributions are not reinstalled (torch is gigabytes): their top-level files are symlinked into a folder
that a ``.pth`` file puts on the new environment's path, after its own site-packages, where ``pip install``
still puts anything else.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(names: list[str]) -> list[metadata.Distribution]:
    """`names` and every distribution they require on this platform (extras left out), as installed here."""
    seen: dict[str, metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement not installed here: not on the GPU machine either
        seen[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return list(seen.values())


def owned_paths(dist: metadata.Distribution, shared: set[str]) -> set[Path]:
    """What a distribution put in site-packages, relative to it: its top-level packages, modules, .libs and
    dist-info — and inside a folder several distributions share (``nvidia/``) only its own sub-folders, so that
    the folder stays a namespace that a package installed later into the venv (nvImageCodec) joins."""
    site = Path(str(dist.locate_file("")))
    owned = set()
    for file in dist.files or []:
        parts = Path(str(file)).parts
        if not parts or parts[0] in ("..", "__pycache__"):
            continue
        if parts[0] in shared:
            if len(parts) > 2:  # nvidia/cublas/..., not nvidia/__init__.py
                owned.add(Path(*parts[:2]))
        else:
            owned.add(Path(parts[0]))
    return {path for path in owned if (site / path).exists()}


def shared_folders(dists: list[metadata.Distribution]) -> set[str]:
    """Top-level folders that files of more than one of `dists` live in."""
    owners: dict[str, set[str]] = {}
    for dist in dists:
        for file in dist.files or []:
            parts = Path(str(file)).parts
            if len(parts) > 1 and parts[0] != "..":
                owners.setdefault(parts[0], set()).add(dist.metadata["Name"])
    return {top for top, names in owners.items() if len(names) > 1}


def make_bare_venv(root: Path, names: list[str]) -> Path:
    """A venv at `root` (with pip) whose Python sees only `names` and their requirements; its python's path."""
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    linked = root / "linked-site"
    linked.mkdir()
    dists = closure(names)
    shared = shared_folders(dists)
    for dist in dists:
        site = Path(str(dist.locate_file("")))
        for path in owned_paths(dist, shared):
            target = linked / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(site / path)
    (site,) = (root / "lib").glob("python*/site-packages")
    (site / "zz_linked.pth").write_text(f"{linked}\n")
    return root / "bin" / "python"
