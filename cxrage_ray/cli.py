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
from typing import Mapping, NoReturn, Sequence

from cxrage_ray.config import SALIENCY_METHODS  # a leaf of plain types: cheap to import before parsing
from cxrage_ray.errors import CxrAgeError, InputError, JobInterrupted, OutputError
from cxrage_ray.runtime.lifetime import Terminated, exit_now, terminate_as_interrupt

EXIT_OK, EXIT_ROW_ERRORS, EXIT_USAGE, EXIT_OUTPUT, EXIT_INTERRUPTED = 0, 3, 2, 4, 130
#: SIGTERM ends the job like Ctrl-C, with the shell's code for it (128 + 15)
EXIT_TERMINATED = 128 + 15


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help lines with their defaults; options without a meaningful default say nothing about it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec/s3fs option, e.g. endpoint_url=http://127.0.0.1:9000 or anon=true (repeatable)")


def _add_decode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--decode", choices=["fast", "exact"], default="exact",
                   help="fast: reduced-resolution JPEG 2000 / JPEG decode (see docs/dicom.md); exact: full resolution")
    p.add_argument("--allow-any-modality", action="store_true",
                   help="score DICOM modalities that are not radiographs (CT, MR, ...) instead of refusing them")


def _subparser(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    from cxrage_ray import __version__

    parser = argparse.ArgumentParser(prog="cxrage", description="CXR-Age for every chest radiograph in an archive.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show our INFO logs and Ray's own log lines on the terminal")
    parser.add_argument("--version", action="version", version=f"cxrage {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    s = _subparser(sub, "score", "score a folder or manifest into Parquet under OUTPUT")
    s.add_argument("input", help="folder/prefix (recursive) or CSV/Parquet manifest with a path column (--uri-column)")
    s.add_argument("output", help="output folder (local or s3://): Parquet parts under parts/, records under _cxrage/")
    s.add_argument("--uri-column", default="uri", metavar="NAME",
                   help="the manifest column holding each image's path or URL; relative paths resolve against "
                   "the manifest's folder")
    s.add_argument("--weights", help="weights file (fastai .pth, state_dict, .safetensors) or `demo` (random, NOT "
                   "a model); without it: the published PLCO_Fine_Tuned_120419 model, fetched on first use")
    s.add_argument("--no-fetch", action="store_true", help="never download weights")
    s.add_argument("--tta", choices=["seed", "none"], default="seed",
                   help="seed: the original's centre + 4 corner views; none: the centre view only")
    s.add_argument("--preprocess", choices=["seed", "none"], default="seed",
                   help="seed: apply the original ImageMagick chain; none: inputs are seed-chain PNGs already")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs; auto: a GPU when the cluster has one")
    s.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16/fp16 autocast on GPU, fp32 on CPU")
    s.add_argument("--batch-size", type=int, default=0,
                   help="model views per forward pass (5 per image with TTA); 0: 640 on GPU, 8 on this "
                        "machine's CPUs (a one-thread batch per core), 16 on a cluster's")
    s.add_argument("--saliency", metavar="DIR", help="write a saliency map per film as DIR/<stem>.png (local or s3://)")
    s.add_argument("--saliency-method", choices=list(SALIENCY_METHODS), default="grad",
                   help="grad: the original's input-gradient map; gradcam: Grad-CAM on the last conv stage")
    s.add_argument("--csv", metavar="PATH", help="also write the original tool's CSV (File, SD_Prediction, CXR_Age)")
    s.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="join this Ray cluster (default: $RAY_ADDRESS, else an embedded local Ray)")
    s.add_argument("--num-cpus", type=int, help="logical CPUs for the embedded local Ray (default: this machine's, "
                   "at least 4)")
    s.add_argument("--predict-actors", type=int, default=1,
                   help="predictor actors for CPU inference (on this machine they share its cores)")
    s.add_argument("--rotation", choices=["auto", "list", "off"], default="auto",
                   help="auto: rotation list, then DICOM orientation, then our orientation model; list: the list only")
    s.add_argument("--rotation-list", metavar="CSV",
                   help="the original's list (one file name per line = rotate 90 clockwise) or `file,degrees`")
    s.add_argument("--skip-flagged", action="store_true",
                   help="do not score films with QC flags (non_chest, lateral, blank, paediatric, "
                   "orientation_uncertain); age_implausible only nulls the age")
    s.add_argument("--keep-patient-id", metavar="SALT",
                   help="add patient_id_hash = sha256(SALT + PatientID) for DICOM rows (never the raw ID)")
    s.add_argument("--no-progress-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="stop (resumably) when no image finishes for this long instead of waiting forever")
    s.add_argument("--part-rows", type=int, default=10_000, help="rows per output Parquet part at most")
    s.add_argument("--commit-every", type=float, default=30.0, metavar="SECONDS",
                   help="commit scored rows to OUTPUT at least this often, so an interrupted run loses at most "
                   "this much work")
    s.add_argument("--overwrite", action="store_true", help="discard results of a different job in OUTPUT")
    s.add_argument("--retry-errors", action="store_true",
                   help="score this job's error rows again (without it a rerun scores only missing rows)")
    s.add_argument("--retry-kinds", metavar="KINDS",
                   help="retry only error rows of these comma-separated kinds, e.g. ReadError,DecodeError "
                   "(implies --retry-errors)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (the final summary still prints)")
    s.add_argument("--gpu-preprocess", choices=["auto", "on", "off"], default="auto",
                   help="on: send bytes to GPU actors that decode (nvImageCodec), run the seed chain and score; "
                   "off: decode and seed chain on CPU tasks; auto (default): on when the cluster has a GPU and "
                   "nvImageCodec loads on its GPU nodes (pip install 'cxrage-ray[gpu]' there)")
    s.add_argument("--write-back", choices=["sr"],
                   help="sr: store a DICOM Structured Report with CXR-Age for each ok row in the DICOMweb archive "
                   "it came from (STOW-RS; reruns never duplicate a report)")
    s.add_argument("--write-back-to", metavar="URL",
                   help="store the reports in this archive instead (dicomweb+https://host/prefix; implies --write-back sr)")
    s.add_argument("--write-back-saliency", action="store_true",
                   help="also store each film's saliency overlay as a Secondary Capture (needs --saliency DIR; "
                   "use --saliency-method gradcam for Grad-CAM)")
    _add_decode(s)
    _add_storage(s)

    pp = _subparser(sub, "preprocess", "write the seed-chain PNG the original fed to fastai, per input")
    pp.add_argument("input", help="folder/prefix or CSV/Parquet manifest")
    pp.add_argument("outdir", help="folder that receives one PNG per input (same relative path)")
    pp.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    pp.add_argument("--decode", choices=["fast", "exact"], default="exact",
                    help="fast: reduced-resolution JPEG 2000 / JPEG decode; exact: full resolution")
    pp.add_argument("--engine", choices=["exact", "tensor"], default="exact",
                    help="exact: the CPU seed chain (default); tensor: the GPU path's tensor code (on the GPU when "
                    "there is one, else on the CPU), to compare both on your own archive")
    _add_storage(pp)

    w = _subparser(sub, "weights", "manage model weights")
    wsub = w.add_subparsers(dest="weights_command", required=True, metavar="ACTION", help="what to do with weights")
    f = _subparser(wsub, "fetch", "download and verify the published weights into the cache")
    f.add_argument("--url", help="alternative download URL (e.g. an internal mirror)")
    c = _subparser(wsub, "convert", "convert any supported checkpoint to .safetensors")
    c.add_argument("src", help="checkpoint to read (.pth, state_dict, .safetensors)")
    c.add_argument("dst", help=".safetensors file to write")
    d = _subparser(wsub, "demo", "write seeded random weights in the published format (NOT a real model)")
    d.add_argument("dst", help=".pth file to write")
    _subparser(wsub, "where", "print the weights cache folder")

    m = _subparser(sub, "manifest", "list a folder/prefix once into a reusable Parquet manifest")
    m.add_argument("prefix", help="folder/prefix to list (recursive), or a DICOMweb query dicomweb+https://host/prefix/?Modality=CR,DX&…")
    m.add_argument("out", help="manifest to write (.parquet, or .csv)")
    _add_storage(m)

    sv = _subparser(sub, "serve", "web page + scoring API on Ray Serve (research use only)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default loopback; put a TLS reverse proxy in front, see README)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on")
    sv.add_argument("--weights", help="as for `score`: weights file or `demo`; default: the published model")
    sv.add_argument("--no-fetch", action="store_true", help="never download weights")
    sv.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the model runs")
    sv.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="auto: bf16/fp16 autocast on GPU, fp32 on CPU")
    sv.add_argument("--batch-size", type=int, default=0,
                    help="model views per forward pass (5 per film with TTA); default: 640 on GPU, 16 on CPU")
    sv.add_argument("--max-upload-mb", type=float, default=64.0, help="refuse larger request bodies with 413")
    sv.add_argument("--max-batch-films", type=int, default=16, help="films per model batch (@serve.batch)")
    sv.add_argument("--batch-wait-ms", type=float, default=50.0,
                    help="how long the first film of a batch waits for more")
    sv.add_argument("--prepare-replicas", type=int, default=1,
                    help="replicas that decode films (decode, seed chain, orientation) for the model replica")
    sv.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                    help="join this Ray cluster (default: $RAY_ADDRESS, else an embedded local Ray)")
    sv.add_argument("--num-cpus", type=int, help="logical CPUs for the embedded local Ray")
    sv.add_argument("--decode", choices=["fast", "exact"], default="exact",
                    help="fast: reduced-resolution JPEG 2000 / JPEG decode; exact: full resolution")

    r = _subparser(sub, "report", "write OUTPUT/_cxrage/report.html and analysis.json")
    r.add_argument("output", help="OUTPUT folder of `cxrage score`")
    r.add_argument("--time-col", help="manifest column with follow-up time, for the Cox models")
    r.add_argument("--event-col", help="manifest column with the event indicator (0/1), for the Cox models")
    r.add_argument("--include-flagged", action="store_true",
                   help="keep films flagged non_chest, lateral, paediatric, blank, orientation_uncertain or "
                   "age_implausible in the statistics (by default they are left out and counted per flag)")
    _add_storage(r)
    return parser


