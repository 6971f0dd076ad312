"""Object storage: the one place mmpipe turns a URL (``s3://bucket/prefix``, any fsspec URL) into
files, and publishes/reads a shard set on a store that has no rename.

Credentials and endpoint come from the standard environment only (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, a profile, an instance role: whatever the
fsspec backend reads), never from params, and are never logged: ``redact`` strips any
``user:password@`` from a URL before it reaches a message.

A shard set on an object store (``publish_shards``) is a *versioned prefix* plus a pointer::

    <url>/v-<first 16 hex of the manifest's sha256>/{split}-NNNNNN.tar, manifest.json
    <url>/LATEST   {"version": "v-...", "manifest_sha256": "..."}   written last

An object PUT is all-or-nothing but a prefix cannot be renamed into place, so the version's
objects are uploaded first and the small pointer object is replaced last: a reader resolves the
pointer (``resolve_shard_bytes``) and sees the old version or the new one, never a mix. A version is
content-addressed (same manifest, same prefix), so publishing the same shards twice re-uploads
nothing that is already there with the right size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from mmpipe.errors import InputError

log = logging.getLogger(__name__)

POINTER = "LATEST"
MANIFEST = "manifest.json"  # a shard set's manifest: its content is mmpipe.manifest's
REJECTS = "rejects.jsonl"  # shard's pairs left out (ingest.image_check: header, the default)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_url(path: str | Path) -> bool:
    """True for a URL with a scheme other than ``file://`` (those are local paths)."""
    match = _SCHEME.match(str(path))
    return match is not None and match.group(1).lower() != "file"


def redact(url: str) -> str:
    """``url`` without any ``user:password@`` (safe to log)."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", str(url))


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for ``url`` from the environment (the S3 endpoint of a local/MinIO store).

    botocore reads ``AWS_ENDPOINT_URL`` itself from 1.31; passing it explicitly keeps older
    backends and s3fs's own client on the same endpoint.
    """
    if url.startswith(("s3://", "s3a://")) and os.environ.get("AWS_ENDPOINT_URL"):
        return {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
    return {}


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path inside it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **storage_options(url))
    except (ImportError, ValueError) as exc:
        raise InputError(f"{redact(url)}: no filesystem for this URL ({exc})") from None


