"""URIs (local paths, `s3://bucket/prefix`) as pyarrow filesystems; atomic writes; manifests.

Every stage writes under the run's workdir through this module, so the same code runs on a
laptop's disk and on a cluster's object store. Writes are atomic: a local file is written to a
temporary name and renamed; an object store PUT only becomes visible once complete. A stage is
complete when `<stage>/manifest.json` exists: it is written last and lists every file the stage
wrote with its sha256, size and (for Parquet) row count.
"""

from __future__ import annotations

import errno
import hashlib
import fcntl
import io
import json
import os
import posixpath
import time
import uuid
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cmevlm.config import StorageConfig
from cmevlm.errors import MissingInput

MANIFEST = "manifest.json"


def _ends_with_newline(fd: int) -> bool:
    """True for an empty file or one whose last byte is a newline."""
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def _write_all(fd: int, data: bytes) -> None:
    """Every byte of `data` to `fd` (O_APPEND), or OSError with the file as it was."""
    start, done = os.fstat(fd).st_size, 0
    try:
        while done < len(data):
            n = os.write(fd, memoryview(data)[done:])
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress")
            done += n
    except OSError:
        if done and os.fstat(fd).st_size == start + done:  # nobody appended meanwhile: take the torn part back
            os.ftruncate(fd, start)
        raise


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *[p.strip("/") for p in parts])
    return str(Path(uri, *parts))


def stage_uri(cfg, path: str) -> str:
    """A stage path under the run's workdir, unless it is already a URI or an absolute path."""
    return path if is_s3(path) or os.path.isabs(path) else join(cfg.workdir, path)


def s3_options(cfg: StorageConfig) -> dict[str, Any]:
    """Endpoint, region and keys for S3 clients: config first, then the AWS environment."""
    endpoint = cfg.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {
        "endpoint": endpoint,
        "region": cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "access_key_id": cfg.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret_access_key": cfg.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
    }


