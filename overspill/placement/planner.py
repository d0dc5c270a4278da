"""Pure placement planner: unit sizes + memory budgets in, a `Plan` (plain data, JSON) out.

No weights are read and no device is touched: like accelerate's `infer_auto_device_map`, the plan
is computed from byte counts only, so it is testable on any machine.

Tiers, in the order units fill them (execution order is kept, accelerate's sequential map):

    embed block.0 block.1 ...                                  ... block.L-1 head
    |-- accel 0 --|-- accel 1 --|------ cpu RAM ------|--------- disk ---------|
     resident      resident      resident (cpu compute) streamed to the compute
                                 or streamed over h2d   device through a ring of
                                 (GPU compute)          `ring_slots` staging slots

* Accelerators ("cuda:N", ...) take units first, in the order the budgets name them.
* Then CPU RAM. Without an accelerator compute device the CPU computes them where they lie
  (tier "resident"); with one, they are copied host->device per forward (tier "stream", home "cpu").
* Everything left is streamed from disk (tier "stream", home "disk").
* CPU-only plans (no accelerator budget) instead read the fewest bytes from disk per forward: the
  embedding and head are placed freely; of the blocks, the resident ones are spread evenly among the
  streamed ones, so a pass computes a resident block while the reader fetches the next streamed one
  (a resident prefix leaves the reader idle through it, then compute waits on every read). A big
  head kept resident shrinks every staging slot to a block's size, and an embedding whose
  `stream_bytes` are only its rows (an untied table at a fixed place in a file: the loader then reads
  just the rows of each forward's ids, runtime/rows.py) costs almost nothing to stream.
* Streamed units compute on the compute device: `compute_device`, else the last accelerator whose
  budget has room for the staging ring, else the CPU. It holds the staging ring
  (`ring_slots` x the largest streamed unit's `stream_bytes`), the KV cache of every unit it
  computes, and the activation workspace. With an accelerator compute device, a pinned host ring
  of the same slot count, sized for the largest disk-streamed unit, counts against "cpu".

Budgets count everything the runtime holds on a device (weights + KV + staging + activations).
A missing accelerator budget means 0; a missing "cpu" budget means unlimited (callers that want
the machine's free RAM pass `psutil.virtual_memory().available` themselves).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from ..errors import OverspillError

__all__ = ["Bandwidths", "Placement", "Plan", "PlanError", "UnitCost", "fmt_bytes", "parse_memory",
           "plan_placement"]


class PlanError(OverspillError, ValueError):
    """The budgets cannot hold any plan. `device` and `min_bytes` say what would work (or None)."""

    def __init__(self, msg: str, device: str | None = None, min_bytes: int | None = None):
        super().__init__(msg)
        self.device = device
        self.min_bytes = min_bytes


# ---------------------------------------------------------------------------------------------
# memory specs

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_DEV_RE = re.compile(r"^(cpu|disk|mps|\d+|(?:cuda|xpu):\d+)$")
_EXPECTED = ("expected DEVICE=SIZE[,DEVICE=SIZE...] like 'cuda:0=10GiB,cpu=4GiB' "
             "(DEVICE: cpu, disk, N, cuda:N; SIZE: bytes or a number with B/KB/MB/GB/TB/KiB/MiB/GiB/TiB)")


def parse_size(text: str) -> int:
    """'4GiB' -> 4294967296, '1.5GB' -> 1500000000, '123' -> 123. ValueError when malformed."""
    m = _SIZE_RE.match(text)
    if not m or m.group(2).lower() not in _UNITS | {"": 1}:
        raise ValueError(f"bad size {text!r}")
    return int(float(m.group(1)) * _UNITS.get(m.group(2).lower(), 1))


def parse_memory(spec: str) -> dict[str, int]:
    """Parse 'cuda:0=10GiB,cuda:1=10GiB,cpu=4GiB' into {'cuda:0': 10737418240, ...} (bytes).

    Units: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of 1024), case-insensitive;
    a plain integer is bytes. A bare GPU index 'N' means 'cuda:N' (as in accelerate's max_memory).
    Order is kept: it is the order accelerators are filled in. ValueError, one line, on bad input.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty memory spec: {_EXPECTED}")
    out: dict[str, int] = {}
    for piece in spec.split(","):
        key, eq, val = piece.partition("=")
        key = key.strip().lower()
        if not eq or not _DEV_RE.match(key):
            raise ValueError(f"bad memory spec piece {piece.strip()!r}: {_EXPECTED}")
        if key.isdigit():
            key = f"cuda:{int(key)}"
        try:
            size = parse_size(val)
        except ValueError:
            raise ValueError(f"bad size in memory spec piece {piece.strip()!r}: {_EXPECTED}") from None
        if key in out:
            raise ValueError(f"device {key!r} given twice in memory spec {spec!r}: {_EXPECTED}")
        out[key] = size
    return out


def fmt_bytes(n: int | float, ceil: bool = False) -> str:
    """Human size with 2 decimals in the largest binary unit that keeps it >= 1 ('3.40 GiB').

    `ceil` rounds up, so a printed minimum is always enough when typed back in.
    """
    for unit, mult in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= mult:
            v = n / mult
            v = math.ceil(v * 100 - 1e-9) / 100 if ceil else v
            return f"{v:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------
# plain data


@dataclass(frozen=True)
class UnitCost:
    """One unit of the model, in execution order: "embed", "block.0", ..., "head"."""

    name: str
    weight_bytes: int               # this unit's weights in the chosen dtype / quantization
    kv_bytes: int = 0               # KV cache for the planned batch x context (0 for embed/head)
    stream_bytes: int | None = None  # bytes read per forward if streamed (default weight_bytes;
    #                                  an embedding gathers only the rows it needs)
    params: int | None = None       # matmul parameters (2 flops each per token); None: weight_bytes / bytes_per_param

    @property
    def read_bytes(self) -> int:
        return self.weight_bytes if self.stream_bytes is None else self.stream_bytes


@dataclass
class Bandwidths:
    """Measured (or assumed) bandwidths of one machine, in GB/s (1e9 bytes) and TFLOP/s."""

    mem_gbps: float                      # host RAM read bandwidth
    disk_gbps: float                     # sequential cold read bandwidth of the weight store
    h2d_gbps: float | None = None        # pinned host -> device copy; None without a GPU
    gpu_mem_gbps: float | None = None    # device memory read bandwidth; None without a GPU
    matmul_tflops: float | None = None   # dense matmul peak of the compute device


@dataclass
class Placement:
    """Where one unit's bytes live (`home`) and where it computes (`device`).

    tier "resident": home == device, the weights stay there. tier "stream": the weights are
    copied to `device` for every forward, from CPU RAM ("cpu", over h2d) or from disk ("disk").
    The byte counts are carried along so a plan is self-contained data.
    """

    unit: str
    tier: str            # "resident" | "stream"
    device: str          # where it computes: "cpu" / "cuda:0"
    home: str            # where the bytes live: "cuda:0" | "cpu" | "disk"
    weight_bytes: int = 0
    stream_bytes: int = 0
    kv_bytes: int = 0
    params: int | None = None   # matmul parameters; None: weight_bytes / bytes_per_param in predict


_USAGE_KEYS = ("weights", "kv", "staging", "activations", "total")


@dataclass
class Plan:
    """Output of `plan_placement`: plain data, JSON round-trippable.

    `staging_bytes` is the size of ONE staging slot (the largest streamed unit's stream_bytes);
    the ring on the compute device is `ring_slots` such slots. Both are 0 when nothing streams.
    `usage[device]` holds {"weights", "kv", "staging", "activations", "total"} in bytes.
    A device missing from `budgets` is unlimited (only ever "cpu").
    """

    placements: list[Placement]
    budgets: dict[str, int]
    usage: dict[str, dict[str, int]]
    ring_slots: int
    staging_bytes: int
    compute_device: str | None = None   # where streamed units compute (None: nothing streams)
    activation_bytes: int = 0

    # -- serialisation --------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, s: str) -> Plan:
        d = json.loads(s)
        d["placements"] = [Placement(**p) for p in d["placements"]]
        return cls(**d)

    # -- queries ----------------------------------------------------------------------------------
    def placement(self, unit: str) -> Placement:
        for p in self.placements:
            if p.unit == unit:
                return p
        raise KeyError(unit)

    def streamed_bytes_per_token(self) -> int:
        """Bytes copied onto compute devices per forward (disk reads plus host->device copies)."""
        return sum(p.stream_bytes for p in self.placements if p.tier == "stream")

    def disk_bytes_per_token(self) -> int:
        return sum(p.stream_bytes for p in self.placements if p.home == "disk")

    def resident_bytes(self, device: str) -> int:
        """Weight bytes that live on `device` for the whole run (home == device)."""
        return sum(p.weight_bytes for p in self.placements if p.home == device)

    # -- prediction -------------------------------------------------------------------------------
    def predict(self, bw: Bandwidths, batch: int = 1, bytes_per_param: float = 2.0) -> dict:
        """Roofline estimate of one decode step (one token for each of `batch` sequences).

        Each unit reads its `stream_bytes` per step (an embedding gathers rows; a linear reads all
        its weights) plus its KV cache (taken as full: an upper bound). Per compute device d:

            t_d = max( (unit bytes + KV computed on d) / mem_bw(d),      mem_bw: mem_gbps for cpu,
                       2 * batch * params(d) / matmul_tflops )                    gpu_mem_gbps else
        params(d) = matmul parameters of the units computed on d (`Placement.params`; where unset,
        weight_bytes / bytes_per_param of the non-embedding units: wrong for quantized weights).
        Units run one after another, so device times add; streaming runs in a prefetch thread
        (disk) and on the copy engine (h2d), overlapped with compute:

            s/token = max( disk_bytes / disk_gbps,
                           host->device bytes (units computed on an accelerator, home cpu or disk) / h2d_gbps,
                           sum_d t_d )

        "bound" names the largest term ("disk", "h2d", or for the compute side the biggest
        contributor: "memory" (cpu RAM), "gpu_memory" or "compute"). A term whose bandwidth is
        None is left out and listed under "missing". tokens_per_s counts all `batch` sequences.
        """
        missing: list[str] = []
        disk_s = self.disk_bytes_per_token() / (bw.disk_gbps * 1e9)
        h2d_bytes = sum(p.stream_bytes for p in self.placements if p.tier == "stream" and p.device != "cpu")
        h2d_s = 0.0
        if h2d_bytes:
            if bw.h2d_gbps:
                h2d_s = h2d_bytes / (bw.h2d_gbps * 1e9)
            else:
                missing.append("h2d_gbps")
        parts = {"memory": 0.0, "gpu_memory": 0.0, "compute": 0.0}
        for dev in dict.fromkeys(p.device for p in self.placements):
            on = [p for p in self.placements if p.device == dev]
            nbytes = sum(p.stream_bytes + p.kv_bytes for p in on)
            gbps = bw.mem_gbps if dev == "cpu" else bw.gpu_mem_gbps
            kind = "memory" if dev == "cpu" else "gpu_memory"
            if not gbps:
                missing.append(f"{kind} bandwidth for {dev}")
                mem_s = 0.0
            else:
                mem_s = nbytes / (gbps * 1e9)
            flops = 2 * batch * sum(p.params if p.params is not None else
                                    (p.weight_bytes / bytes_per_param if p.unit != "embed" else 0) for p in on)
            # one measured matmul speed: the GPU's where a GPU was probed, else the CPU's
            tflops = bw.matmul_tflops if (dev == "cpu") == (bw.gpu_mem_gbps is None) else None
            if flops and not tflops:
                missing.append(f"matmul speed for {dev}")
            comp_s = flops / (tflops * 1e12) if tflops else 0.0
            if comp_s > mem_s:
                parts["compute"] += comp_s
            else:
                parts[kind] += mem_s
        compute_side = sum(parts.values())
        terms = {"disk": disk_s, "h2d": h2d_s, **parts}
        s = max(disk_s, h2d_s, compute_side)
        if s == compute_side and compute_side > 0:
            bound = max(parts, key=lambda k: parts[k])
        else:
            bound = "disk" if disk_s >= h2d_s else "h2d"
        return {"s_per_token": s, "tokens_per_s": batch / s if s > 0 else math.inf,
                "tokens_per_s_per_seq": 1 / s if s > 0 else math.inf, "bound": bound,
                **{f"{k}_s": v for k, v in terms.items()}, "compute_side_s": compute_side,
                "disk_bytes": self.disk_bytes_per_token(), "h2d_bytes": h2d_bytes, "missing": missing}

    # -- display ----------------------------------------------------------------------------------
    def table(self, bw: Bandwidths | None = None, batch: int = 1) -> str:
        """Terminal table: collapsed unit ranges, per-device usage vs budget, and a prediction (one decode step of
        `batch` sequences)."""
        rows = [("units", "tier", "device", "home", "weights", "kv")]
        for name, group in _collapse(self.placements):
            p = group[0]
            rows.append((name, p.tier, p.device, p.home, fmt_bytes(sum(g.weight_bytes for g in group)),
                         fmt_bytes(sum(g.kv_bytes for g in group))))
        out = _align(rows, right={4, 5})
        urows = [("device", "weights", "kv", "staging", "activations", "total", "budget", "used")]
        for dev, u in self.usage.items():
            b = self.budgets.get(dev)
            used = f"{100 * u['total'] / b:.0f}%" if b else ("-" if b is None else "n/a")
            urows.append((dev, *(fmt_bytes(u[k]) for k in _USAGE_KEYS),
                          "unlimited" if b is None else fmt_bytes(b), used))
        out += "\n\n" + _align(urows, right=set(range(1, 8)))
        if self.ring_slots:
            out += (f"\nstaging ring: {self.ring_slots} slots x {fmt_bytes(self.staging_bytes)} on "
                    f"{self.compute_device}")
        if bw is not None:
            r = self.predict(bw, batch=batch)
            if r["s_per_token"] == 0:
                return out + f"\npredicted: n/a (not measured on this machine: {', '.join(r['missing'])})"
            detail = ", ".join(f"{k} {r[k + '_s']:.3g} s" for k in ("disk", "h2d", "memory", "gpu_memory", "compute")
                               if r[k + "_s"] > 0)
            per = f"s/step of {batch} tokens" if batch > 1 else "s/token"
            out += (f"\npredicted: {r['s_per_token']:.3g} {per} ({r['tokens_per_s']:.3g} tok/s), "
                    f"bound: {r['bound']} ({detail})")
            if r["missing"]:
                out += f"\nnot in the prediction (not measured on this machine): {', '.join(r['missing'])}"
        return out


def _ranges(nums: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(out)


def _collapse(placements: list[Placement]) -> list[tuple[str, list[Placement]]]:
    """The table's rows: within a run of units named 'prefix.N', those with the same tier/device/home are one row
    labelled with their numbers ('block.0-3', or 'block.0,2,4-5' where resident and streamed blocks alternate);
    any other unit is a row of its own. Rows in order of their first unit."""
    rows: list[tuple[str, list[Placement]]] = []
    run: dict[tuple, list[Placement]] = {}
    prefix = None
    for p in placements:
        pa, _, pn = p.unit.rpartition(".")
        if not (pa and pn.isdigit()):
            rows.append((p.unit, [p]))
            prefix = None
            continue
        if pa != prefix:
            run, prefix = {}, pa
        key = (p.tier, p.device, p.home)
        if key not in run:
            run[key] = []
            rows.append((pa, run[key]))
        run[key].append(p)
    return [(name if len(g) == 1 and name == g[0].unit else
             f"{name}.{_ranges([int(q.unit.rpartition('.')[2]) for q in g])}", g) for name, g in rows]


def _align(rows: list[tuple], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the planner


def _is_accel(dev: str) -> bool:
    return dev not in ("cpu", "disk")


def plan_placement(units: list[UnitCost], budgets: dict[str, int], *, activation_bytes: int = 0,
                   ring_slots: int = 2, compute_device: str | None = None) -> Plan:
    """Place `units` (execution order) into `budgets` (bytes per device); see the module docstring.

    With accelerators: among plans that keep execution order (accelerators filled in the order given,
    then CPU RAM, then disk), the one with the most units on accelerators, then the most in CPU RAM.
    CPU only: the one reading the fewest bytes from disk per forward (`_plan_cpu`).
    Deterministic. Raises PlanError, naming the smallest budget that would work, when none fits.
    """
    units = list(units)
    _check_inputs(units, budgets, activation_bytes, ring_slots)
    budgets = {k: int(v) for k, v in budgets.items() if k != "disk"}
    plan = _try_plan(units, budgets, activation_bytes, ring_slots, compute_device)
    if plan is not None:
        return plan
    raise _explain(units, budgets, activation_bytes, ring_slots, compute_device)


def _check_inputs(units, budgets, activation_bytes, ring_slots) -> None:
    if not units:
        raise PlanError("no units to place")
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise PlanError(f"unit names must be unique, got duplicates in {names}")
    for u in units:
        if u.weight_bytes < 0 or u.kv_bytes < 0 or u.read_bytes < 0:
            raise PlanError(f"unit {u.name!r} has a negative byte count")
    for k, v in budgets.items():
        if v < 0:
            raise PlanError(f"budget {k}={v} is negative")
    if activation_bytes < 0:
        raise PlanError("activation_bytes must be >= 0")
    if ring_slots < 1:
        raise PlanError(f"ring_slots must be >= 1, got {ring_slots}")


def _try_plan(units, budgets, act, slots, compute_device) -> Plan | None:
    accels = [d for d, b in budgets.items() if _is_accel(d) and (b > 0 or d == compute_device)]
    if compute_device is not None and _is_accel(compute_device) and compute_device not in accels:
        accels.append(compute_device)  # no budget given: 0 bytes, so only a too-small error can follow
    if compute_device is not None:
        candidates = [compute_device]
    else:
        candidates = list(reversed(accels)) or ["cpu"]
    for c in candidates:
        plan = _plan_for(units, budgets, act, slots, accels, c)
        if plan is not None:
            return plan
    return None


def _spread(middle: list[int], t: int) -> list[int]:
    """t of ``middle`` (unit indices in execution order) to keep resident, spread evenly among the streamed rest:
    the streamed ones sit at the centres of len(middle) - t equal runs. A pass then computes resident blocks while the
    reader fetches the next streamed one; as a prefix, the reader would have nothing to read ahead of the streamed
    rest (at most the ring's slots) and a compute-heavy pass (prefill, a training step) would wait on every read."""
    m, s = len(middle), len(middle) - t
    if s <= 0 or t <= 0:
        return middle[:t]
    out = {int((k + 0.5) * m / s) for k in range(s)}
    return [u for j, u in enumerate(middle) if j not in out]


def _plan_cpu(units, budgets, act, slots) -> Plan | None:
    """CPU-only plan (no accelerator budgets): the one that reads the fewest bytes from disk per forward.

    The first and last units (embedding, head) are placed freely: a large head kept resident can shrink every
    staging slot to a block's size (GPT-J-6B int4: 2 x 394 MiB -> 2 x 108 MiB) and save its read per token. Of the
    middle ones (blocks), t are resident, spread evenly among the streamed ones (``_spread``), or else as a prefix
    where only that fits (blocks of unequal sizes). Ties: more units resident, then the spread choice. Among
    equal-sized blocks this search is exhaustive."""
    n = len(units)
    cpu = budgets.get("cpu")
    w = [u.weight_bytes for u in units]
    rb = [u.read_bytes for u in units]
    kv_all = sum(u.kv_bytes for u in units)
    ends = sorted({0, n - 1})
    middle = [i for i in range(n) if i not in ends]
    best, best_key = None, None
    for mask in range(1 << len(ends)):              # each end unit resident (bit set) or streamed
        res_ends = [e for b, e in enumerate(ends) if mask >> b & 1]
        for t in range(len(middle), -1, -1):        # t blocks resident
            for held in (_spread(middle, t), middle[:t]):
                resident = set(res_ends) | set(held)
                streamed = [i for i in range(n) if i not in resident]
                use = sum(w[i] for i in resident) + kv_all + \
                    (act + slots * max(rb[i] for i in streamed) if streamed else act)
                if cpu is not None and use > cpu:
                    continue
                key = (sum(rb[i] for i in streamed), len(streamed))
                if best_key is None or key < best_key:
                    best, best_key = resident, key
    if best is None:
        return None
    return _assemble(units, budgets, act, slots, "cpu",
                     [("resident", "cpu", "cpu") if i in best else ("stream", "cpu", "disk") for i in range(n)])


def _plan_for(units, budgets, act, slots, accels, c) -> Plan | None:
    """Best plan with streamed units computing on `c`, or None."""
    if not accels and c == "cpu":
        return _plan_cpu(units, budgets, act, slots)
    n = len(units)
    w = [u.weight_bytes for u in units]
    kv = [u.kv_bytes for u in units]
    rb = [u.read_bytes for u in units]
    suf_max = [0] * (n + 1)  # suf_max[i] = max(rb[i:])
    suf_kv = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suf_max[i] = max(suf_max[i + 1], rb[i])
        suf_kv[i] = suf_kv[i + 1] + kv[i]
    cpu_budget = budgets.get("cpu")  # None: unlimited
    c_accel = _is_accel(c)

    def fill(s: int) -> list[int] | None:
        """Greedy sequential fill of units[:s] over accelerators; returns per-unit accel index."""
        reserve = {d: 0 for d in accels}
        if c_accel and s < n:
            reserve[c] = slots * suf_max[s] + suf_kv[s] + act
        where: list[int] = []
        i = 0
        for j, d in enumerate(accels):
            room = budgets.get(d, 0) - reserve[d]
            if room < 0:
                return None
            used = 0
            act_paid = d == c and s < n  # the compute device pays activations in its reserve
            while i < s:
                extra = w[i] + kv[i] + (0 if act_paid else act)
                if used + extra > room:
                    break
                used += extra
                act_paid = True
                where.append(j)
                i += 1
        return where if i == s else None

    def cpu_use(s: int, t: int) -> int:
        use = sum(w[s:t])
        if not c_accel and s < n:
            use += suf_kv[s] + act + (slots * suf_max[t] if t < n else 0)
        elif c_accel and t < n:
            use += slots * suf_max[t]  # pinned host ring for disk reads
        return use

    for s in range(n if accels else 0, -1, -1):  # s: units[:s] live on accelerators
        where = fill(s) if accels else ([] if s == 0 else None)
        if where is None:
            continue
        best_t = None
        for t in range(n, s - 1, -1):  # t: units[s:t] live in CPU RAM, units[t:] on disk
            if cpu_budget is None or cpu_use(s, t) <= cpu_budget:
                best_t = t
                break
        if best_t is None:
            continue
        return _build(units, budgets, act, slots, accels, c, s, best_t, where)
    return None


def _build(units, budgets, act, slots, accels, c, s, t, where) -> Plan:
    assign = []
    for i in range(len(units)):
        if i < s:
            d = accels[where[i]]
            assign.append(("resident", d, d))
        elif i < t:
            assign.append(("resident", "cpu", "cpu") if c == "cpu" else ("stream", c, "cpu"))
        else:
            assign.append(("stream", c, "disk"))
    return _assemble(units, budgets, act, slots, c, assign, accels)


def _assemble(units, budgets, act, slots, c, assign, accels=()) -> Plan:
    """The Plan for per-unit (tier, device, home) choices, with its usage per device."""
    placements = [Placement(u.name, tier, dev, home, u.weight_bytes, u.read_bytes, u.kv_bytes, u.params)
                  for u, (tier, dev, home) in zip(units, assign)]
    streams = any(p.tier == "stream" for p in placements)
    slot = max((p.stream_bytes for p in placements if p.tier == "stream"), default=0)
    host_slot = max((p.stream_bytes for p in placements if p.home == "disk"), default=0)
    devices = list(dict.fromkeys([*[d for d in budgets if _is_accel(d)], *accels, "cpu"]))
    usage = {d: dict.fromkeys(_USAGE_KEYS, 0) for d in devices}
    for p in placements:
        if p.home != "disk":
            usage[p.home]["weights"] += p.weight_bytes
        usage[p.device]["kv"] += p.kv_bytes
    for d in dict.fromkeys(p.device for p in placements):
        usage[d]["activations"] = act
    if streams and slot:
        usage[c]["staging"] += slots * slot
    if streams and c != "cpu" and host_slot:
        usage["cpu"]["staging"] += slots * host_slot
    for u in usage.values():
        u["total"] = u["weights"] + u["kv"] + u["staging"] + u["activations"]
    return Plan(placements=placements, budgets=dict(budgets), usage=usage,
                ring_slots=slots if streams else 0, staging_bytes=slot if streams else 0,
                compute_device=c if streams else None, activation_bytes=act)


def _explain(units, budgets, act, slots, compute_device) -> PlanError:
    """Find the device whose budget is too small and the least budget that works for it."""
    accels = [d for d, b in budgets.items() if _is_accel(d) and b > 0]
    c = compute_device or (accels[-1] if accels else "cpu")
    if c != "cpu" and _try_plan(units, {k: v for k, v in budgets.items() if k != "cpu"}, act, slots,
                                compute_device) is not None:
        dev = "cpu"  # the accelerators are fine; host RAM cannot hold the pinned staging ring
    else:
        dev = c
    hi = sum(u.weight_bytes + u.kv_bytes for u in units) + act + 2 * slots * max(u.read_bytes for u in units)

    def ok(b: int) -> Plan | None:
        return _try_plan(units, {**budgets, dev: b}, act, slots, compute_device)

    if ok(hi) is None:
        return PlanError(f"no placement fits budgets {budgets} (compute device {c})")
    lo = budgets.get(dev, 0)  # fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid) is None:
            lo = mid
        else:
            hi = mid
    plan = ok(hi)
    u = plan.usage[dev]
    bits = []
    if u["staging"]:
        slot = u["staging"] // plan.ring_slots
        bits.append(f"{plan.ring_slots} staging slots of {fmt_bytes(slot)}")
    if u["kv"]:
        bits.append(f"KV {fmt_bytes(u['kv'])}")
    if u["activations"]:
        bits.append(f"activations {fmt_bytes(u['activations'])}")
    if u["weights"]:
        bits.append(f"resident weights {fmt_bytes(u['weights'])}")
    given = fmt_bytes(budgets.get(dev, 0)) if dev in budgets else "0 (no budget given)"
    return PlanError(f"{dev}={given} is too small: need at least {fmt_bytes(hi, ceil=True)} = {hi} B "
                     f"({' + '.join(bits) or 'nothing'})", device=dev, min_bytes=hi)
