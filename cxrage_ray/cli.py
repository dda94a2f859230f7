"""`cxrage` command line: argument parsing only; every subcommand calls into the modules that do the work.

Exit codes: 0 all rows ok; 3 the job finished but some rows are error rows (see the output's `error`
column and summary.json); 2 a usage, input or weights error (nothing scored); 130 interrupted
(rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

from cxrage_ray.errors import CxrAgeError, InputError

EXIT_OK, EXIT_ROW_ERRORS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 3, 2, 130


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec/s3fs option, e.g. endpoint_url=http://127.0.0.1:9000 or anon=true (repeatable)")


def _add_decode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decode", choices=["fast", "exact"], default="exact",
                   help="fast: reduced-resolution JPEG 2000 / JPEG decode (see docs/dicom.md); default exact")
    p.add_argument("--allow-any-modality", action="store_true",
                   help="score DICOM modalities that are not radiographs (CT, MR, ...) instead of refusing them")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrage", description="CXR-Age for every chest radiograph in an archive.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score a folder or manifest into Parquet under OUTPUT")
    s.add_argument("input", help="folder/prefix (recursive) or CSV/Parquet manifest with a `uri` column")
    s.add_argument("output", help="output folder (local or s3://) that receives Parquet parts and summary.json")
    s.add_argument("--weights", help="weights file (fastai .pth, state_dict, .safetensors) or `demo`; "
                   "default: the published PLCO_Fine_Tuned_120419 model, fetched on first use")
    s.add_argument("--no-fetch", action="store_true", help="never download weights")
    s.add_argument("--tta", choices=["seed", "none"], default="seed")
    s.add_argument("--preprocess", choices=["seed", "none"], default="seed",
                   help="seed: apply the original ImageMagick chain; none: inputs are seed-chain PNGs already")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16/fp16 autocast on GPU, fp32 on CPU")
    s.add_argument("--batch-size", type=int, default=0,
                   help="model views per forward pass (5 per image with TTA); default: 640 on GPU, 64 on CPU")
    s.add_argument("--saliency", metavar="DIR", help="write a saliency map per film as DIR/<stem>.png (local or s3://)")
    s.add_argument("--saliency-method", choices=["grad", "gradcam"], default="grad",
                   help="grad: the original's input-gradient map; gradcam: Grad-CAM on the last conv stage")
    s.add_argument("--csv", help="also write the original tool's CSV (File, SD_Prediction, CXR_Age)")
    s.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="join this Ray cluster (default: $RAY_ADDRESS, else an embedded local Ray)")
    s.add_argument("--num-cpus", type=int, help="logical CPUs for the embedded local Ray")
    s.add_argument("--predict-actors", type=int, default=1, help="predictor actors when running on CPU")
    s.add_argument("--rotation", choices=["auto", "list", "off"], default="auto",
                   help="auto: rotation list, then DICOM orientation, then our orientation model; list: the list only")
    s.add_argument("--rotation-list", metavar="CSV",
                   help="the original's list (one file name per line = rotate 90 clockwise) or `file,degrees`")
    s.add_argument("--skip-flagged", action="store_true",
                   help="do not score films with QC flags (lateral, blank, paediatric, orientation_uncertain)")
    s.add_argument("--keep-patient-id", metavar="SALT",
                   help="add patient_id_hash = sha256(SALT + PatientID) for DICOM rows (never the raw ID)")
    s.add_argument("--no-progress-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="stop (resumably) when no image finishes for this long instead of waiting forever")
    s.add_argument("--part-rows", type=int, default=10_000, help="rows per output Parquet part")
    s.add_argument("--overwrite", action="store_true", help="discard results of a different job in OUTPUT")
    s.add_argument("--retry-errors", action="store_true",
                   help="score this job's error rows again (without it a rerun scores only missing rows)")
    s.add_argument("--retry-kinds", metavar="KINDS",
                   help="retry only error rows of these comma-separated kinds, e.g. ReadError,DecodeError "
                   "(implies --retry-errors)")
    s.add_argument("--no-progress", action="store_true")
    _add_decode(s)
    _add_storage(s)

    pp = sub.add_parser("preprocess", help="write the seed-chain PNG the original fed to fastai, per input")
    pp.add_argument("input")
    pp.add_argument("outdir")
    pp.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    pp.add_argument("--decode", choices=["fast", "exact"], default="exact")
    _add_storage(pp)

    w = sub.add_parser("weights", help="manage model weights")
    wsub = w.add_subparsers(dest="weights_command", required=True)
    f = wsub.add_parser("fetch", help="download and verify the published weights into the cache")
    f.add_argument("--url", help="alternative download URL (e.g. an internal mirror)")
    c = wsub.add_parser("convert", help="convert any supported checkpoint to .safetensors")
    c.add_argument("src")
    c.add_argument("dst")
    d = wsub.add_parser("demo", help="write seeded random weights in the published format (NOT a real model)")
    d.add_argument("dst")
    wsub.add_parser("where", help="print the weights cache folder")

    m = sub.add_parser("manifest", help="list a folder/prefix once into a reusable Parquet manifest")
    m.add_argument("prefix")
    m.add_argument("out")
    _add_storage(m)

    sv = sub.add_parser("serve", help="web page + scoring API on Ray Serve (research use only)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default loopback; put a TLS reverse proxy in front, see README)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--weights", help="as for `score`: weights file or `demo`; default: the published model")
    sv.add_argument("--no-fetch", action="store_true", help="never download weights")
    sv.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    sv.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    sv.add_argument("--batch-size", type=int, default=0,
                    help="model views per forward pass (5 per film with TTA); default: 640 on GPU, 64 on CPU")
    sv.add_argument("--max-upload-mb", type=float, default=64.0, help="refuse larger request bodies with 413")
    sv.add_argument("--max-batch-films", type=int, default=16, help="films per model batch (@serve.batch)")
    sv.add_argument("--batch-wait-ms", type=float, default=50.0,
                    help="how long the first film of a batch waits for more")
    sv.add_argument("--prepare-replicas", type=int, default=1,
                    help="replicas that decode films (decode, seed chain, orientation) for the model replica")
    sv.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                    help="join this Ray cluster (default: $RAY_ADDRESS, else an embedded local Ray)")
    sv.add_argument("--num-cpus", type=int, help="logical CPUs for the embedded local Ray")
    sv.add_argument("--decode", choices=["fast", "exact"], default="exact")

    r = sub.add_parser("report", help="write OUTPUT/report.html and OUTPUT/analysis.json")
    r.add_argument("output")
    r.add_argument("--time-col")
    r.add_argument("--event-col")
    _add_storage(r)
    return parser


def _storage(args: argparse.Namespace, env: Mapping[str, str]):
    from cxrage_ray.storage import StorageConfig

    return StorageConfig.from_env_and_pairs(env, args.storage_option)


def _weights_home(env: Mapping[str, str]) -> Path:
    from cxrage_ray.registry import weights_home

    return weights_home(env)


def cmd_score(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from cxrage_ray.config import RayConfig, ScoreConfig
    from cxrage_ray.decode import DecodeOptions
    from cxrage_ray.pipeline import score
    from cxrage_ray.predict import PredictorConfig
    from cxrage_ray.orient import OrientConfig, load_rotation_list
    from cxrage_ray.stages import SaliencySettings

    storage = _storage(args, env)
    weights = args.weights
    if weights == "demo":
        weights = str(_demo_weights(_weights_home(env)))
    cfg = ScoreConfig(
        input=args.input,
        output=args.output,
        weights=weights,
        allow_fetch=not args.no_fetch,
        storage=storage,
        decode=DecodeOptions(mode=args.decode, allow_any_modality=args.allow_any_modality,
                             patient_id_salt=args.keep_patient_id),
        preprocess=args.preprocess,
        predictor=PredictorConfig(device=args.device, precision=args.precision, tta=args.tta,
                                  batch_size=args.batch_size),
        ray=RayConfig(address=args.ray_address, num_cpus=args.num_cpus, predict_actors=args.predict_actors,
                      no_progress_timeout_s=args.no_progress_timeout),
        orient=OrientConfig(mode=args.rotation, skip_flagged=args.skip_flagged,
                            rotation_list=load_rotation_list(args.rotation_list) if args.rotation_list else None),
        saliency=SaliencySettings(args.saliency, args.saliency_method, storage) if args.saliency else None,
        csv=args.csv,
        part_rows=args.part_rows,
        overwrite=args.overwrite,
        retry_errors=_retry_kinds(args),
        progress=not args.no_progress,
    )
    summary = score(cfg, _weights_home(env))
    print(
        f"cxrage: {summary['rows_ok']} ok, {summary['rows_error']} error of {summary['rows_total']} rows "
        f"({summary['rows_scored_this_run']} scored this run, {summary['images_per_s'] or 0:.1f} images/s) "
        f"-> {args.output}",
        file=sys.stderr,
    )
    if summary["errors_by_kind"]:
        print(f"cxrage: errors by kind: {json.dumps(summary['errors_by_kind'])}", file=sys.stderr)
    return EXIT_ROW_ERRORS if summary["rows_error"] else EXIT_OK


def _demo_weights(home: Path) -> Path:
    from cxrage_ray.demo import write_demo_checkpoint

    path = home / "demo-random-seed0.pth"
    if not path.exists():
        write_demo_checkpoint(path)
    print(f"cxrage: using DEMO weights {path} (random, NOT the published model: ages are meaningless)",
          file=sys.stderr)
    return path


def cmd_weights(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from cxrage_ray import registry
    from cxrage_ray.checkpoint import convert_to_safetensors

    home = _weights_home(env)
    if args.weights_command == "fetch":
        spec = registry.load_registry()[registry.DEFAULT_MODEL]
        print(registry.fetch_weights(spec, home, progress=True, url=args.url))
    elif args.weights_command == "convert":
        print(convert_to_safetensors(args.src, args.dst))
    elif args.weights_command == "demo":
        from cxrage_ray.demo import write_demo_checkpoint

        write_demo_checkpoint(Path(args.dst))
        print(args.dst)
    else:
        print(home)
    return EXIT_OK


def cmd_preprocess(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from cxrage_ray.decode import DecodeOptions
    from cxrage_ray.export import export_seed_chain_pngs

    failures = export_seed_chain_pngs(args.input, args.outdir, _storage(args, env),
                                      DecodeOptions(mode=args.decode, allow_any_modality=True), workers=args.workers)
    return EXIT_ROW_ERRORS if failures else EXIT_OK


def cmd_manifest(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from cxrage_ray.manifest import build_manifest, write_manifest

    storage = _storage(args, env)
    df = build_manifest(args.prefix, storage)
    write_manifest(df, args.out, storage)
    print(f"cxrage: {len(df)} files -> {args.out}", file=sys.stderr)
    return EXIT_OK


def _retry_kinds(args: argparse.Namespace) -> tuple[str, ...] | None:
    """None: keep error rows; (): retry every error row; else only these kinds (exception class names)."""
    if args.retry_kinds is None:
        return () if args.retry_errors else None
    kinds = tuple(k.strip() for k in args.retry_kinds.split(",") if k.strip())
    bad = [k for k in kinds if not k.isidentifier()]
    if bad or not kinds:
        raise InputError(f"--retry-kinds {args.retry_kinds!r}: give error kinds as in the `error` column's "
                         "'<Kind>: message', comma-separated, e.g. ReadError,DecodeError")
    return kinds


def cmd_report(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from cxrage_ray.report import write_report

    write_report(args.output, time_col=args.time_col, event_col=args.event_col, storage=_storage(args, env))
    print(f"cxrage: wrote {args.output}/report.html and analysis.json", file=sys.stderr)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    import torch

    from cxrage_ray.decode import DecodeOptions
    from cxrage_ray.predict import PredictorConfig
    from cxrage_ray.registry import resolve_weights
    from cxrage_ray.serve.config import ServeConfig
    from cxrage_ray.serve.run import serve_until_stopped

    weights = str(_demo_weights(_weights_home(env))) if args.weights == "demo" else args.weights
    resolved = resolve_weights(weights, _weights_home(env), not args.no_fetch)
    local_gpu = args.ray_address is None and torch.cuda.is_available()
    if args.device == "cuda" and args.ray_address is None and not local_gpu:
        raise InputError("--device cuda, but torch sees no CUDA device here")
    cfg = ServeConfig(
        weights_path=str(resolved.path),
        weights_sha256=resolved.sha256,
        host=args.host,
        port=args.port,
        predictor=PredictorConfig(device=args.device, precision=args.precision, batch_size=args.batch_size),
        decode=DecodeOptions(mode=args.decode),
        max_upload_mb=args.max_upload_mb,
        max_batch_size=args.max_batch_films,
        batch_wait_timeout_s=args.batch_wait_ms / 1000,
        prepare_replicas=args.prepare_replicas,
        num_gpus=1 if args.device == "cuda" or (args.device == "auto" and local_gpu) else 0,
        ray_address=args.ray_address,
        num_cpus=args.num_cpus,
    )
    print(f"cxrage: starting Ray Serve (weights sha256 {resolved.sha256}) ...", file=sys.stderr, flush=True)
    serve_until_stopped(cfg, on_ready=lambda url: print(f"cxrage: serving on {url} (research use only, not "
                                                        "for clinical care); Ctrl-C stops", file=sys.stderr,
                                                        flush=True))
    return EXIT_OK


COMMANDS = {"score": cmd_score, "weights": cmd_weights, "preprocess": cmd_preprocess, "manifest": cmd_manifest,
            "report": cmd_report, "serve": cmd_serve}


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args, dict(os.environ) if env is None else env)
    except CxrAgeError as exc:
        print(f"cxrage: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("cxrage: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
