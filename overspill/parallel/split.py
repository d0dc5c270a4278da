"""Which units each pipeline stage runs, and each stage's memory budget: pure functions, no processes.

    units:  embed  block.0 block.1 block.2 block.3 block.4 block.5  head
    stages: |------ rank 0 -------|------ rank 1 ------|--- rank 2 ----|
            the embedding on the first stage, the head on the last, every stage at least one block, cut where the
            largest stage holds the fewest bytes (weights + KV cache)
"""
from __future__ import annotations

from typing import Sequence

from ..errors import OverspillError


def split_units(unit_bytes: Sequence[int], stages: int) -> list[tuple[int, int]]:
    """Contiguous unit ranges [first, end), one per stage, over ``unit_bytes`` (embed, block.0 .. block.L-1, head).

    The linear partition problem, solved exactly by dynamic programming (stages x L^2 steps): minimize the bytes of
    the largest stage, the embedding counted on the first and the head on the last. Ties go to the cut that gives
    earlier stages fewer blocks (the first stage also embeds, the last also runs the LM head's matmul)."""
    n = len(unit_bytes)
    blocks = n - 2
    if stages < 1:
        raise OverspillError(f"pipeline stages must be at least 1, got {stages}")
    if blocks < stages:
        raise OverspillError(f"--pp {stages}: the model has {blocks} block(s), fewer than the {stages} stages "
                             f"(each stage runs at least one block)")
    pre = [0]
    for b in unit_bytes[1:-1]:
        pre.append(pre[-1] + b)
    embed, head = unit_bytes[0], unit_bytes[-1]

    def cost(s: int, i: int, j: int) -> int:   # stage s runs blocks [i, j)
        return pre[j] - pre[i] + (embed if s == 0 else 0) + (head if s == stages - 1 else 0)

    INF = float("inf")
    # best[s][j]: the least largest-stage bytes for blocks [0, j) over stages 0..s; cut[s][j]: where stage s starts
    best = [[INF] * (blocks + 1) for _ in range(stages)]
    cut = [[0] * (blocks + 1) for _ in range(stages)]
    for j in range(1, blocks + 1):
        best[0][j] = cost(0, 0, j)
    for s in range(1, stages):
        for j in range(s + 1, blocks + 1):
            for i in range(s, j):                  # earliest start first: ties keep earlier stages smaller
                v = max(best[s - 1][i], cost(s, i, j))
                if v < best[s][j]:
                    best[s][j], cut[s][j] = v, i
    bounds = [blocks]
    for s in range(stages - 1, 0, -1):
        bounds.append(cut[s][bounds[-1]])
    bounds.append(0)
    bounds.reverse()                                # block boundaries: 0 = b_0 < b_1 < ... < b_S = L
    ranges = []
    for s in range(stages):
        first = 0 if s == 0 else bounds[s] + 1      # units: embed is 0, block k is k + 1, head is L + 1
        end = n if s == stages - 1 else bounds[s + 1] + 1
        ranges.append((first, end))
    return ranges


def rank_budgets(max_memory: str | dict | Sequence | None, stages: int) -> list:
    """Each stage's ``--max-memory``: one spec for every rank ("cpu=4GiB"), or one per rank separated by ';'
    ("cpu=5GiB;cpu=4GiB": rank 0 gets 5 GiB, rank 1 4 GiB; an empty piece means no budget on that rank), or a list
    with one entry per rank (the Python API). The pieces are parsed later, as a single-process budget."""
    if max_memory is None or isinstance(max_memory, dict):
        return [max_memory] * stages
    if isinstance(max_memory, str):
        if ";" not in max_memory:
            return [max_memory] * stages
        pieces: list = [p.strip() or None for p in max_memory.split(";")]
    else:
        pieces = list(max_memory)
    if len(pieces) != stages:
        raise OverspillError(f"--max-memory gives {len(pieces)} per-rank budgets for {stages} pipeline stages: give "
                             f"one for every rank ('cpu=5GiB;cpu=4GiB' for --pp 2) or one for all ('cpu=4GiB')")
    return pieces
