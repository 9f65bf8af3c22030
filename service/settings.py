"""One Settings object, read from the environment (prefix BIT_), shared by API and worker.

Defaults are the embedded mode: SQLite file, local artifact directory and a Celery broker
that needs no server (kombu's filesystem transport), all under $BIT_HOME (./.bit).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Job queues are named after the job kinds that need their own workers; webhook deliveries
# have their own queue (and worker), so a callback never waits behind minutes of training.
JOB_QUEUES = ("finetune", "pretrain")
# The queue of each job kind. An evaluation is a forward pass over a dataset with a trained
# model: the fine-tuning workers have the device and the weights for it.
QUEUE_FOR_KIND = {"finetune": "finetune", "pretrain": "pretrain", "evaluate": "finetune"}
JOB_KINDS = tuple(QUEUE_FOR_KIND)
WEBHOOK_QUEUE = "webhooks"
QUEUES = (*JOB_QUEUES, WEBHOOK_QUEUE)


class Settings(BaseSettings):
    """Every knob of the service; override any with BIT_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="BIT_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path(os.environ.get("BIT_HOME", ".bit")))
    database_url: str = ""  # default: sqlite:///$BIT_HOME/bit.db
    broker_url: str = ""  # default: filesystem:// under $BIT_HOME/broker
    broker_key_prefix: str = ""  # Redis: namespace the broker's keys (a shared Redis)
    artifacts_url: str = ""  # default: $BIT_HOME/artifacts; any fsspec URL otherwise
    weights_dir: Path | None = None  # default: $BIT_HOME/weights

    # Jobs: a redelivered message must not start a second run while the first is alive.
    visibility_timeout_s: int = 48 * 3600  # longer than any job
    lease_s: int = 120  # a running job's lease; renewed by its heartbeat
    heartbeat_s: float = 10.0
    reconcile_every_s: float = 30.0
    # A queued job, or a due webhook delivery, older than this without a worker is re-sent.
    queued_grace_s: float = 60.0
    max_attempts: int = 3
    progress_every_s: float = 1.0  # throttle for progress writes to the database
    checkpoint_every: int = 50
    # `bit serve` supervises its worker (service/supervisor.py). A stopping worker gets a
    # warm shutdown (its run checkpoints and requeues itself) and is killed after the stop
    # bound; one that dies is restarted after a backoff doubling from `..._backoff_s` up to
    # `..._backoff_max_s`, reset once a worker has run `worker_stable_s`. An orphaned worker
    # (its `bit serve` was killed) also exits the stop bound after its shutdown began.
    worker_stop_timeout_s: float = Field(default=30.0, gt=0)
    worker_restart_backoff_s: float = Field(default=1.0, ge=0)
    worker_restart_backoff_max_s: float = Field(default=60.0, ge=0)
    worker_stable_s: float = Field(default=60.0, ge=0)
    # Files a killed upload or write left behind are removed once this old (see
    # service.db.orphans); far longer than any upload takes, as one may still be in flight.
    orphan_grace_s: float = 3600.0
    orphan_sweep_every_s: float = 600.0

    # Uploads and input checks.
    max_upload_bytes: int = 200 * 1024**2
    max_image_bytes: int = 20 * 1024**2
    max_image_pixels: int = 40_000_000
    max_zip_members: int = 20_000
    max_zip_ratio: int = 200  # uncompressed / compressed: above this a zip is a bomb
    min_images_per_class: int = 2
    max_classes: int = 1000
    max_label_chars: int = 128

    # Per API key: a token bucket of `rate_limit_burst` requests (0: one minute's worth),
    # refilled at `rate_limit_per_minute` (0: no limit). In Redis when the broker is Redis.
    rate_limit_per_minute: int = Field(default=600, ge=0)
    rate_limit_burst: int = Field(default=0, ge=0)
    # How long an API process trusts an API key or model it has read (service/lookups.py):
    # a key revoked or a model archived by another process is refused here at most this
    # long after. 0 reads the database on every request.
    lookup_cache_s: float = Field(default=1.0, ge=0, le=60)

    # Inference.
    model_cache_bytes: int = 2 * 1024**3
    batch_max_size: int = 32
    batch_max_wait_ms: float = 2.0
    dynamic_batching: bool = True
    device: str = "auto"
    # Fine-tuning and prediction: "auto" is bf16 autocast on CUDA and fp32 on a CPU; "bf16"
    # is faster on a CPU with AMX too (BENCHMARKS.md); "fp32" is the official code's.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Training jobs run with PyTorch's deterministic algorithms (bit_core.reproducibility):
    # GPU runs of one seed then repeat bit for bit, somewhat slower. CPU runs repeat anyway.
    deterministic: bool = False
    # What runs a model's backbone for predict (bit_core/backends.py): "auto" is what
    # benchmarks/backend_speed.py measured faster for the device (BENCHMARKS.md).
    inference_backend: Literal["auto", "torch", "onnxruntime"] = "auto"

    # Fine-tuning defaults for a CPU-only deployment can be lowered here.
    default_base_model: str = "BiT-M-R50x1"

    # Webhooks (job callbacks; service/webhooks). Signed with `webhook_secret` and, during a
    # rotation, also with `webhook_secret_previous`. On when a secret is set, unless
    # `webhooks_enabled` says otherwise; an enabled service refuses to start with a secret
    # shorter than MIN_WEBHOOK_SECRET_CHARS.
    webhook_secret: str = ""
    webhook_secret_previous: str = ""
    webhooks_enabled: bool | None = None
    # Comma-separated hosts, IP addresses or networks (CIDR) that a callback may reach even
    # though they are not public (an internal receiver; the tests' loopback one).
    webhook_allow: str = ""
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60)
    # Failed deliveries are retried with exponential backoff and jitter, from
    # `webhook_backoff_s` doubling up to `webhook_backoff_max_s`, for `webhook_retry_for_s`.
    webhook_backoff_s: float = Field(default=10.0, gt=0)
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0)
    webhook_retry_for_s: float = Field(default=24 * 3600.0, gt=0)

    # Per-tenant quotas (service/quotas): the defaults, which the admin API can override per
    # tenant. 0 means no limit.
    quota_stored_bytes: int = Field(default=20 * 1024**3, ge=0)
    quota_images: int = Field(default=200_000, ge=0)
    quota_models: int = Field(default=1000, ge=0)
    quota_active_jobs: int = Field(default=20, ge=0)
    quota_predictions_per_minute: int = Field(default=6000, ge=0)
    # Signs dashboard session cookies; empty: a random one kept in $BIT_HOME/session_secret.
    session_secret: str = ""

    # Pre-training: "local" runs torchrun on the worker's host (one node); "slurm" submits
    # the same torchrun command with sbatch across nodes.
    pretrain_launcher: str = "local"
    slurm_partition: str = ""
    pretrain_data_roots: str = ""  # comma-separated server folders a pretrain job may read

    host: str = "127.0.0.1"
    port: int = 8000
    # A worker serves its Prometheus metrics at http://<host>:<port>/metrics (worker/
    # metrics.py); 0: not served. `bit serve` gives its workers free ports (its job worker
    # this one, when set) and shows their metrics in the API's /metrics.
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_metrics_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        home = self.home.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{home / 'bit.db'}"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if not self.artifacts_url:
            self.artifacts_url = str(home / "artifacts")
        if self.weights_dir is None:
            self.weights_dir = Path(os.environ.get("BIT_WEIGHTS_DIR", home / "weights"))
        return self

    @property
    def broker_folder(self) -> Path:
        """Message folder of the embedded (filesystem) broker."""
        return self.home.resolve() / "broker"

    @property
    def onnx_cache_dir(self) -> Path:
        """This host's ONNX graphs of backbones, by weights sha256 (bit_core/backends.py)."""
        return self.home.resolve() / "cache" / "onnx"

    @property
    def embedded(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The process's settings (cached; tests clear the cache or override the dependency)."""
    return Settings()
