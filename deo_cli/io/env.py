"""GDAL settings for reading rasters, local or remote.

The cloud-read defaults TorchGeo and TerraTorch use make ``/vsicurl/``,
``s3://`` and ``https://`` COGs stream efficiently. They are applied with
``os.environ.setdefault``, so any value the user has set wins; unsigned S3 requests are only
the default when no AWS credentials are configured (unsigned requests break private buckets).
"""

from __future__ import annotations

import os
from pathlib import Path

GDAL_DEFAULTS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MULTIRANGE": "YES",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MAX_RETRY": "4",
    "GDAL_HTTP_RETRY_DELAY": "1",
    "VSI_CACHE": "TRUE",
    "VSI_CURL_CACHE_SIZE": str(64 * 1024 * 1024),
    "GDAL_SWATH_SIZE": str(256 * 1024 * 1024),
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.jp2,.vrt,.ovr,.msk,.xml",
}

_configured = False


def _aws_credentials_present() -> bool:
    if any(k in os.environ for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SESSION_TOKEN")):
        return True
    return (Path.home() / ".aws" / "credentials").exists()


def configure_gdal() -> None:
    """Set deo's GDAL defaults once per process, never overriding the user's values."""
    global _configured
    if _configured:
        return
    for key, value in GDAL_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not _aws_credentials_present():
        os.environ.setdefault("AWS_NO_SIGN_REQUEST", "YES")
    _configured = True


def gdal_path(source: str) -> str:
    """A GDAL path for a user-facing source: URLs become ``/vsicurl/``, ``/vsis3/``, ``/vsigs/``."""
    low = source.lower()
    if low.startswith(("http://", "https://")):
        return "/vsicurl/" + source
    if low.startswith("s3://"):
        return "/vsis3/" + source[5:]
    if low.startswith(("gs://", "gcs://")):
        return "/vsigs/" + source.split("://", 1)[1]
    if low.startswith(("az://", "azure://")):
        return "/vsiaz/" + source.split("://", 1)[1]
    return source


def is_remote(source: str) -> bool:
    return source.startswith("/vsi") or "://" in source
