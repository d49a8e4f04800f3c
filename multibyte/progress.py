"""Progress bars for long `bench`, `compress` and `decompress` runs: tqdm on stderr, never stdout
(which carries the report, or compressed bytes when a caller streams them there).

`enabled`: True always draws the bar, False never, None only when stderr is a terminal (so logs
and pipes stay clean). Callers pass False on every rank but 0 under torch.distributed.
"""

from __future__ import annotations

import sys
from typing import Optional

from tqdm.auto import tqdm


def progress_wanted(enabled: Optional[bool]) -> bool:
    """`enabled`, with None meaning: stderr is a terminal."""
    if enabled is None:
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    return bool(enabled)


def progress_bar(total: int, description: str, unit: str, enabled: Optional[bool]) -> tqdm:
    """A bar of `total` `unit`s on stderr, or a silent stand-in (same methods) when not wanted."""
    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        unit_scale=unit == "B",  # 1.2MB/3.4MB for bytes; whole windows and tokens counted as they are
        file=sys.stderr,
        disable=not progress_wanted(enabled),
        dynamic_ncols=True,
        leave=True,  # the finished bar stays: its rate and time are worth reading
    )
