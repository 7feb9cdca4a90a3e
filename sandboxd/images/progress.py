"""Progress of pulls and pushes: one bar, redrawn in place, on a terminal; elsewhere (logs, CI)
a line per layer when it starts and when it ends."""

from __future__ import annotations

import time
from typing import TextIO

from sandboxd.units import human_bytes

REDRAW_INTERVAL_S = 0.1
BAR_CHARS = 30


class Transfer:
    """The layers of one pull or push, and the bytes moved so far."""

    def __init__(self, out: TextIO, verb: str, interactive: bool | None = None) -> None:
        self.out = out
        self.verb = verb  # "pull" or "push": shown as "pulled", "pushing"...
        self.interactive = out.isatty() if interactive is None else interactive
        self.total_bytes = 0
        self.done_bytes = 0
        self.layers = 0
        self.layers_done = 0
        self._drawn_at = 0.0
        self._finished = False

    def layer(self, digest: str, size_bytes: int) -> LayerProgress:
        self.layers += 1
        self.total_bytes += size_bytes
        return LayerProgress(self, digest, size_bytes)

    def _line(self, text: str) -> None:
        if self.interactive:
            self.out.write("\r\x1b[K")
        self.out.write(text + "\n")
        self._draw(force=True)

    def _draw(self, force: bool = False) -> None:
        if not self.interactive or self._finished:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < REDRAW_INTERVAL_S:
            return
        self._drawn_at = now
        fraction = self.done_bytes / self.total_bytes if self.total_bytes else 1.0
        filled = int(fraction * BAR_CHARS)
        self.out.write(f"\r\x1b[K[{'#' * filled}{' ' * (BAR_CHARS - filled)}] {self.layers_done}/{self.layers} "
                       f"layers, {human_bytes(self.done_bytes)} / {human_bytes(self.total_bytes)}")
        self.out.flush()

    def note(self, text: str) -> None:
        self._line(text)

    def finish(self) -> None:
        self._finished = True
        if self.interactive:
            self.out.write("\r\x1b[K")
        self.out.flush()


class LayerProgress:
    def __init__(self, transfer: Transfer, digest: str, size_bytes: int) -> None:
        self.transfer = transfer
        self.label = digest[7:19]
        self.size_bytes = size_bytes
        self.moved_bytes = 0
        self._started = time.monotonic()

    def start(self, resumed_from_bytes: int = 0) -> None:
        resumed = f", resuming at {human_bytes(resumed_from_bytes)}" if resumed_from_bytes else ""
        if not self.transfer.interactive:
            self.transfer._line(f"{self.label}: {self.transfer.verb}ing {human_bytes(self.size_bytes)}{resumed}")
        self.advance(resumed_from_bytes)

    def advance(self, count_bytes: int) -> None:
        self.moved_bytes += count_bytes
        self.transfer.done_bytes += count_bytes
        self.transfer._draw()

    def done(self, how: str | None = None) -> None:
        """`how`: None when its bytes moved, else why they did not ("already there"...)."""
        self.transfer.done_bytes += self.size_bytes - self.moved_bytes
        self.moved_bytes = self.size_bytes
        self.transfer.layers_done += 1
        elapsed_s = time.monotonic() - self._started
        self.transfer._line(f"{self.label}: {how}" if how else
                            f"{self.label}: {self.transfer.verb}ed {human_bytes(self.size_bytes)} in {elapsed_s:.1f} s")
