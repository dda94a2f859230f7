"""`cxrage preprocess`: every input -> `<stem>.png`, the 8-bit image the seed chain produces.

In:  a folder/prefix or manifest (see `cxrage_ray.manifest.build`).
Out: OUTDIR/<image_id without extension>.png for each decodable input (grey when all channels are equal,
     as ImageMagick writes it); the number of inputs that failed (each reported on stderr by image_id).

Runs in a local process pool, not on Ray: it is a conversion tool for inspecting and comparing the
pixels the model sees, not an archive-scale job. `engine="tensor"` writes the GPU path's pictures instead
(`cxrage_ray.preprocess.tensor`, GPU decode where it applies), in this process, on the GPU when there is one.
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

from cxrage_ray.config import DecodeOptions
from cxrage_ray.decode.image import decode_image
from cxrage_ray.errors import error_text
from cxrage_ray.manifest.build import PROBLEM_COLUMN, build_manifest
from cxrage_ray.config import StorageConfig
from cxrage_ray.storage.files import read_bytes


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
    write_whole(dest, png)
    return None


def write_whole(dest: Path, data: bytes) -> None:
    """Write a file that appears whole or not at all (temporary name, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(dest)


class TensorExporter:
    """`export_one` for the tensor engine: one decoder and seed chain on this process's device."""

    def __init__(self) -> None:
        import torch

        from cxrage_ray.decode.gpu import FrameDecoder
        from cxrage_ray.preprocess.tensor import TensorSeedChain

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.decoder = FrameDecoder(device)
        self.chain = TensorSeedChain(device)

    def __call__(self, uri: str, dest: Path, storage: StorageConfig, options: DecodeOptions) -> str | None:
        import torch

        from cxrage_ray.decode.image import is_dicom
        from cxrage_ray.preprocess.seed_chain import encode_png
        from cxrage_ray.preprocess.tensor import dicom_q16_tensor

        try:
            data = read_bytes(uri, storage)
            alpha = None
            if is_dicom(data, uri):
                from cxrage_ray.decode.dicom import encoded_first_frame

                frame = encoded_first_frame(data, options)
                if frame.codec in ("j2k", "jpeg"):
                    stored = self.decoder.decode([frame])[0]
                    if isinstance(stored, BaseException):
                        raise stored
                    q16 = dicom_q16_tensor(stored.values, frame.params)
                else:
                    q16 = torch.from_numpy(decode_image(data, uri, options).q16().astype("int32"))
            else:
                decoded = decode_image(data, uri, options)
                q16 = torch.from_numpy(decoded.q16().astype("int32"))
                alpha = None if decoded.alpha is None else torch.from_numpy(decoded.alpha.astype("int32"))
            pixels, alpha8 = self.chain.picture(q16, alpha)
            png = encode_png(pixels.cpu().numpy(), None if alpha8 is None else alpha8.cpu().numpy())
        except Exception as exc:  # report and go on: one bad file must not stop the conversion
            return error_text(exc)
        write_whole(dest, png)
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
                print(f"cxrage preprocess: {dest.name}: {error}", file=sys.stderr)
    failures = unwritten + int(marked.sum())
    print(f"cxrage preprocess: {len(jobs) - unwritten} written, {failures} failed -> {outdir}", file=sys.stderr)
    return failures
