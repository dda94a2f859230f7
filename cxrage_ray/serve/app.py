"""The HTTP ingress: FastAPI routes for the page, the scoring API and the docs, on Ray Serve (`serve.ingress`).

Routes:
    GET  /             the page for non-programmers (static/index.html; every asset served from here, no CDN),
                       opening with the report's red banner when the weights are the demo ones
    POST /v1/score     multipart form, a `files` part per file (+ optional `age` parts, aligned with the files);
                       `?saliency=gradcam|grad` adds the map, `?picture=true` the film as scored (PNG data URIs)
                       -> JSON array in upload order, one object per file
    GET  /v1/model     weights sha256, versions, preprocessing/TTA and batching settings
    GET  /v1/stats     the model replica's batching figures (batches run, mean batch size)
    GET  /healthz      200 when the prepare and model replicas answer
    GET  /docs         Swagger UI (bundled assets), /openapi.json

Every /v1/score answer carries `weights_name` (`demo` for the demo weights), as every batch row does.

Status codes of /v1/score: 413 over the size limit (before parsing); for a one-file request 415 when the
file is no image at all and 422 with the batch scorer's "<Kind>: message" for an undecodable image, a
refused modality or a decompression bomb; a several-file request answers 200 with `status: "error"` objects
for its bad files, so one bad film never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import math
import platform
from importlib.resources import files
from typing import Any, Literal

import ray
from fastapi import FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from swagger_ui_bundle import swagger_ui_path

from cxrage_ray.contract import PLAUSIBLE_AGE
from cxrage_ray.errors import CxrAgeError, error_text
from cxrage_ray.model.registry import DEMO_WEIGHTS_NAME
from cxrage_ray.report.page import demo_banner_html
from cxrage_ray.serve.config import ServeConfig
from cxrage_ray.serve.scoring import (
    ScoreOptions,
    Upload,
    check_is_image,
    error_object,
    is_not_an_image,
)
from cxrage_ray.serve.uploads import BadForm, UploadTooLarge, parse_multipart, read_body

RESEARCH_USE = "For research use only. Not for clinical care."
#: OpenAPI 3.0 so the bundled Swagger UI (4.x) renders it.
OPENAPI_VERSION = "3.0.3"
SCORE_FORM_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["files"],
            "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                          "description": "one part per file: PNG, JPEG, TIFF or DICOM"},
                "age": {"type": "array", "items": {"type": "string"},
                        "description": "optional chronological age in years per file, in the files' order "
                                       "(blank = unknown); a DICOM's PatientAge takes precedence"},
            },
        }}},
    },
    "responses": {
        "200": {"description": "JSON array in upload order: per file `filename`, `status` (ok/error), `error`, "
                               "`cxr_age`, `raw`, `raw_sd`, `chronological_age`, `cxr_age_gap`, `qc`, ... "
                               "(the output contract of `cxrage score`)"},
        "413": {"description": "request body over the size limit"},
        "415": {"description": "one-file request: the file is not a PNG, JPEG, TIFF or DICOM"},
        "422": {"description": "one-file request: undecodable image, refused modality or decompression bomb "
                               "(`error` = the batch scorer's `<Kind>: message`)"},
    },
}


@serve.ingress()
class ScoreAPI:
    """Ray Serve ingress deployment; the FastAPI app is built per replica by `__serve_build_asgi_app__`.

    Args:
        preparer: handle to the `FilmPreparer` deployment (decode, seed chain, orientation).
        scorer: handle to the `FilmScorer` model deployment.
        cfg: the server's `ServeConfig`.
    """

    def __init__(self, preparer, scorer, cfg: ServeConfig):
        self.preparer = preparer
        self.scorer = scorer
        self.cfg = cfg

    def __serve_build_asgi_app__(self):
        return build_fastapi(self.preparer, self.scorer, self.cfg)


def build_fastapi(preparer, scorer, cfg: ServeConfig):
    """The FastAPI app of one ingress replica (routes: see the module docstring)."""
    static = files("cxrage_ray.serve") / "static"
    app = FastAPI(title="cxrage serve", version=_version(), docs_url=None, redoc_url=None,
                  description=f"CXR-Age (Raghu et al. 2021) for uploaded chest radiographs. {RESEARCH_USE}")
    app.openapi_version = OPENAPI_VERSION
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    app.mount("/docs-assets", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    index = page_html((static / "index.html").read_text(encoding="utf-8"), cfg.weights_name)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="cxrage serve API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.get("/healthz", summary="200 when the prepare and model replicas answer")
    async def healthz() -> JSONResponse:
        try:
            await asyncio.wait_for(asyncio.gather(scorer.stats.remote(), preparer.ready.remote()), timeout=30)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "detail": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/model", summary="weights sha256, versions, preprocessing and TTA settings")
    async def model() -> JSONResponse:
        info = dict(await scorer.model_info.remote())
        return JSONResponse({
            **info,
            "weights_file": cfg.weights_path.rsplit("/", 1)[-1],
            "preprocess": {"decode": cfg.decode.mode, "seed_chain": "mogrify -trim +repage -colorspace RGB "
                           "-auto-level -depth 8 -resize 512x512^ (ImageMagick 6.9.11 Q16, bit-exact)",
                           "orientation": cfg.orient.mode, "allow_any_modality": cfg.decode.allow_any_modality,
                           "max_pixels": cfg.decode.max_pixels},
            "batching": {"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
            "limits": {"max_upload_mb": cfg.max_upload_mb, "max_files": cfg.max_files},
            "versions": {**info.pop("versions", {}), "ray": ray.__version__, "python": platform.python_version()},
            "notice": RESEARCH_USE,
        })

    @app.get("/v1/stats", summary="batching figures of the model replica")
    async def stats() -> JSONResponse:
        return JSONResponse(await scorer.stats.remote())

    @app.post("/v1/score", summary="score one or more radiographs", openapi_extra=SCORE_FORM_SCHEMA)
    async def score(request: Request,
                    saliency: Literal["gradcam", "grad"] | None = Query(
                        None, description="add the saliency map (Grad-CAM or the original's input gradient)"),
                    picture: bool = Query(False, description="add the film as scored (after orientation)"),
                    ) -> JSONResponse:
        try:
            body = await read_body(request.headers, request.stream(), cfg.max_upload_bytes)
        except UploadTooLarge as exc:
            return JSONResponse({"detail": f"{exc} (--max-upload-mb {cfg.max_upload_mb:g})"}, status_code=413)
        try:
            uploads = _uploads(parse_multipart(request.headers.get("content-type", ""), body,
                                               max_parts=2 * cfg.max_files), cfg.max_files)
        except BadForm as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        del body
        options = ScoreOptions(saliency=saliency, picture=picture)
        results = await asyncio.gather(*(_score_one(preparer, scorer, u, options, i)
                                         for i, u in enumerate(uploads)))
        for result in results:  # files refused before the model too: every answer says what would score it
            result["weights_name"] = cfg.weights_name
        if len(results) == 1 and results[0]["status"] == "error":
            (result,) = results
            status = 415 if is_not_an_image(result) else 422
            return JSONResponse({"detail": result["error"], **result}, status_code=status)
        return JSONResponse(results)

    return app


def page_html(index: str, weights_name: str | None) -> str:
    """The page (static/index.html), opening with the report's red banner when the weights are the demo ones."""
    if weights_name != DEMO_WEIGHTS_NAME:
        return index
    return index.replace("<body>", "<body>\n" + demo_banner_html(), 1)


