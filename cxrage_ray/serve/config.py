"""`cxrage serve` configuration: one frozen dataclass built by the CLI and handed to both deployments."""

from __future__ import annotations

from dataclasses import dataclass, field

from cxrage_ray.config import DecodeOptions
from cxrage_ray.config import OrientConfig
from cxrage_ray.config import PredictorConfig


@dataclass(frozen=True)
class ServeConfig:
    """A running `cxrage serve`.

    Scoring settings are `cxrage score`'s defaults (exact decode, radiograph modalities only, seed chain,
    seed TTA, orientation `auto`), so a served score equals a batch score of the same file and weights.

    Args:
        weights_path: the resolved weights file (as `score` resolves `--weights`); replicas load it from here.
        weights_sha256: its sha256, checked again by every model replica after loading.
        weights_name: what the weights are, in every answer as in every batch row
            (`cxrage_ray.model.registry.weights_name`: `demo` for the demo weights, which the page flags).
        host, port: where Ray Serve's HTTP proxy listens (loopback by default: put TLS in front, see README).
        predictor: device/precision/TTA/views per forward pass (batch_size 0 = `score`'s auto: 16 CPU, 640 GPU).
        decode: decoder options (`--allow-any-modality` is not offered: the page is for chest films).
        orient: orientation handling (`score`'s default `auto`).
        max_upload_mb: larger request bodies are refused with 413 before they are parsed.
        max_files: files per request.
        max_batch_size: films per model batch (`@serve.batch`).
        batch_wait_timeout_s: how long the first film of a batch waits for others.
        prepare_replicas: replicas of the prepare deployment (decode, seed chain, orientation).
        prepare_threads: films each prepare replica works on at once.
        model_num_cpus, prepare_num_cpus, ingress_num_cpus: logical CPUs the deployments reserve (fractional
            on purpose: on a 2-core machine a replica holding every CPU starves the others; environment.md).
        num_gpus: GPUs for the model replica (0 on CPU).
        ray_address: join this cluster instead of starting an embedded local Ray.
        num_cpus: logical CPUs of the embedded Ray (None = this machine's, at least 4).
        verbose: let Ray's and Ray Serve's own log lines through to the terminal (`-v`); they always reach
            their files under Ray's session log folder.
    """

    weights_path: str
    weights_sha256: str
    weights_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    predictor: PredictorConfig = PredictorConfig()
    decode: DecodeOptions = DecodeOptions()
    orient: OrientConfig = field(default_factory=OrientConfig)
    max_upload_mb: float = 64.0
    max_files: int = 64
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.05
    prepare_replicas: int = 1
    prepare_threads: int = 2
    model_num_cpus: float = 1.0
    prepare_num_cpus: float = 1.0
    ingress_num_cpus: float = 0.25
    num_gpus: float = 0
    ray_address: str | None = None
    num_cpus: int | None = None
    verbose: bool = False

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