class Storage:
    """Reads and writes files under local paths and s3:// URIs with one interface."""

    def __init__(self, cfg: StorageConfig | None = None):
        self.cfg = cfg or StorageConfig()
        self._s3: pafs.S3FileSystem | None = None

    # -- filesystems ------------------------------------------------------------------------

    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """URI -> (pyarrow filesystem, path inside it)."""
        uri = str(uri)
        if is_s3(uri):
            p = urlparse(uri)
            return self.s3(), f"{p.netloc}{p.path}".rstrip("/")
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())

    def s3(self) -> pafs.S3FileSystem:
        if self._s3 is None:
            o = s3_options(self.cfg)
            kw: dict[str, Any] = {"region": o["region"]}
            if o["access_key_id"]:
                kw.update(access_key=o["access_key_id"], secret_key=o["secret_access_key"])
            if o["endpoint"]:
                ep = urlparse(o["endpoint"])
                kw.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
            self._s3 = pafs.S3FileSystem(**kw)
        return self._s3

    # -- files ------------------------------------------------------------------------------

    def exists(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_bytes(self, uri: str) -> bytes:
        fs, path = self.resolve(uri)
        with fs.open_input_stream(path) as f:
            return f.read()

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write atomically: readers see the old file or the whole new one, never a part."""
        fs, path = self.resolve(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # an object PUT is atomic; the object appears only when complete
            with fs.open_output_stream(path) as f:
                f.write(data)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def append_text(self, uri: str, text: str, fsync: bool = False) -> None:
        """Append `text` whole, or raise. On local disk: O_APPEND writes (lines from several
        processes never interleave), looping over short writes; a write that fails part-way
        (disk full, file-size limit) is taken back, so no torn line is left and nothing
        says "saved". `fsync`: return only once the line (and a new file's name) is on disk.
        On object storage, which has no append, each call writes its own part object beside
        `uri` (`<uri>.d/<time>-<random>`): concurrent writers never overwrite each other;
        `read_appended` reads the file and its parts in order."""
        fs, path = self.resolve(uri)
        data = text.encode("utf-8")
        if not isinstance(fs, pafs.LocalFileSystem):
            with fs.open_output_stream(f"{path}.d/{time.time_ns():020d}-{uuid.uuid4().hex[:12]}") as f:
                f.write(data)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        created = not os.path.exists(path)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the look at the last byte and the write, one writer at a time
            if not _ends_with_newline(fd):
                data = b"\n" + data  # after a torn last line: start a line of our own, so the torn one costs only itself
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)  # (releases the lock)
        if fsync and created:
            dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def read_appended(self, uri: str) -> str:
        """What `append_text` wrote to `uri`: the file, then its part objects (object storage)
        in the order they were written; "" when there is nothing."""
        pieces = [self.read_text(uri)] if self.exists(uri) else []
        if is_s3(uri):
            pieces += [self.read_text(p) for p in self.list_files(uri + ".d")]
        # each piece is whole lines; a piece without its last newline must not glue onto the next
        return "".join(p if p.endswith("\n") or i == len(pieces) - 1 else p + "\n" for i, p in enumerate(pieces))

    def list_files(self, uri: str, suffix: str = "") -> list[str]:
        """Every file below `uri` (recursive), as URIs of the same kind, sorted."""
        fs, path = self.resolve(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type == pafs.FileType.File:
            return [str(uri)]
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        rels = sorted(
            posixpath.relpath(i.path, path)
            for i in infos
            if i.type == pafs.FileType.File and i.path.endswith(suffix) and ".tmp-" not in i.path
        )
        return [join(str(uri), r) for r in rels]

    def delete(self, uri: str) -> None:
        """Remove a file or a whole folder/prefix; no error when absent."""
        fs, path = self.resolve(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)

    # -- Parquet ----------------------------------------------------------------------------

    def write_parquet(self, uri: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(uri, buf.getvalue())

    def read_parquet(self, uri: str, columns: list[str] | None = None) -> pa.Table:
        """One Parquet file, or every `.parquet` below a folder, as one table."""
        files = self.list_files(uri, ".parquet")
        tables = []
        for f in files:
            fs, path = self.resolve(f)
            tables.append(pq.read_table(path, filesystem=fs, columns=columns))
        if not tables:
            raise MissingInput(f"no Parquet files under {uri}")
        return pa.concat_tables(tables, promote_options="default")

    # -- manifests --------------------------------------------------------------------------

    def write_manifest(self, stage_uri: str, files: Iterable[str] | None = None, **extra: Any) -> dict:
        """Write `<stage_uri>/manifest.json` last, listing the stage's files.

        `files` are URIs under `stage_uri` (default: every file there). Parquet files get a
        row count. Returns the manifest."""
        files = sorted(self.list_files(stage_uri) if files is None else files)
        entries = []
        for f in files:
            if posixpath.basename(f) == MANIFEST:
                continue
            data = self.read_bytes(f)
            entry = {"path": _rel(f, stage_uri), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            if f.endswith(".parquet"):
                entry["rows"] = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
            entries.append(entry)
        manifest = {"complete": True, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": entries, **extra}
        self.write_json(join(stage_uri, MANIFEST), manifest)
        return manifest

    def read_manifest(self, stage_uri: str) -> dict | None:
        uri = join(stage_uri, MANIFEST)
        return self.read_json(uri) if self.exists(uri) else None

    def is_complete(self, stage_uri: str) -> bool:
        """True when the stage wrote its manifest and every file it lists is still there."""
        m = self.read_manifest(stage_uri)
        return bool(m and m.get("complete") and all(self.exists(join(stage_uri, e["path"])) for e in m["files"]))

    # -- local copies -----------------------------------------------------------------------

    def local_dir(self, uri: str) -> Path:
        """A local folder with the contents of `uri`: the path itself, or a cached download."""
        if not is_s3(uri):
            return Path(uri).expanduser()
        key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
        dest = Path(self.cfg.cache_dir).expanduser() / "s3" / key
        done = dest / ".complete"
        if done.exists():
            return dest
        for f in self.list_files(uri):
            rel = _rel(f, uri)
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(self.read_bytes(f))
        done.write_text(uri)
        return dest

    def upload_dir(self, local: str | Path, uri: str) -> None:
        """Copy a local folder to `uri` (local or s3://), file by file, atomically each."""
        local = Path(local)
        for p in sorted(local.rglob("*")):
            if p.is_file():
                self.write_bytes(join(uri, p.relative_to(local).as_posix()), p.read_bytes())


def _rel(uri: str, base: str) -> str:
    return posixpath.relpath(str(uri).replace(os.sep, "/"), str(base).replace(os.sep, "/").rstrip("/"))
