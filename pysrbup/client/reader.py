"""Reading a file as content-defined chunks through one reusable buffer."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from pysrbup._native import chunker

READ_BLOCK = 8 * 1024 * 1024


class ChunkReader:
    """Splits files into chunks with the key's gear table; one per thread."""

    def __init__(
        self,
        gear: np.ndarray,
        min_size: int = chunker.DEFAULT_MIN,
        avg_size: int = chunker.DEFAULT_AVG,
        max_size: int = chunker.DEFAULT_MAX,
        block: int = READ_BLOCK,
    ):
        self.gear = gear
        self.sizes = (min_size, avg_size, max_size)
        self.block = max(block, max_size)
        self._buf = bytearray(self.block + max_size)
        self._view = memoryview(self._buf)

    def chunks(self, handle) -> Iterator[memoryview]:
        """Yields the chunks of the open unbuffered binary file ``handle``.

        Each yielded view points into the reader's buffer and is only valid
        until the next one is requested: copy it to keep it.
        """
        view = self._view
        filled = 0
        eof = False
        while not eof:
            limit = filled + self.block
            while filled < limit:
                got = handle.readinto(view[filled:limit])
                if not got:
                    eof = True
                    break
                filled += got
            cuts = chunker.cut_points(self.gear, view[:filled], *self.sizes, eof)
            start = 0
            for cut in cuts:
                yield view[start:cut]
                start = cut
            if start:
                view[: filled - start] = view[start:filled]
                filled -= start
