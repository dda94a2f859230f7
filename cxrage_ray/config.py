"""Job configuration: frozen dataclasses built once from the CLI (or a job entrypoint) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cxrage_ray.decode import DecodeOptions
from cxrage_ray.orient import OrientConfig
from cxrage_ray.stages import PreprocessMode, SaliencySettings
from cxrage_ray.storage import StorageConfig
from cxrage_ray.writeback import WriteBackConfig

if TYPE_CHECKING:  # annotations only: importing predict imports torch, which the driver defers (issue 15)
    from cxrage_ray.predict import Device, Precision
    from cxrage_ray.preprocess.fastai import TTAMode


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
        fold_batchnorm: fold the body's batch norms into its convolutions ("auto": on GPU; on the CPU the
            unfolded network keeps fp32 scores equal to the plain model's).
    """

    device: Device = "auto"
    precision: Precision = "auto"
    tta: TTAMode = "seed"
    batch_size: int = 64
    num_threads: int = 0
    compile: Literal["auto", "on", "off"] = "auto"
    fold_batchnorm: Literal["auto", "on", "off"] = "auto"


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
            cores (`cxrage_ray.pipeline.cpu_inference_layout`). GPU runs use one actor per GPU.
        rows_per_task: manifest rows per CPU task (one Ray block); None: `SEED_ROWS_PER_TASK` with the seed chain,
            `LIGHT_ROWS_PER_TASK` with `--preprocess none` (see `rows_per_task_for`).
        no_progress_timeout_s: fail with an explanation when no row finishes for this long.
        verbose: let Ray's and Ray Data's own log lines through to the terminal (they always reach the session
            log under Ray's temp folder).
        stop_at_exit: leave the embedded Ray running when the job ends; the lifetime watcher stops it when this
            process exits (`lifetime.exit_now`). For the `cxrage` command, which exits right after its job: Ray's
            own shutdown stops its processes one by one (~1.4 s on 2 cores), the watcher kills them at once.
            Library callers keep the default (the job stops its Ray); a cluster (`address`) is only disconnected.
    """

    address: str | None = None
    num_cpus: int | None = None
    predict_actors: int = 1
    rows_per_task: int | None = None
    no_progress_timeout_s: float = 600.0
    verbose: bool = False
    stop_at_exit: bool = False

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
        spill_root: where rows OUTPUT refused wait for the rerun (cxrage_ray.spill); None: not kept.
        overwrite: discard an OUTPUT that holds another job's results instead of refusing.
        retry_errors: None keeps committed error rows (a rerun only scores missing rows); a tuple of error
            kinds (`ReadError`, ...) rescores the error rows of those kinds, the empty tuple every error row.
        gpu_preprocess: "on" sends bytes to GPU actors that decode, preprocess and score (the device
            itinerary); "off" keeps decode and the seed chain on CPU tasks; "auto" is on when the cluster has
            a GPU and nvImageCodec is installed (see `cxrage_ray.pipeline.choose_itinerary`).
        write_back: store a CXR-Age Structured Report per ok DICOMweb row (see cxrage_ray.writeback), or None.
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
