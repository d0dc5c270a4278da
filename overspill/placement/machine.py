"""How much memory this process may use: its memory cgroup's limit (v1 or v2), else the RAM the system reports
available. What ``--max-memory cpu=auto`` budgets from, and what ``overspill plan`` compares a plan against.

A budget counts everything the runtime holds (weights, staging, KV cache, activations); the process itself (the
interpreter, torch, allocator slack) costs about 0.45 GiB on top, which ``auto`` leaves free."""
from __future__ import annotations

import os
import re

PROCESS_OVERHEAD = 448 << 20     # RSS of the interpreter + torch at start-up, plus the runtime's allocator slack
_UNLIMITED = 1 << 60


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """This process's memory cgroup limit in bytes (the tightest along its path), or None when unlimited/unknown."""
    text = _read(proc_cgroup) or ""
    limits = []
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):                    # cgroup v1
            base, file = os.path.join(root, "memory"), "memory.limit_in_bytes"
        elif controllers == "":                                    # cgroup v2 (unified)
            base, file = (os.path.join(root, "unified") if os.path.isdir(os.path.join(root, "unified")) else root,
                          "memory.max")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for k in range(len(parts), -1, -1):                        # the cgroup and each ancestor
            v = _read(os.path.join(base, *parts[:k], file))
            if v and v != "max" and v.isdigit() and int(v) < _UNLIMITED:
                limits.append(int(v))
    return min(limits) if limits else None


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    m = re.search(r"^MemAvailable:\s+(\d+) kB", _read(meminfo) or "", re.M)
    return int(m.group(1)) * 1024 if m else None


def memory_limit() -> tuple[int | None, str]:
    """(bytes this process may use, where that figure comes from)."""
    c = cgroup_limit()
    if c is not None:
        return c, "memory cgroup limit"
    return available_memory(), "memory available"


def resolve_auto(spec: str) -> str:
    """'cpu=auto' in a --max-memory spec -> the cgroup limit (or available RAM) less the process overhead."""
    if "auto" not in spec.lower():
        return spec
    limit, what = memory_limit()
    if limit is None:
        raise ValueError("cpu=auto: this system reports neither a memory cgroup limit nor the memory available; "
                         "give a size")
    if limit <= PROCESS_OVERHEAD:
        raise ValueError(f"cpu=auto: the {what} ({limit} B) leaves nothing beyond the process's own "
                         f"{PROCESS_OVERHEAD >> 20} MiB")
    return re.sub(r"(?i)\bcpu=auto\b", f"cpu={limit - PROCESS_OVERHEAD}", spec)
