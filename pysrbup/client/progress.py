"""A progress display on stderr when it is a terminal, silent otherwise."""

from __future__ import annotations

import sys
import threading


class Progress:
    """Counts files and bytes; draws a tqdm bar (rate, ETA once the total is known)."""

    def __init__(self, description: str, enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self._bar = None
        self._lock = threading.Lock()
        self.files = 0
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                desc=description,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=False,
            )

    @property
    def wants_total(self) -> bool:
        """Whether a bar is drawn (only then is the total worth counting)."""
        return self._bar is not None

    def set_total(self, total: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.total = total
                self._bar.refresh()

    def add_bytes(self, count: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(count)

    def add_file(self) -> None:
        self.files += 1
        if self._bar is not None and self.files % 64 == 0:
            with self._lock:
                self._bar.set_postfix(files=self.files, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