def join(url: str, *parts: str) -> str:
    """``url`` with ``parts`` appended, one ``/`` between each."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def open_url(url: str, mode: str = "rb") -> Any:
    """An open file object for ``url`` (a local path or any fsspec URL)."""
    if not is_url(url):
        return open(url, mode)  # noqa: SIM115 - the caller closes it
    fs, path = filesystem(url)
    try:
        return fs.open(path, mode)
    except FileNotFoundError:
        raise InputError(f"{redact(url)}: no such object") from None


def size(url: str) -> int:
    """Size in bytes of the file or object at ``url``."""
    if not is_url(url):
        return os.stat(url).st_size
    fs, path = filesystem(url)
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        raise InputError(f"{redact(url)}: no such object") from None


def read_json_url(url: str) -> Any:
    """JSON at ``url``; an InputError naming it if missing or not JSON."""
    with open_url(url, "rb") as fh:
        raw = fh.read()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{redact(url)}: not JSON ({exc})") from None


# ----------------------------------------------------------------------------- sources

MIRROR_INDEX = ".mmpipe-mirror.json"


def remote_listing(url: str) -> dict[str, dict[str, Any]]:
    """Every object under ``url``: relative name -> {size, etag}, without reading any."""
    fs, root = filesystem(url)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    if not found:
        raise InputError(f"{redact(url)}: no objects under this prefix (ingest.root)")
    base = root.rstrip("/") + "/"
    return {
        path[len(base) :]: {"size": int(info.get("size") or 0), "etag": str(info.get("ETag", ""))}
        for path, info in sorted(found.items())
        if info.get("type") != "directory" and path.startswith(base)
    }


def mirror(url: str, dest: str | Path) -> dict[str, Any]:
    """Make ``dest`` a copy of the objects under ``url``, fetching only new or changed ones.

    What ingest reads from an object store: the captions file and images land in a local
    directory (paths relative to it, so records and shards are byte-identical to a local copy of
    the same data). An object is fetched again when its size or ETag changed; files whose object
    was deleted are removed. Each file is written to a temp name and renamed (no partial file).
    Returns ``{"dest", "objects", "fetched", "reused", "removed"}``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    listing = remote_listing(url)
    index_path = dest / MIRROR_INDEX
    old = json.loads(index_path.read_text()) if index_path.is_file() else {}
    fs, root = filesystem(url)
    fetched = 0
    for name, info in listing.items():
        target = dest / name
        if old.get(name) == info and target.is_file() and target.stat().st_size == info["size"]:
            continue
        if ".." in Path(name).parts:  # an object key cannot put a file outside dest
            raise InputError(f"{redact(join(url, name))}: key leaves the mirror directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        fs.get_file(join(root, name), str(tmp))
        os.replace(tmp, target)
        fetched += 1
    removed = 0
    for name in set(old) - set(listing):
        with contextlib.suppress(FileNotFoundError):
            (dest / name).unlink()
            removed += 1
    index_path.write_text(json.dumps(listing, indent=1, sort_keys=True))
    log.info("ingest source %s: %d objects, %d fetched, %d removed (mirror %s)",
             redact(url), len(listing), fetched, removed, dest)  # fmt: skip
    reused = len(listing) - fetched
    return {"dest": str(dest), "objects": len(listing), "fetched": fetched, "reused": reused,
            "removed": removed}  # fmt: skip


def listing_digest(url: str) -> str:
    """sha256 of the objects' names, sizes and ETags under ``url`` (a cheap change check)."""
    blob = json.dumps(remote_listing(url), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


# ----------------------------------------------------------------------------- shard sets


def _manifest_version(manifest_bytes: bytes) -> tuple[str, str]:
    sha = hashlib.sha256(manifest_bytes).hexdigest()
    return f"v-{sha[:16]}", sha


def publish_shards(shard_dir: str | Path, url: str) -> dict[str, Any]:
    """Upload a committed local shard set to ``url`` as a new version, then move the pointer.

    Returns ``{"url", "version", "uploaded", "reused"}``. Shards already in the version's prefix
    with the manifest's byte size are not uploaded again (a re-run after a kill resumes). Shard's
    ``rejects.jsonl`` (when there is one) goes with them, so its named rejects travel with the
    counts in the manifest.
    """
    shard_dir = Path(shard_dir)
    manifest_bytes = (shard_dir / MANIFEST).read_bytes()
    # the raw JSON, not mmpipe.manifest's model (which reads through this module): the set's
    # file names and sizes are all publishing needs, and the manifest goes up byte for byte
    manifest = json.loads(manifest_bytes)
    version, sha = _manifest_version(manifest_bytes)
    fs, root = filesystem(url)
    prefix = join(root, version)
    sizes = {s["name"]: s["bytes"] for sp in manifest["splits"].values() for s in sp["shards"]}
    uploaded, reused = 0, 0
    for name in sizes:
        target = join(prefix, name)
        if fs.exists(target) and fs.size(target) == sizes[name]:
            reused += 1
            continue
        fs.put_file(str(shard_dir / name), target)  # one PUT (multipart for large): whole or none
        uploaded += 1
    if (shard_dir / REJECTS).is_file():
        fs.put_file(str(shard_dir / REJECTS), join(prefix, REJECTS))
    fs.pipe_file(join(prefix, MANIFEST), manifest_bytes)
    # last: the pointer; a reader resolving it before this line still gets the old version
    pointer = json.dumps({"version": version, "manifest_sha256": sha}, indent=1).encode()
    fs.pipe_file(join(root, POINTER), pointer)
    log.info("shards published to %s (%d uploaded, %d already there)",
             redact(join(url, version)), uploaded, reused)  # fmt: skip
    return {"url": join(url, version), "version": version, "uploaded": uploaded, "reused": reused}


def pinned_version(url: str, manifest_sha256: str) -> str:
    """The URL of the version of the publication root ``url`` whose manifest has this sha256."""
    return join(url, f"v-{manifest_sha256[:16]}")


def resolve_shard_bytes(url: str) -> tuple[str, bytes]:
    """The version URL that ``url`` names, and its manifest's bytes.

    ``url`` is a publication root (its ``LATEST`` pointer names the version) or one version
    itself (``.../v-<16 hex>``: pinned, e.g. the data a past run trained on). Either way the
    manifest's sha256 is checked (against the pointer's, or the version's name), so a manifest
    modified after publishing, or a pointer and manifest of two publications, never pair up.
    """
    url = url.rstrip("/")
    name = url.rsplit("/", 1)[-1]
    if re.fullmatch(r"v-[0-9a-f]{16}", name):
        version_url, want, source = url, name[2:], url
    else:
        source = join(url, POINTER)
        pointer = read_json_url(source)
        if not isinstance(pointer, dict) or not re.fullmatch(
            r"v-[0-9a-f]{16}", str(pointer.get("version", ""))
        ):
            raise InputError(f"{redact(source)}: not a shard pointer (no version)")
        version_url, want = join(url, pointer["version"]), str(pointer.get("manifest_sha256"))
    with open_url(join(version_url, MANIFEST), "rb") as fh:
        manifest_bytes = fh.read()
    if not hashlib.sha256(manifest_bytes).hexdigest().startswith(want):
        raise InputError(
            f"{redact(join(version_url, MANIFEST))}: sha256 differs from {redact(source)}'s "
            "(modified after publishing); publish the shards again"
        )
    return version_url, manifest_bytes


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    del bufsize, kw  # fsspec buffers itself
    return open_url(url, mode)


def register_webdataset_schemes() -> None:
    """Let webdataset open every fsspec protocol it has no handler for (``s3``, ``az``,
    ``memory``, ...) through fsspec; its own (``pipe``, ``http(s)``, ``gs``, ...) stay. Idempotent;
    called at import of ``mmpipe.data``, so loader worker processes have it too."""
    import importlib

    import fsspec

    # the module: the package re-exports a function of the same name
    gopen = importlib.import_module("webdataset.gopen")
    for scheme in fsspec.available_protocols():
        gopen.gopen_schemes.setdefault(scheme, _fsspec_gopen)