def _storage(args: argparse.Namespace, env: Mapping[str, str]):
    from cxrage_ray.config import StorageConfig

    return StorageConfig.from_env_and_pairs(env, args.storage_option)


def _weights_home(env: Mapping[str, str]) -> Path:
    from cxrage_ray.model.registry import weights_home

    return weights_home(env)


def _preflight(args: argparse.Namespace, storage):
    """Every check that needs neither torch nor Ray, in the order a user would fix them; returns INPUT opened
    (`open_manifest`: a Parquet manifest's footer read, a folder listed or a CSV parsed; its rows stream later).

    Runs before the heavy imports so a mistake is answered in about a second and nothing is written.
    """
    from cxrage_ray.runtime import preflight
    from cxrage_ray.manifest.build import open_manifest

    preflight.check_limits(preflight.Limits(batch_size=args.batch_size, part_rows=args.part_rows,
                                            predict_actors=args.predict_actors, num_cpus=args.num_cpus,
                                            no_progress_timeout_s=args.no_progress_timeout,
                                            commit_every_s=args.commit_every))
    _retry_kinds(args)
    preflight.check_output_folder(args.output)
    if args.csv:
        preflight.check_output_file(args.csv, option="--csv")
    if args.saliency:
        preflight.check_output_folder(args.saliency, option="--saliency")
    preflight.check_input_file(args.rotation_list, option="--rotation-list")
    if args.weights not in (None, "demo"):
        preflight.check_input_file(args.weights, option="--weights")
    preflight.check_device(args.device, args.ray_address)
    return open_manifest(args.input, storage, uri_column=args.uri_column)


