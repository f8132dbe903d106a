"""Where finished videos go: S3 (any S3-compatible endpoint, multipart) or a local directory.

An object appears only when its upload completes: S3 multipart uploads are invisible until completed,
and the local store writes `<key>.partial` and renames it. So a killed worker leaves nothing visible.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

PART_SIZE = 8 * 2**20  # S3 parts are >= 5 MiB (but the last) and <= 10,000 per object


class Upload(Protocol):
    def write(self, data: bytes) -> None: ...
    def complete(self) -> None: ...
    def abort(self) -> None: ...


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def upload(self, key: str) -> LocalUpload:
        return LocalUpload(self.root / key)

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def abort_stale(self, key: str) -> None:
        (self.root / f"{key}.partial").unlink(missing_ok=True)

    def url(self, key: str, expires_s: int = 3600) -> str:
        return (self.root / key).resolve().as_uri()


class LocalUpload:
    def __init__(self, path: Path):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.partial, "wb")  # noqa: SIM115 - closed by complete/abort

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def complete(self) -> None:
        self.file.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


class S3Store:
    """Credentials and region from the standard AWS chain; `endpoint_url` for S3-compatible stores."""

    def __init__(self, bucket: str, endpoint_url: str | None = None, part_size: int = PART_SIZE):
        import boto3

        if part_size < 5 * 2**20:
            raise ValueError(f"part_size must be >= 5 MiB (S3's minimum), got {part_size}")
        self.bucket = bucket
        self.client = boto3.client("s3", endpoint_url=endpoint_url)
        self.part_size = part_size

    def upload(self, key: str) -> S3Upload:
        return S3Upload(self, key)

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as err:
            if err.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

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
    def __init__(self, store: S3Store, key: str):
        self.store, self.key = store, key
        self.client = store.client
        self.upload_id = self.client.create_multipart_upload(
            Bucket=store.bucket, Key=key, ContentType="video/mp4"
        )["UploadId"]
        self.buffer = bytearray()
        self.parts: list[dict] = []

    def write(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= self.store.part_size:
            self._send(bytes(self.buffer[: self.store.part_size]))
            del self.buffer[: self.store.part_size]

    def complete(self) -> None:
        if self.buffer or not self.parts:
            self._send(bytes(self.buffer))
            self.buffer.clear()
        self.client.complete_multipart_upload(
            Bucket=self.store.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": self.parts},
        )

    def abort(self) -> None:
        self.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id)

    def _send(self, body: bytes) -> None:
        number = len(self.parts) + 1
        response = self.client.upload_part(
            Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body
        )
        self.parts.append({"PartNumber": number, "ETag": response["ETag"]})
