"""An embedding table left on disk: a forward reads only the rows of its token ids.

A decode step of a batch of B sequences needs B rows of the token embedding (8 KiB each for GPT-J-6B in bf16), not
the whole table (394 MiB), so a plan under a tight budget can leave the table on disk at almost no cost and keep
another block resident instead. The rows are read on the compute thread when the embedding runs (the reader thread
cannot read them ahead: the ids of the next step are not known until this one ends).
"""
from __future__ import annotations

import torch

from ..io import DirectFile, read_pool


class RowTable:
    """Rows of a [V, C] table stored contiguously at ``offset`` in ``path`` (a layer store's embed file or a
    safetensors shard). ``select(ids)`` reads the distinct ids' rows (positional reads, dropped from the page
    cache after) and returns them in ``dtype`` with the ids renumbered into them, on the ids' device:
    ``F.embedding(local_ids, rows)`` equals ``F.embedding(ids, table)``. The runtime calls it, never the model."""

    def __init__(self, path: str, offset: int, stored: torch.dtype, shape: tuple[int, int], dtype: torch.dtype):
        self.path, self.offset, self.shape, self.stored, self.dtype = path, offset, tuple(shape), stored, dtype
        self.row_bytes = shape[1] * stored.itemsize
        self.file = DirectFile(path, direct=False)   # buffered positional reads, evicted after (rows are unaligned)
        self.bytes_read = 0

    def select(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        V, C = self.shape
        uniq, inverse = torch.unique(ids.cpu(), return_inverse=True)   # sorted distinct ids
        if uniq.numel() and (uniq[0] < 0 or uniq[-1] >= V):
            raise IndexError(f"token id {int(uniq[-1] if uniq[-1] >= V else uniq[0])} outside the embedding's {V} rows")
        rows = torch.empty(uniq.numel(), self.row_bytes, dtype=torch.uint8)
        flat, rb = rows.view(-1), self.row_bytes
        # runs of consecutive ids are one read each; the reads go to the runtime's reader threads together (a prompt
        # batch can need thousands of rows)
        ids_l, requests, j = uniq.tolist(), [], 0
        while j < len(ids_l):
            k = j
            while k + 1 < len(ids_l) and ids_l[k + 1] == ids_l[k] + 1:
                k += 1
            requests.append((flat[j * rb:(k + 1) * rb], self.offset + ids_l[j] * rb, (k + 1 - j) * rb))
            j = k + 1
        self.file.read_many(requests, read_pool())
        self.bytes_read += rows.numel()
        table = rows.view(self.stored).view(-1, C).to(self.dtype)
        del rows   # (a no-op conversion keeps it alive in ``table``)
        return table.to(ids.device), inverse.to(ids.device)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