async def _score_one(preparer, scorer, upload: Upload, options: ScoreOptions, position: int) -> dict[str, Any]:
    """One file: prepare deployment -> model deployment; a file that is no image is answered here, right away."""
    try:
        check_is_image(upload)
    except CxrAgeError as exc:
        return error_object(upload.filename, position, error_text(exc))
    try:
        # the prepared row goes from the preparer to the model through the object store, not through here
        return await scorer.score.remote(preparer.prepare.remote(upload, position), options)
    except Exception as exc:  # the replica failed (not the file): report it on this file, keep the others
        return error_object(upload.filename, position, f"ServerError: scoring failed ({type(exc).__name__})")


def _uploads(parts, max_files: int) -> list[Upload]:
    """Multipart parts -> `Upload`s: every `files` part with a file name, ages aligned by order."""
    file_parts = [p for p in parts if p.name == "files" and p.filename is not None]
    ages = [p for p in parts if p.name == "age"]
    if not file_parts:
        raise BadForm("no file: send each file as a `files` part of a multipart/form-data body")
    if len(file_parts) > max_files:
        raise BadForm(f"{len(file_parts)} files; at most {max_files} per request")
    if len(ages) > len(file_parts):
        raise BadForm("more `age` fields than files")
    uploads = []
    for i, part in enumerate(file_parts):
        age = _age(bytes(ages[i].data)) if i < len(ages) else None
        uploads.append(Upload(filename=part.filename or f"file-{i}", data=bytes(part.data), age=age))
    return uploads


def _age(text: bytes) -> float | None:
    value = text.decode("utf-8", "replace").strip()
    if not value:
        return None
    try:
        age = float(value)
    except ValueError:
        raise BadForm(f"age {value[:20]!r} is not a number of years") from None
    low, high = PLAUSIBLE_AGE  # the rule every scored row follows (cxrage_ray.contract)
    if not math.isfinite(age) or not low <= age <= high:
        raise BadForm(f"age {value[:20]!r} is not between {low:g} and {high:g} years")
    return age


def _version() -> str:
    import cxrage_ray

    return cxrage_ray.__version__
