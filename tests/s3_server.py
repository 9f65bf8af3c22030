"""An S3-compatible server on loopback for tests: moto's server mode, a real HTTP S3 API
that the service reaches through s3fs exactly as it would reach AWS or MinIO."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.polling import free_port, wait_for

# moto accepts any credentials; the service reads these through botocore's usual variables.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bit-test-key",
    "AWS_SECRET_ACCESS_KEY": "bit-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a host needs to reach this server (botocore reads AWS_ENDPOINT_URL)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> S3Server:
        with open(self.log, "ab") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def answers() -> bool:
            try:
                return httpx.get(f"{self.endpoint}/moto-api/", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, 60, "the S3 server (moto) to answer")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def new_bucket(self) -> str:
        name = f"bit-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in `bucket` under `prefix`, sorted."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def puts(self, bucket: str, prefix: str = "") -> int:
        """PUT requests (whole objects and multipart parts) the server logged under
        `bucket/prefix`."""
        pattern = re.compile(rf'"PUT /{re.escape(bucket)}/{re.escape(prefix)}\S* HTTP')
        return len(pattern.findall(self.log.read_text(errors="replace")))
