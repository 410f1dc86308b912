"""The one progress bar every long edgecl job shows (training epochs, exports, comparisons).

tqdm where it is installed (device installs may lack it: then plain iteration, silently). A bar is drawn only when
asked for *and* stderr is a terminal, so a redirected log (`make demo > log`) is not flooded with redraws."""
from __future__ import annotations

from typing import Any, Iterable


class _Silent:
    """Stands in for a bar where tqdm is missing: same calls, no output."""

    def __init__(self, iterable: Iterable | None = None) -> None:
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        enabled: bool = True, leave: bool = False) -> Any:
    """A tqdm bar over `iterable` (or advanced by `update()` up to `total`); silent when `enabled` is false, when
    stderr is not a terminal, or when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent(iterable)
    # disable=None is tqdm's own rule: no bar when the stream is not a TTY
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                disable=None if enabled else True)
