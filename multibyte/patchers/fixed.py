"""MEGABYTE's patches: every unit holds exactly `patch_size` consecutive bytes of its parent unit
(the last one of a parent may be shorter when the parent's own length is not a multiple)."""

from multibyte.patchers import Patcher


class FixedPatcher(Patcher):
    """No rule: only the length limit (and the enclosing stage's starts) cut the stream."""
