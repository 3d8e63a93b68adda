"""A transfer's progress on one line of a terminal, redrawn in place: `upload my-adapter:  42% 1.1 MiB / 2.6 MiB`
(or `export my-adapter: 12.0 MiB` while the size is not known).

A few lines of our own instead of a progress-bar library, so the client package needs nothing but httpx.
"""

from __future__ import annotations

from typing import TextIO


def format_bytes(n_bytes: int) -> str:
    """`512 B`, `1.5 KiB`, `2.0 MiB`, `3.1 GiB`."""
    if n_bytes < 1024:
        return f"{n_bytes} B"
    size = n_bytes / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


class ProgressLine:
    """A `progress(sent, total)` callback that redraws `<label>: <percent>% <sent> / <total>` on `stream`.

    It draws only when the whole percent changes (at most 101 redraws per upload, however many chunks), and
    nothing before the first call, so an upload that fails before sending leaves the stream untouched.
    `close()` ends the line.
    """

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label, self.stream = label, stream
        self._percent: int | None = None  # the last one drawn

    def __call__(self, sent: int, total: int | None) -> None:
        if total is None:  # a stream of unknown length: redraw at each new tenth of a MiB
            step = sent * 10 // (1024 * 1024)
            if step == self._percent:
                return
            self._percent = step
            self.stream.write(f"\r{self.label}: {format_bytes(sent)}")
            self.stream.flush()
            return
        percent = 100 * sent // total if total else 100
        if percent == self._percent:
            return
        self._percent = percent
        self.stream.write(f"\r{self.label}: {percent:3d}% {format_bytes(sent)} / {format_bytes(total)}")
        self.stream.flush()

    def close(self) -> None:
        if self._percent is not None:
            self.stream.write("\n")
            self.stream.flush()
            self._percent = None
