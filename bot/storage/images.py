"""Image files under ``data_dir/images``: written atomically, read back only from inside the data dir.

Images are written to a temporary file, fsynced and renamed into place, so a reader sees the old file,
the new one or none, never a partial one. File work runs in worker threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
from pathlib import Path

IMAGES_DIRNAME = "images"
TMP_PREFIX = ".tmp-"
_SAFE_NAME_PART = re.compile(r"[A-Za-z0-9_-]+")
_SAFE_EXT = re.compile(r"[A-Za-z0-9]+")
_STALE_TMP_S = 3600.0  # leftovers of a crash mid-write; younger ones may belong to a live process


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; best effort because some platforms cannot open directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write via temp file + fsync + os.replace, so a full disk or crash never leaves a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def remove_stale_temp_files(images_dir: Path, now: float) -> None:
    """Delete temporary files a crash left behind (only those older than an hour)."""
    for leftover in images_dir.glob(TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > _STALE_TMP_S:
                leftover.unlink()


class ImageFiles:
    """The ``images/`` folder of :class:`~bot.storage.Store`; rows name files by path relative to ``data_dir``."""

    data_dir: Path
    images_dir: Path

    async def save_image(self, job_id: str, kind: str, data: bytes, ext: str = "png") -> str:
        """Write ``images/<job_id>-<kind>.<ext>`` atomically and return that relative path.

        The file is fsynced before this returns, so a job row that names it (written afterwards) never
        points at a missing or partial image after a crash. I/O errors (disk full) raise OSError and leave
        no temporary file and any earlier version intact; the database is not touched.
        """
        for label, value, pattern in (("job id", job_id, _SAFE_NAME_PART), ("kind", kind, _SAFE_NAME_PART),
                                      ("extension", ext, _SAFE_EXT)):
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise ValueError(f"unsafe image {label}: {value!r}")
        relative = f"{IMAGES_DIRNAME}/{job_id}-{kind}.{ext}"
        await asyncio.to_thread(atomic_write, self.data_dir / relative, bytes(data))
        return relative

    def image_path(self, relative: str) -> Path:
        """Absolute path for a stored relative path; ValueError if it is absolute or escapes ``data_dir``.

        Paths come from the database, so a tampered row must not make the bot read or send arbitrary files.
        """
        if not relative or Path(relative).is_absolute():
            raise ValueError(f"not a relative image path: {relative!r}")
        resolved = (self.data_dir / relative).resolve()  # follows symlinks, so links out are refused too
        if resolved == self.data_dir or not resolved.is_relative_to(self.data_dir):
            raise ValueError(f"image path escapes the data directory: {relative!r}")
        return resolved

    async def read_image(self, relative: str | None) -> bytes | None:
        """The file's bytes, or None when there is no path or the file is gone (pruned, lost in a crash)."""
        if not relative:
            return None

        def read() -> bytes | None:
            try:
                return self.image_path(relative).read_bytes()
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(read)

    async def existing_image_path(self, relative: str | None) -> str | None:
        """The absolute path of a stored image that exists, else None (for a worker to read it itself)."""
        if not relative:
            return None

        def check() -> str | None:
            path = self.image_path(relative)
            return str(path) if path.is_file() else None

        return await asyncio.to_thread(check)

    async def remove_image(self, relative: str) -> None:
        """Delete a stored image; a path that is gone or unsafe is left alone."""

        def remove() -> None:
            with contextlib.suppress(OSError, ValueError):
                self.image_path(relative).unlink()

        await asyncio.to_thread(remove)
