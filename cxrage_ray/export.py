"""`cxrage preprocess`: every input -> `<stem>.png`, the 8-bit image the seed chain produces.

In:  a folder/prefix or manifest (see `cxrage_ray.manifest`).
Out: OUTDIR/<image_id without extension>.png for each decodable input (grey when all channels are equal,
     as ImageMagick writes it); the number of inputs that failed (each reported on stderr by image_id).

Runs in a local process pool, not on Ray: it is a conversion tool for inspecting and comparing the
pixels the model sees, not an archive-scale job.
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

from cxrage_ray.decode import DecodeOptions, decode_image
from cxrage_ray.errors import error_text
from cxrage_ray.manifest import build_manifest
from cxrage_ray.storage import StorageConfig, read_bytes


def png_name(image_id: str) -> str:
    """`a/b/film.dcm` -> `a/b/film.png` (sub-folders kept so equal stems in different folders don't collide)."""
    return str(PurePosixPath(image_id).with_suffix(".png"))


def export_one(uri: str, dest: Path, storage: StorageConfig, options: DecodeOptions) -> str | None:
    """Write one seed-chain PNG; returns None on success or the error text."""
    from cxrage_ray.preprocess.seed_chain import seed_chain_png

    try:
        png = seed_chain_png(decode_image(read_bytes(uri, storage), uri, options))
    except Exception as exc:  # report and go on: one bad file must not stop the conversion
        return error_text(exc)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".png.tmp")
    tmp.write_bytes(png)
    tmp.replace(dest)
    return None


def export_seed_chain_pngs(
    input: str, outdir: str, storage: StorageConfig, options: DecodeOptions, workers: int = 1
) -> int:
    """Convert every input; returns the number of failures."""
    manifest = build_manifest(input, storage)
    out = Path(outdir)
    jobs = [(row.uri, out / png_name(row.image_id)) for row in manifest.itertuples()]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(export_one, [u for u, _ in jobs], [d for _, d in jobs],
                           [storage] * len(jobs), [options] * len(jobs), chunksize=8)
        failures = 0
        for (uri, dest), error in zip(jobs, results):
            if error is not None:
                failures += 1
                print(f"cxrage preprocess: {dest.name}: {error}", file=sys.stderr)
    print(f"cxrage preprocess: {len(jobs) - failures} written, {failures} failed -> {outdir}", file=sys.stderr)
    return failures
