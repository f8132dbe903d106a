"""Where finished videos go: S3 (any S3-compatible endpoint, multipart) or a local directory.

A worker first encodes a job's video into a local spool file, then `store.upload(key, path).send()`
copies that file to the object, again after each failure while the store is away (`transient` tells an
outage from a mistake that no retry fixes, such as a missing bucket). An S3 upload resumes at its first
part not yet stored. An object appears only when its upload completes: S3 multipart uploads are
invisible until completed, and the local store writes `<key>.partial` and renames it. So a killed
worker leaves nothing visible.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

PART_SIZE = 8 * 2**20  # S3 parts are >= 5 MiB (but the last) and <= 10,000 per object
# S3 error codes worth another try: the service busy or failing, or our multipart upload aborted meanwhile
RETRIED_CODES = {
    "InternalError",
    "NoSuchUpload",
    "RequestTimeout",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
}


class Stopped(Exception):
    """`send` stopped between parts because its `stop()` said so (the job was cancelled)."""


class Upload(Protocol):
    def send(self, stop: Callable[[], bool] = ...) -> None: ...
    def abort(self) -> None: ...


def never() -> bool:
    return False


def transient(err: BaseException) -> bool:
    """Whether a failed `send` may succeed later: the store unreachable, timing out or overloaded, a
    disk full; not a missing bucket, denied access or a missing file, which no retry fixes."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or err.response.get("Error", {}).get("Code") in RETRIED_CODES
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return False
    return isinstance(err, (BotoConnectionError, HTTPClientError, OSError))


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def upload(self, key: str, path: str | Path) -> LocalUpload:
        return LocalUpload(Path(path), self.root / key)

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def abort_stale(self, key: str) -> None:
        (self.root / f"{key}.partial").unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        """Where the object is (the service serves it at GET /v1/jobs/{id}/video.mp4)."""
        return self.root / key


class LocalUpload:
    def __init__(self, source: Path, target: Path):
        self.source, self.target = source, target
        self.partial = target.with_name(target.name + ".partial")

    def send(self, stop: Callable[[], bool] = never) -> None:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.source, self.partial)
        if stop():
            raise Stopped(str(self.target))
        os.replace(self.partial, self.target)

    def abort(self) -> None:
        self.partial.unlink(missing_ok=True)


class S3Store:
    """Credentials and region from the standard AWS chain; `endpoint_url` for S3-compatible stores.
    `max_attempts` and `timeout_s` bound one request (botocore's own retries); the worker retries the
    upload beyond that for as long as S3 is away."""

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        part_size: int = PART_SIZE,
        max_attempts: int = 3,
        timeout_s: float = 60.0,
    ):
        import boto3
        from botocore.config import Config

        if part_size < 5 * 2**20:
            raise ValueError(f"part_size must be >= 5 MiB (S3's minimum), got {part_size}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.bucket = bucket
        config = Config(
            connect_timeout=min(timeout_s, 10),
            read_timeout=timeout_s,
            retries={"mode": "standard", "max_attempts": max_attempts},
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self.part_size = part_size

    def upload(self, key: str, path: str | Path) -> S3Upload:
        return S3Upload(self, key, Path(path))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as err:
            if err.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def abort_stale(self, key: str) -> None:
        """Abort uploads of `key` a dead worker left open (they would cost storage, never show)."""
        listing = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=key)
        for upload in listing.get("Uploads", []):
            if upload["Key"] == key:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"])

    def url(self, key: str, expires_s: int = 3600) -> str:
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
        )


class S3Upload:
    """A file to one object by multipart upload. `send` again after a failure resumes at the first part
    not yet stored (or starts over if the upload was aborted meanwhile)."""

    def __init__(self, store: S3Store, key: str, path: Path):
        self.store, self.key, self.path = store, key, path
        self.client = store.client
        self.upload_id: str | None = None
        self.parts: list[dict] = []

    def send(self, stop: Callable[[], bool] = never) -> None:
        from botocore.exceptions import ClientError

        bucket, size = self.store.bucket, self.store.part_size
        try:
            if self.upload_id is None:
                self.store.abort_stale(self.key)  # an earlier attempt's, left by a dead worker
                self.upload_id = self.client.create_multipart_upload(
                    Bucket=bucket, Key=self.key, ContentType="video/mp4"
                )["UploadId"]
                self.parts = []
            count = max(1, -(-self.path.stat().st_size // size))  # an empty file is one empty part
            with open(self.path, "rb") as file:
                for number in range(len(self.parts) + 1, count + 1):
                    if stop():
                        raise Stopped(self.key)
                    file.seek((number - 1) * size)
                    response = self.client.upload_part(
                        Bucket=bucket,
                        Key=self.key,
                        UploadId=self.upload_id,
                        PartNumber=number,
                        Body=file.read(size),
                    )
                    self.parts.append({"PartNumber": number, "ETag": response["ETag"]})
            self.client.complete_multipart_upload(
                Bucket=bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts}
            )
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "NoSuchUpload":
                self.upload_id = None  # aborted (or completed) meanwhile: the next send starts over
            raise

    def abort(self) -> None:
        if self.upload_id is not None:
            self.client.abort_multipart_upload(
                Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id
            )
            self.upload_id = None
