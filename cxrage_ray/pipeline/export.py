"""`cxrage preprocess`: every input -> `<stem>.png`, the 8-bit image the seed chain produces.

In:  a folder/prefix or manifest (see `cxrage_ray.manifest.build`).
Out: OUTDIR/<image_id without extension>.png for each decodable input (grey when all channels are equal,
     as ImageMagick writes it); the number of inputs that failed (each named on stderr by its file name, as
     `cxrage score` names failed films: `runtime.console.named_error`).

Runs in a local process pool, not on Ray: it is a conversion tool for inspecting and comparing the
pixels the model sees, not an archive-scale job. `engine="tensor"` writes the GPU path's pictures instead
(`cxrage_ray.preprocess.tensor`, GPU decode where it applies), in this process, on the GPU when there is one.
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from cxrage_ray.config import DecodeOptions, PrepareSettings, StorageConfig
from cxrage_ray.contract import PROBLEM_COLUMN, png_name
from cxrage_ray.decode.image import decode_image
from cxrage_ray.errors import error_text
from cxrage_ray.manifest.build import build_manifest
from cxrage_ray.storage.atomic import write_atomic
from cxrage_ray.pacs.read import read_bytes
from cxrage_ray.runtime.console import named_error


def export_one(uri: str, dest: Path, storage: StorageConfig, options: DecodeOptions) -> str | None:
    """Write one seed-chain PNG; returns None on success or the error text."""
    from cxrage_ray.preprocess.seed_chain import seed_chain_png

    try:
        png = seed_chain_png(decode_image(read_bytes(uri, storage), uri, options))
    except Exception as exc:  # report and go on: one bad file must not stop the conversion
        return error_text(exc)
    write_atomic(dest, png)
    return None


class TensorExporter:
    """`export_one` for the tensor engine: the device itinerary's own prepare (`payloads.encode_row`) and decode
    (`device_pictures.PayloadDecoder`) of one file, then the tensor seed chain, on this process's device."""

    def __init__(self) -> None:
        import torch

        from cxrage_ray.pipeline.device_pictures import PayloadDecoder

        self.payloads = PayloadDecoder(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def __call__(self, uri: str, dest: Path, storage: StorageConfig, options: DecodeOptions) -> str | None:
        import pandas as pd

        from cxrage_ray.pipeline.payloads import encode_row
        from cxrage_ray.preprocess.png import encode_png

        try:
            payload, _ = encode_row(read_bytes(uri, storage), uri, PrepareSettings(storage=storage, decode=options))
            row = pd.DataFrame([{"status": "ok", "error": None, **payload}])
            decoded = self.payloads.decode(row)
            if row["status"].iat[0] != "ok":
                return str(row["error"].iat[0])
            pixels, alpha8 = self.payloads.chain.picture(*decoded[0])
            png = encode_png(pixels.cpu().numpy(), None if alpha8 is None else alpha8.cpu().numpy())
        except Exception as exc:  # report and go on: one bad file must not stop the conversion
            return error_text(exc)
        write_atomic(dest, png)
        return None


def export_seed_chain_pngs(
    input: str, outdir: str, storage: StorageConfig, options: DecodeOptions, workers: int = 1,
    engine: str = "exact",
) -> int:
    """Convert every input with the `exact` (CPU process pool) or `tensor` engine; returns the number of failures."""
    manifest = build_manifest(input, storage)
    marked = manifest[PROBLEM_COLUMN].notna()  # empty uri, duplicate image_id: nothing to convert
    for problem in manifest.loc[marked, PROBLEM_COLUMN]:
        print(f"cxrage preprocess: ManifestError: {problem}", file=sys.stderr)
    manifest = manifest[~marked]
    out = Path(outdir)
    jobs = [(row.uri, out / png_name(row.image_id)) for row in manifest.itertuples()]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        if engine == "tensor":
            convert = TensorExporter()
            results = map(convert, [u for u, _ in jobs], [d for _, d in jobs], [storage] * len(jobs),
                          [options] * len(jobs))
        else:
            results = pool.map(export_one, [u for u, _ in jobs], [d for _, d in jobs],
                               [storage] * len(jobs), [options] * len(jobs), chunksize=8)
        unwritten = 0
        for (uri, dest), error in zip(jobs, results):
            if error is not None:
                unwritten += 1
                failed = named_error(uri, error)  # named as `cxrage score` names a failed film
                print(f"cxrage preprocess: {failed['film']}: {failed['error']}", file=sys.stderr)
    failures = unwritten + int(marked.sum())
    print(f"cxrage preprocess: {len(jobs) - unwritten} written, {failures} failed -> {outdir}", file=sys.stderr)
    return failures
