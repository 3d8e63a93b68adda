"""Adapters in S3-compatible object storage (AWS S3, MinIO, R2, ...), through boto3.

`s3://bucket/prefix`: the objects `<prefix>/adapter_config.json` and `<prefix>/adapter_model.safetensors`, or
`s3://bucket/key.tar.gz` (any archive the upload accepts): that one object. Credentials, region and endpoint
come from boto3's usual chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE and
~/.aws, instance roles; AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for a non-AWS server. Objects stream into
the store's staging area: the byte limit is counted while downloading (and checked against the declared
sizes before).
"""

from __future__ import annotations

import re
from contextlib import ExitStack

from ...errors import (
    InvalidSourceError,
    InvalidUploadError,
    SourceAccessDeniedError,
    SourceNotFoundError,
    SourceUnavailableError,
    UploadTooLargeError,
    echo,
)
from ...peft_format import CONFIG_FILE, WEIGHTS_FILE
from ...store_upload import ARCHIVE_SUFFIXES, PICKLE_SUFFIXES

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "401", "ExpiredToken"}
_MISSING = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}


def parse_s3_location(location: str) -> tuple[str, str]:
    """(bucket, key or prefix without a trailing slash) of `s3://bucket/prefix`."""
    rest = location[len("s3://"):] if location.lower().startswith("s3://") else ""
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidSourceError(f"{echo(location)} is not s3://bucket/prefix", {"source": location[:200]})
    return bucket, prefix.strip("/")


class S3Source:
    schemes = ("s3",)

    def open(self, location: str, max_bytes: int, stack: ExitStack) -> list:
        try:
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
        except ImportError as exc:
            raise SourceUnavailableError("s3:// sources need boto3: pip install 'adapter-service[s3]'",
                                         {"source": location[:200]}) from exc
        bucket, prefix = parse_s3_location(location)
        details = {"source": location[:200], "bucket": bucket, "prefix": prefix}
        try:
            client = boto3.client("s3")
            if prefix.lower().endswith(ARCHIVE_SUFFIXES):
                keys = {prefix.rsplit("/", 1)[-1]: prefix}
            else:
                keys = self._adapter_keys(client, bucket, prefix, details)
            heads = {name: client.head_object(Bucket=bucket, Key=key) for name, key in keys.items()}
            if sum(int(h.get("ContentLength", 0)) for h in heads.values()) > max_bytes:
                raise UploadTooLargeError(max_bytes, f"adapter at {location[:200]}")
            files = []
            for name, key in keys.items():
                body = client.get_object(Bucket=bucket, Key=key)["Body"]  # streamed: read in chunks by the store
                stack.callback(body.close)
                files.append((name, body))
            return files
        except NoCredentialsError as exc:
            raise SourceAccessDeniedError(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)", details) from exc
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            message = f"S3 {code or 'error'} for s3://{bucket}/{prefix}"
            if code in _DENIED:
                raise SourceAccessDeniedError(message + ": check the credentials", {**details, "code": code}) from None
            if code in _MISSING:
                raise SourceNotFoundError(message, {**details, "code": code}) from None
            raise SourceUnavailableError(message, {**details, "code": code}) from None
        except BotoCoreError as exc:  # endpoint unreachable, bad configuration
            raise SourceUnavailableError(f"cannot reach S3 for s3://{bucket}/{prefix}: {exc}", details) from None

    @staticmethod
    def _adapter_keys(client, bucket: str, prefix: str, details: dict) -> dict[str, str]:
        """The adapter's object keys under `prefix/` (a listing names what is there when something is missing)."""
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", Delimiter="/",
                                        MaxKeys=100)
        names = {obj["Key"].rsplit("/", 1)[-1]: obj["Key"] for obj in listed.get("Contents", [])}
        keys = {name: names[name] for name in (CONFIG_FILE, WEIGHTS_FILE) if name in names}
        if WEIGHTS_FILE not in keys:
            pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
            if pickles:
                keys[pickles[0]] = names[pickles[0]]  # refused by the store with its conversion hint
            elif not names:
                raise SourceNotFoundError(f"nothing under s3://{bucket}/{prefix}/", details)
            else:
                raise InvalidUploadError(
                    f"s3://{bucket}/{prefix}/ has no {WEIGHTS_FILE}", {**details, "found": sorted(names)[:20]})
        return keys