def cmd_score(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    storage = _storage(args, env)
    manifest = _preflight(args, storage)

    from cxrage_ray.config import DecodeOptions, OrientConfig, PredictorConfig, RayConfig, SaliencySettings, ScoreConfig
    from cxrage_ray.pipeline.itinerary import score
    from cxrage_ray.orient.rotation_list import load_rotation_list
    from cxrage_ray.model.registry import DEMO_WEIGHTS_NAME, weights_label
    from cxrage_ray.runtime.console import failed_film_lines
    from cxrage_ray.write.spill import default_spill_root

    weights = args.weights
    if weights == "demo":
        weights = str(_demo_weights(_weights_home(env)))
    cfg = ScoreConfig(
        input=args.input,
        output=args.output,
        weights=weights,
        weights_name=weights_label(args.weights),
        allow_fetch=not args.no_fetch,
        storage=storage,
        decode=DecodeOptions(mode=args.decode, allow_any_modality=args.allow_any_modality,
                             patient_id_salt=args.keep_patient_id),
        preprocess=args.preprocess,
        predictor=PredictorConfig(device=args.device, precision=args.precision, tta=args.tta,
                                  batch_size=args.batch_size),
        ray=RayConfig(address=args.ray_address, num_cpus=args.num_cpus, predict_actors=args.predict_actors,
                      no_progress_timeout_s=args.no_progress_timeout, verbose=args.verbose,
                      stop_at_exit=args.exits_after,
                      wait_for_gpus=args.device == "cuda" or args.gpu_preprocess == "on"),
        orient=OrientConfig(mode=args.rotation, skip_flagged=args.skip_flagged,
                            rotation_list=load_rotation_list(args.rotation_list) if args.rotation_list else None),
        saliency=SaliencySettings(args.saliency, args.saliency_method, storage) if args.saliency else None,
        csv=args.csv,
        part_rows=args.part_rows,
        commit_every_s=args.commit_every,
        spill_root=default_spill_root(env),
        overwrite=args.overwrite,
        retry_errors=_retry_kinds(args),
        progress=not args.no_progress,
        gpu_preprocess=args.gpu_preprocess,
        write_back=_write_back(args),
        uri_column=args.uri_column,
    )
    with terminate_as_interrupt():  # SIGTERM at any point of the job ends it like Ctrl-C, with exit 143
        summary = score(cfg, _weights_home(env), manifest=manifest)
    demo = " with DEMO weights (ages are meaningless)" if summary.get("weights_name") == DEMO_WEIGHTS_NAME else ""
    print(
        f"cxrage: {summary['rows_ok']} ok, {summary['rows_error']} error of {summary['rows_total']} rows "
        f"({summary['rows_scored_this_run']} scored this run, {summary['images_per_s'] or 0:.1f} images/s){demo} "
        f"-> {args.output}",
        file=sys.stderr,
    )
    if summary["errors_by_kind"]:
        print(f"cxrage: errors by kind: {json.dumps(summary['errors_by_kind'])}", file=sys.stderr)
    audit = summary.get("precision_audit")
    if audit:  # mixed precision: what it cost on these films, against fp32
        print(f"cxrage: precision audit ({audit['precision']} vs fp32, {audit['films']} films): max |Δ cxr_age| "
              f"{audit['max_abs_delta_years']:.4f} years, mean {audit['mean_abs_delta_years']:.4f}", file=sys.stderr)
    _print_lines(failed_film_lines(summary.get("first_errors", []), summary["rows_error"], args.output))
    sr = summary.get("write_back")
    if sr is not None:
        print(f"cxrage: write-back: {sr['stored']} report(s) stored, {sr['already']} already stored, "
              f"{sr['failed']} failed (rerun to retry)", file=sys.stderr)
    if summary.get("qc_flags"):
        from cxrage_ray.report.cohort import STATS_EXCLUDED_FLAGS

        left_out = [flag for flag in summary["qc_flags"] if flag in STATS_EXCLUDED_FLAGS]
        excluded = f" (`cxrage report` leaves {', '.join(left_out)} rows out of its statistics unless " \
            "--include-flagged)" if left_out else ""
        print(f"cxrage: QC flags: {json.dumps(summary['qc_flags'])}{excluded}", file=sys.stderr)
    return EXIT_ROW_ERRORS if summary["rows_error"] or (sr and sr["failed"]) else EXIT_OK


def _print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def _write_back(args: argparse.Namespace) -> "WriteBackConfig | None":  # noqa: F821 - imported lazily
    """--write-back sr / --write-back-to URL -> a WriteBackConfig, or None."""
    from cxrage_ray.pacs.dicomweb import parse_query
    from cxrage_ray.config import WriteBackConfig

    if args.write_back_saliency and not args.saliency:
        raise InputError("--write-back-saliency stores the maps of --saliency DIR: give --saliency DIR too")
    if args.write_back_to:
        parse_query(args.write_back_to)  # a malformed URL is a usage error before anything is scored
        return WriteBackConfig(target=args.write_back_to, saliency=args.write_back_saliency)
    if args.write_back == "sr" or args.write_back_saliency:
        return WriteBackConfig(saliency=args.write_back_saliency)
    return None


def _demo_weights(home: Path) -> Path:
    path = home / "demo-random-seed0.pth"
    if not path.exists():  # only then torch (~1.4 s, before Ray starts): a job imports it beside Ray's start-up
        from cxrage_ray.model.demo import write_demo_checkpoint

        write_demo_checkpoint(path)
    print(f"cxrage: using DEMO weights {path} (random, NOT the published model: ages are meaningless)",
          file=sys.stderr)
    return path


def cmd_weights(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from cxrage_ray.model import registry
    from cxrage_ray.model.checkpoint import convert_to_safetensors

    home = _weights_home(env)
    if args.weights_command == "fetch":
        spec = registry.load_registry()[registry.DEFAULT_MODEL]
        print(registry.fetch_weights(spec, home, progress=True, url=args.url))
    elif args.weights_command == "convert":
        print(convert_to_safetensors(args.src, args.dst))
    elif args.weights_command == "demo":
        from cxrage_ray.model.demo import write_demo_checkpoint

        write_demo_checkpoint(Path(args.dst))
        print(args.dst)
    else:
        print(home)
    return EXIT_OK


def cmd_preprocess(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from cxrage_ray.config import DecodeOptions
    from cxrage_ray.pipeline.export import export_seed_chain_pngs

    failures = export_seed_chain_pngs(args.input, args.outdir, _storage(args, env),
                                      DecodeOptions(mode=args.decode, allow_any_modality=True), workers=args.workers,
                                      engine=args.engine)
    return EXIT_ROW_ERRORS if failures else EXIT_OK


def cmd_manifest(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from cxrage_ray.manifest.build import build_manifest, write_manifest

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
    from cxrage_ray.report.analysis import write_report

    write_report(args.output, time_col=args.time_col, event_col=args.event_col, storage=_storage(args, env),
                 include_flagged=args.include_flagged, tell=lambda line: print(line, file=sys.stderr))
    from cxrage_ray.write.parts import record_uri

    print(f"cxrage: wrote {record_uri(args.output, 'report.html')} and analysis.json", file=sys.stderr)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    import torch

    from cxrage_ray.config import DecodeOptions
    from cxrage_ray.config import PredictorConfig
    from cxrage_ray.model.registry import resolve_weights, weights_label, weights_name
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
        weights_name=weights_name(weights_label(args.weights), resolved),  # as `score` names them in every row
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
        verbose=args.verbose,
    )
    print(f"cxrage: starting Ray Serve (weights sha256 {resolved.sha256}) ...", file=sys.stderr, flush=True)
    serve_until_stopped(cfg, on_ready=lambda url: print(f"cxrage: serving on {url} (research use only, not "
                                                        "for clinical care); Ctrl-C stops", file=sys.stderr,
                                                        flush=True),
                        on_logs=lambda logs: print(f"cxrage: Ray Serve's logs: {logs}", file=sys.stderr, flush=True))
    return EXIT_OK


COMMANDS = {"score": cmd_score, "weights": cmd_weights, "preprocess": cmd_preprocess, "manifest": cmd_manifest,
            "report": cmd_report, "serve": cmd_serve}


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None, exits_after: bool = False) -> int:
    """Run one `cxrage` command; returns its exit code.

    `exits_after`: this process ends right after (`entry`), so an embedded Ray is left to the lifetime watcher,
    which stops it as the process exits, instead of being shut down process by process (`RayConfig.stop_at_exit`).
    """
    args = build_parser().parse_args(argv)
    args.exits_after = exits_after  # read by cmd_score; not an option: only `entry` passes True
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args, dict(os.environ) if env is None else env)
    except OutputError as exc:
        print(f"cxrage: error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    except CxrAgeError as exc:
        print(f"cxrage: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        kept = exc.kept if isinstance(exc, JobInterrupted) else None  # what reached OUTPUT before Ctrl-C
        terminated = isinstance(exc, Terminated) or (isinstance(exc, JobInterrupted) and exc.terminated)
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"cxrage: {how}; {kept or 'every part written so far is kept'}; rerun the same command to "
              "resume (only missing rows are scored)", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


def entry() -> NoReturn:
    """The `cxrage` command: `main`, then an immediate exit (`lifetime.exit_now`): ~3 s sooner on 2 cores than
    Ray's shutdown and the interpreter's teardown, once every result is written (issue 15)."""
    exit_now(main(exits_after=True))


if __name__ == "__main__":
    entry()
