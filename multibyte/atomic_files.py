"""Writing a file so that a reader never sees half of it.

Every output the suite writes (checkpoints, exports, compressed files, bench reports, tokenizers)
goes through `write_atomically`: a temporary file in the same folder, flushed and fsynced, then
renamed over the target (`os.replace` is atomic within one file system). Whatever kills the writer,
the target is the old file or the new one; a failed write deletes its temporary.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Union

PathLike = Union[str, os.PathLike]


def write_atomically(path: PathLike, data: Union[bytes, Callable[[BinaryIO], None]]) -> None:
    """Write `data` (bytes, or a function that writes into the open binary file) to `path`
    atomically; parent folders are created. The file gets the usual permissions (0666 minus the
    umask), not the temporary file's 0600, so runs shared between users stay readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            if callable(data):
                data(file)
            else:
                file.write(data)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible everywhere)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
