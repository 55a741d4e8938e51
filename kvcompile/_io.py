"""Small file helpers shared by the artifact writers (plans, kernel sources)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers see either the old file or the whole new one.

    The temp file lives in the same folder (``os.replace`` is atomic only within a file system) and
    is fsynced before the rename; on any failure it is removed and the old file stays.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
