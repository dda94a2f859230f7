"""Job configuration: plain frozen dataclasses, built once from the CLI (or a job entrypoint) and passed down.

A leaf: it imports nothing of the package but `errors`, so every stage (and a GPU machine without Ray) can read
its settings without pulling in the others. Each stage's module says what it does with its part.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

from cxrage_ray.errors import InputError

#: Refuse images whose declared size exceeds this many pixels (decompression bombs); ~16k x 16k.
DEFAULT_MAX_PIXELS = 16384 * 16384


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """How to decode. Built once from the CLI and passed to every worker.

    Args:
        mode: "exact" decodes full resolution; "fast" may decode at a reduced resolution
            (JPEG 2000 resolution levels, JPEG DCT scaling) when the model only needs ~512 px.
        allow_any_modality: if False, DICOM modalities that are not radiographs are refused.
        patient_id_salt: when set, DICOM rows carry `patient_id_hash` = sha256(salt + PatientID).
        max_pixels: larger declared images are refused as decompression bombs.
    """

    mode: Literal["fast", "exact"] = "exact"
    allow_any_modality: bool = False
    patient_id_salt: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS


#: Protocols that are the local disk (no storage options, atomic writes by rename).
LOCAL_PROTOCOLS = frozenset({"file", "local"})


#: Protocols that take `endpoint_url` (the S3-compatible ones s3fs serves).
S3_PROTOCOLS = frozenset({"s3", "s3a"})


#: Option names whose values are never shown (s3fs: key/secret/token; others: password, credentials ...).
_SECRET_KEY = re.compile(r"key|secret|token|password|passwd|credential|session", re.IGNORECASE)


@dataclass(frozen=True)
class StorageConfig:
    """How to reach remote storage. Built once (CLI / job entrypoint) and passed to every worker.

    Args:
        options: fsspec storage options as sorted (key, value) pairs, handed to every non-local filesystem
            (e.g. ``anon=True``, ``requester_pays=True``). A dotted key nests:
            ``config_kwargs.retries.max_attempts=3`` becomes ``{"config_kwargs": {"retries": {"max_attempts": 3}}}``.
        endpoint_url: S3 endpoint for s3:// URLs (MinIO, moto, ...); captured from ``AWS_ENDPOINT_URL`` at the
            CLI so that workers on other nodes, whose environment may lack it, use the same endpoint.
        retries: retries after the first attempt on transient errors (throttling, 5xx, connection errors).
        backoff_s: first backoff; doubles each retry, with jitter, capped at `MAX_BACKOFF_S`.
    """

    options: tuple[tuple[str, Any], ...] = ()
    endpoint_url: str | None = None
    retries: int = 5
    backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", tuple(sorted(self.options.items())))
        else:
            object.__setattr__(self, "options", tuple(sorted((str(k), v) for k, v in self.options)))
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")

    @classmethod
    def from_pairs(cls, pairs: Iterable[str], **kwargs: Any) -> StorageConfig:
        """From ``["key=value", ...]`` (the ``--storage-option`` flags); values become bool/int/float when they look so.

        Raises:
            ValueError: a pair without ``=`` or with an empty key.
        """
        options: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"--storage-option expects KEY=VALUE, got {pair!r}")
            options[key] = _auto_type(value)
        return cls(options=tuple(options.items()), **kwargs)

    @classmethod
    def from_env_and_pairs(cls, env: Mapping[str, str], pairs: Iterable[str], **kwargs: Any) -> StorageConfig:
        """Like `from_pairs`, plus the S3 endpoint from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` in `env`.

        Only the endpoint is captured: credentials stay with the standard AWS chain on each node (environment,
        instance profile) and never travel inside the config.
        """
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        config = cls.from_pairs(pairs, endpoint_url=endpoint, **kwargs)
        # DICOMweb has no standard credential chain: CXRAGE_DICOMWEB_TOKEN / _USERNAME / _PASSWORD travel as
        # (redacted) options so workers on other nodes authenticate too; an explicit --storage-option wins.
        given = dict(config.options)
        found = {f"dicomweb_{name.lower()}": env[f"CXRAGE_DICOMWEB_{name}"] for name in ("TOKEN", "USERNAME", "PASSWORD")
                 if env.get(f"CXRAGE_DICOMWEB_{name}") and f"dicomweb_{name.lower()}" not in given}
        return cls(options={**given, **found}, endpoint_url=endpoint, **kwargs) if found else config

    def fs_options(self, protocol: str) -> dict[str, Any]:
        """The keyword arguments for `protocol`'s filesystem (nested dicts rebuilt from dotted keys)."""
        if protocol in LOCAL_PROTOCOLS:
            return {}
        kwargs: dict[str, Any] = {}
        if self.endpoint_url and protocol in S3_PROTOCOLS:
            kwargs["endpoint_url"] = self.endpoint_url
        if protocol in S3_PROTOCOLS and not self.client_retries_configured():
            # our retry loop is the only one, so every retry is counted (botocore: 1 attempt = no retry)
            kwargs["config_kwargs"] = {"retries": {"total_max_attempts": 1}}
        for key, value in self.options:
            if key.startswith("dicomweb_"):  # read by cxrage_ray.pacs.dicomweb, not by any filesystem
                continue
            node = kwargs
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return kwargs

    def client_retries_configured(self) -> bool:
        """True when the options tune botocore's own retries (``config_kwargs.retries.…``): then the S3 client
        keeps its retries (and s3fs its own), and retries hidden inside it are not counted."""
        return any(key == "config_kwargs.retries" or key.startswith("config_kwargs.retries.")
                   for key, _ in self.options)

    def redacted(self) -> dict[str, Any]:
        """A loggable view: secret-looking option values replaced by ``"***"``."""
        return {
            "options": {k: ("***" if _SECRET_KEY.search(k) else v) for k, v in self.options},
            "endpoint_url": self.endpoint_url,
            "retries": self.retries,
            "backoff_s": self.backoff_s,
        }

    def __repr__(self) -> str:
        return f"StorageConfig({self.redacted()})"


def _auto_type(value: str) -> Any:
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


#: Non-DICOM films whose `chest_likeness` is below this are flagged `non_chest` (strong evidence; between it and
#: orient.qc.NON_CHEST_SUSPECTED_LIKENESS only `non_chest_suspected`). benchmarks/qc.py: the lowest real chest
#: film, any copy, measures 0.21 (a child's portable AP); 0.45 flagged 2 real films (issue 25).
NON_CHEST_LIKENESS = 0.15


Mode = Literal["auto", "list", "off"]


RotationSource = Literal["list", "dicom", "model", "none"]


def rotation_list_key(name: str) -> str:
    """The basename of a path, URL or Windows path: rotation lists name films by file name."""
    name = name.strip().rstrip("/\\")
    return PureWindowsPath(PurePosixPath(name).name).name


def _stem_index(entries: Mapping[str, int]) -> dict[str, int]:
    """stem (the name without its extension) -> degrees, leaving out stems listed with conflicting degrees."""
    index: dict[str, int] = {}
    ambiguous: set[str] = set()
    for name, degrees in entries.items():
        if index.setdefault(stem := name.rsplit(".", 1)[0], degrees) != degrees:
            ambiguous.add(stem)
    for stem in ambiguous:
        del index[stem]
    return index


class RotationList(Mapping[str, int]):
    """{file name: clockwise degrees to apply}, indexed once (`cxrage_ray.orient.rotation_list.load_rotation_list`).

    Immutable and hashable; a read-only mapping in the list's own order. It travels to every worker inside
    `OrientConfig`, so it pickles as its entries alone and rebuilds the stem index on arrival.
    """

    __slots__ = ("_entries", "_sha256", "_stems")

    def __init__(self, entries: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> None:
        table = dict(entries)
        object.__setattr__(self, "_entries", table)
        object.__setattr__(self, "_stems", _stem_index(table))
        object.__setattr__(self, "_sha256", None)

    def lookup(self, image_id: str | None, uri: str | None) -> int | None:
        """Clockwise degrees to apply for this row, or None: matched by the uri's file name, then the image_id (and
        its file name), then by stem, so a list naming the original's PNGs (`x.png`) also applies to the raw files
        (`x.tif`, `x.dcm`); a stem listed with different degrees matches nothing."""
        candidates = [rotation_list_key(uri)] if uri else []
        if image_id:
            candidates += [image_id, rotation_list_key(image_id)]
        for key in candidates:
            if key in self._entries:
                return self._entries[key]
        stems = (key.rsplit(".", 1)[0] for key in candidates)
        return next((self._stems[stem] for stem in stems if stem in self._stems), None)

    @property
    def sha256(self) -> str:
        """Hash of the sorted entries: the list's identity in the job key, whatever its order or file."""
        if self._sha256 is None:
            canonical = json.dumps(sorted(self._entries.items()), separators=(",", ":"))
            object.__setattr__(self, "_sha256", hashlib.sha256(canonical.encode("ascii")).hexdigest())
        return self._sha256

    def __getitem__(self, name: str) -> int:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __hash__(self) -> int:
        return hash(self.sha256)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a RotationList is immutable")

    def __reduce__(self) -> tuple[type[RotationList], tuple[dict[str, int]]]:
        return RotationList, (self._entries,)

    def __repr__(self) -> str:
        return f"RotationList({len(self)} entries, sha256={self.sha256[:12]})"


#: The `OrientConfig` fields that change a job's scores, recorded by `OrientConfig.job_key`.
ORIENT_JOB_KEY_FIELDS = ("mode", "skip_flagged", "uncertain_threshold", "lateral_threshold", "use_view_model",
                         "non_chest_likeness")


@dataclass(frozen=True)
class OrientConfig:
    """How to handle orientation (`--rotation`, `--rotation-list`, `--skip-flagged`).

    Args:
        mode: "auto" (list, then DICOM Patient Orientation, then the classifier), "list" (the list only) or "off"
            (never rotate). QC flags are computed in every mode.
        rotation_list: a `RotationList` from `load_rotation_list` (a plain {file name: clockwise degrees to apply}
            is turned into one), or None.
        skip_flagged: rows with any qc flag are not scored (`OrientResult.skip`).
        uncertain_threshold: below this classifier confidence the row gets `orientation_uncertain` (the film is
            still turned to the most likely orientation).
        lateral_threshold: the view head's probability above which a film is flagged `lateral`.
        use_view_model: run the classifier for the `lateral` flag even when the rotation came from elsewhere.
        non_chest_likeness: non-DICOM films whose `chest_likeness` is below this are flagged `non_chest`
            (None: never judge the picture; DICOM films are judged by their header).
    """

    mode: Mode = "auto"
    rotation_list: RotationList | None = None
    skip_flagged: bool = False
    uncertain_threshold: float = 0.8
    lateral_threshold: float = 0.5
    use_view_model: bool = True
    # repr=False: outputs written before the job key recorded repr(OrientConfig) without this field
    # (cxrage_ray.orient.rotation_list.legacy_orient_repr rebuilds that string)
    non_chest_likeness: float | None = field(default=NON_CHEST_LIKENESS, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "list", "off"):
            raise InputError(f"--rotation must be auto, list or off, not {self.mode!r}")
        if self.mode == "list" and self.rotation_list is None:
            raise InputError("--rotation list needs --rotation-list FILE")
        if self.rotation_list is not None and not isinstance(self.rotation_list, RotationList):
            object.__setattr__(self, "rotation_list", RotationList(self.rotation_list))

    def job_key(self) -> dict[str, Any]:
        """The settings that change a score, for the job record: the rotation list by its hash and size only
        (a 100k-entry list would otherwise land in job.json)."""
        listed = self.rotation_list
        return {
            **{name: getattr(self, name) for name in ORIENT_JOB_KEY_FIELDS},
            "rotation_list_sha256": None if listed is None else listed.sha256,
            "rotation_list_entries": 0 if listed is None else len(listed),
        }


@dataclass(frozen=True)
class WriteBackConfig:
    """Where and how to store the reports.

    Args:
        target: the archive to store into, as ``dicomweb+http(s)://host[:port]/prefix``; None stores each
            report in the archive its source came from.
        workers: concurrent metadata-fetch + STOW-RS requests.
        saliency: also store each row's saliency overlay (the `saliency_uri` PNG of `--saliency DIR`) as a
            Secondary Capture in the source's study (`build_saliency_capture`).
    """

    target: str | None = None
    workers: int = 4
    saliency: bool = False


PreprocessMode = Literal["seed", "none"]


@dataclass(frozen=True)
class PrepareSettings:
    """Everything the CPU stage needs, built once on the driver and shipped to workers.

    Args:
        storage: how to read URIs.
        decode: decoder options (fast/exact, modality policy, bomb limit, patient-id salt).
        preprocess: "seed" applies the ImageMagick chain; "none" treats inputs as seed-chain PNGs already.
        orient: an `OrientConfig` (cxrage_ray.orient.stage) or None to skip orientation handling entirely.
        age_column: manifest column holding chronological age for non-DICOM rows.
        fetch_threads: concurrent reads per task.
    """

    storage: StorageConfig
    decode: DecodeOptions = DecodeOptions()
    preprocess: PreprocessMode = "seed"
    orient: Any = None
    age_column: str | None = "age"
    fetch_threads: int = 16


#: Saliency maps: "grad" (the original's input gradient) or "gradcam" (Grad-CAM on layer4).
SaliencyMethod = Literal["grad", "gradcam"]
SALIENCY_METHODS: tuple[SaliencyMethod, ...] = ("grad", "gradcam")


@dataclass(frozen=True)
class SaliencySettings:
    """Where and how to write saliency maps (`--saliency DIR --saliency-method grad|gradcam`)."""

    directory: str
    method: SaliencyMethod = "grad"
    storage: StorageConfig = field(default_factory=StorageConfig)


Device = Literal["auto", "cpu", "cuda"]


Precision = Literal["auto", "fp32", "bf16", "fp16"]


TTAMode = Literal["seed", "none"]


def views_per_film(tta: TTAMode) -> int:
    """Model views one film makes: the centre and four zoomed corners with the seed TTA
    (`cxrage_ray.preprocess.fastai.batch_tta_views`), the centre alone without."""
    return 5 if tta == "seed" else 1


@dataclass(frozen=True, slots=True)
class PredictorConfig:
    """How to run the model.

    Args:
        device: "auto" picks CUDA when available, else CPU.
        precision: "auto" is bf16 autocast on GPUs that support it (else fp16) and fp32 on CPU.
        tta: "seed" (centre + 4 corners, the original's composite) or "none" (centre only).
        batch_size: model views per forward pass (5 views per image with TTA); same-shaped pictures
            are transformed together on the inference device.
        num_threads: torch intra-op threads on CPU; 0 means all cores of this machine. Ray workers start
            with OMP_NUM_THREADS=1, so this must be set explicitly.
        compile: `torch.compile` the network ("auto": on GPU; a failure falls back to eager, logged).
        fold_batchnorm: fold the body's batch norms into its convolutions ("auto": yes, on GPU and CPU;
            fp32 ages stay within 1e-3 years of the plain model's; saliency uses the unfolded network).
        fixed_shape: every forward pass runs exactly `batch_size` views, the last one padded, so a film's output
            is bitwise the same whichever films shared its batch and wherever it sat in it (oneDNN picks its
            kernels by batch shape: a 5-view pass and a 16-view pass differ in the 7th digit). Off, a lone
            film runs only its own views (`cxrage serve` on CPU, for latency); a compiled network is always
            padded.
    """

    device: Device = "auto"
    precision: Precision = "auto"
    tta: TTAMode = "seed"
    batch_size: int = 64
    num_threads: int = 0
    compile: Literal["auto", "on", "off"] = "auto"
    fold_batchnorm: Literal["auto", "on", "off"] = "auto"
    fixed_shape: bool = True


#: Manifest rows per CPU task by default: with the seed chain (heavy per film), and for pre-made pictures.
SEED_ROWS_PER_TASK, LIGHT_ROWS_PER_TASK = 16, 64


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide to run.

    Args:
        address: an existing cluster ("auto", "ray://...") or None for an embedded local Ray.
        num_cpus: logical CPUs for the embedded local Ray; None = this machine's count, but at least 4 so
            the predictor actor can never starve the CPU tasks on a 2-core laptop (environment.md).
        predict_actors: predictor actors for CPU inference; on the embedded local Ray they share this machine's
            cores (`cxrage_ray.pipeline.plan.cpu_inference_layout`). GPU runs use one actor per GPU.
        rows_per_task: manifest rows per CPU task (one Ray block); None: `SEED_ROWS_PER_TASK` with the seed chain,
            `LIGHT_ROWS_PER_TASK` with `--preprocess none` (see `rows_per_task_for`).
        no_progress_timeout_s: fail with an explanation when no row finishes for this long.
        verbose: let Ray's and Ray Data's own log lines through to the terminal (they always reach the session
            log under Ray's temp folder).
        stop_at_exit: leave the embedded Ray running when the job ends; the lifetime watcher stops it when this
            process exits (`lifetime.exit_now`). For the `cxrage` command, which exits right after its job: Ray's
            own shutdown stops its processes one by one (~1.4 s on 2 cores), the watcher kills them at once.
            Library callers keep the default (the job stops its Ray); a cluster (`address`) is only disconnected.
        wait_for_gpus: the job needs GPUs (`--device cuda`, `--gpu-preprocess on`): on a cluster that has none yet,
            wait up to `no_progress_timeout_s` for the autoscaler to add GPU nodes (`runtime.session.wait_for_gpus`).
    """

    address: str | None = None
    num_cpus: int | None = None
    predict_actors: int = 1
    rows_per_task: int | None = None
    no_progress_timeout_s: float = 600.0
    verbose: bool = False
    stop_at_exit: bool = False
    wait_for_gpus: bool = False

    def rows_per_task_for(self, preprocess: PreprocessMode) -> int:
        """Rows per CPU task for this job: each task costs Ray tens of ms (scheduling, a block through the object
        store), which 16 seed-chain films (~50 ms each) hide but 16 decodes of pre-made pictures (~5 ms) do not
        (issue 15: the pipeline's ceiling went from ~360 to ~640 films/s on 2 cores with 64)."""
        if self.rows_per_task is not None:
            return self.rows_per_task
        return LIGHT_ROWS_PER_TASK if preprocess == "none" else SEED_ROWS_PER_TASK


@dataclass(frozen=True)
class ScoreConfig:
    """A `cxrage score` job.

    Args:
        input: folder/prefix or manifest (CSV/Parquet), local or fsspec URL.
        output: OUTPUT folder (local or fsspec URL) that receives Parquet parts + summary.json.
        weights: explicit weights file, or None for the cached published model.
        weights_name: what the weights are, written beside their sha256 in every row and record ("demo" for
            `--weights demo`); None: the registry id for the published model, else the file's name.
        allow_fetch: download the published weights when they are not cached.
        csv: also write the original tool's CSV layout here.
        uri_column: the manifest column that held the paths (recorded in job.json; the manifest is already
            built with it).
        commit_every_s: scored rows are committed to OUTPUT at least this often (and every `part_rows`).
        spill_root: where rows OUTPUT refused wait for the rerun (cxrage_ray.write.spill); None: not kept.
        overwrite: discard an OUTPUT that holds another job's results instead of refusing.
        retry_errors: None keeps committed error rows (a rerun only scores missing rows); a tuple of error
            kinds (`ReadError`, ...) rescores the error rows of those kinds, the empty tuple every error row.
        gpu_preprocess: "on" sends bytes to GPU actors that decode, preprocess and score (the device
            itinerary); "off" keeps decode and the seed chain on CPU tasks; "auto" is on when the cluster has
            a GPU and nvImageCodec loads on every GPU node, asked on the nodes themselves (see
            `cxrage_ray.pipeline.plan.choose_itinerary`).
        write_back: store a CXR-Age Structured Report per ok DICOMweb row (see cxrage_ray.pacs.writeback), or None.
    """

    input: str
    output: str
    weights: str | None = None
    weights_name: str | None = None
    allow_fetch: bool = True
    storage: StorageConfig = field(default_factory=StorageConfig)
    decode: DecodeOptions = DecodeOptions()
    preprocess: PreprocessMode = "seed"
    predictor: PredictorConfig = PredictorConfig()
    orient: OrientConfig | None = None
    ray: RayConfig = RayConfig()
    saliency: SaliencySettings | None = None
    csv: str | None = None
    part_rows: int = 10_000
    commit_every_s: float = 30.0
    spill_root: Path | None = None
    overwrite: bool = False
    retry_errors: tuple[str, ...] | None = None
    progress: bool = True
    gpu_preprocess: Literal["auto", "on", "off"] = "auto"
    write_back: WriteBackConfig | None = None
    uri_column: str = "uri"
