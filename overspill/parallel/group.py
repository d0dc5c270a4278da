"""The processes of a pipeline: joining them, checking they agree, and noticing when one is gone.

    torchrun ──► RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT ──► join(): init_process_group (gloo on the
                 CPU, NCCL when every rank computes on CUDA), a control group (gloo) for step descriptions and a
                 data group for hidden states and logits
             ──► agree(): every rank's checkpoint digest and settings, all-gathered; one line on a mismatch
             ──► a heartbeat thread per rank (through the rendezvous store)

Bounded failure. Rendezvous and the start-up check time out after ``timeout`` seconds (default 30,
OVERSPILL_PP_TIMEOUT or --pp-timeout). After that, a step may legitimately take minutes (a stage streaming a large
model from disk), so the groups that carry steps wait as long as it takes, and liveness is a heartbeat instead:
each rank bumps a counter in the store every timeout/6 s and watches the others'; a counter that stands still
for ``timeout`` seconds, or a store that stops answering, ends this rank with one line. A rank that is killed
closes its sockets, and its peers' pending sends and receives fail at once (one line as well).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import OverspillError

DEFAULT_TIMEOUT = 30.0
_FOREVER = datetime.timedelta(days=365)      # steps wait for as long as a live peer computes (see the heartbeat)
_reported = threading.Lock()                 # one line per process, whoever notices first


def first_line(e: BaseException) -> str:
    """An exception as one short line (gloo's messages carry a source location and a long tail)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if text.startswith("[") and "] " in text:                     # "[.../pair.cc:553] Connection closed by peer"
        text = text.split("] ", 1)[1]
    return text.split(". This is typically")[0][:300]


def die(line: str, code: int = 2) -> None:
    """Print ``overspill: error: LINE`` once per process and end it now: the main thread may be blocked inside
    a collective that nothing else can interrupt."""
    if _reported.acquire(blocking=False):
        print(f"overspill: error: {line}", file=sys.stderr, flush=True)
    os._exit(code)


def claim_report() -> bool:
    """True for the first caller in this process: it prints the one error line (the others stay quiet)."""
    return _reported.acquire(blocking=False)


def resolve_timeout(timeout: float | None) -> float:
    if timeout is None:
        env = os.environ.get("OVERSPILL_PP_TIMEOUT")
        try:
            timeout = float(env) if env else DEFAULT_TIMEOUT
        except ValueError:
            raise OverspillError(f"OVERSPILL_PP_TIMEOUT must be a number of seconds, got {env!r}") from None
    if not timeout > 0:
        raise OverspillError(f"the pipeline timeout must be > 0 seconds, got {timeout}")
    return float(timeout)


def launch_env(stages: int, flag: str = "--pp") -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment, checked against ``stages`` (the ranks that
    ``flag`` asks for: --pp, --tp)."""
    ws = os.environ.get("WORLD_SIZE")
    if ws is None or "RANK" not in os.environ:
        raise OverspillError(f"{flag} {stages} runs one process per rank: launch it with torchrun, e.g. "
                             f"`torchrun --nproc-per-node {stages} -m overspill.cli generate PROMPT {flag} {stages}`")
    world, rank = int(ws), int(os.environ["RANK"])
    if world != stages:
        raise OverspillError(f"rank {rank}: {flag} {stages} needs {stages} processes but the launcher started "
                             f"{world} (WORLD_SIZE={world}); use --nproc-per-node (x --nnodes) = {stages}")
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def choose_backend(stage_uses_cuda: list[bool]) -> str:
    """NCCL when every stage computes on CUDA (and this torch has it), else gloo (tensors cross on the CPU).
    OVERSPILL_PP_BACKEND overrides."""
    env = os.environ.get("OVERSPILL_PP_BACKEND")
    if env:
        if env not in ("gloo", "nccl"):
            raise OverspillError(f"OVERSPILL_PP_BACKEND must be gloo or nccl, got {env!r}")
        return env
    import torch.distributed as dist

    if all(stage_uses_cuda) and torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


@dataclass
class Group:
    """This process's place in the pipeline and the channels to the others."""
    rank: int
    world: int
    local_rank: int
    backend: str
    timeout: float
    device: torch.device           # where tensors cross: the CPU under gloo, this rank's GPU under NCCL
    ctrl: object = None            # gloo group: step descriptions (broadcast from rank 0)
    data: object = None            # hidden states and logits (send / recv)
    heartbeat: "Heartbeat | None" = None
    failed: bool = False           # a channel broke: closing sends nothing more
    # seconds and counts since the group was joined (rank_stats gathers every rank's): steps run, wall time in them,
    # time blocked receiving and sending hidden states / logits, and in the all-reduces of tensor parallel
    stats: dict = field(default_factory=lambda: {"steps": 0, "step_s": 0.0, "recv_s": 0.0, "send_s": 0.0,
                                                 "allreduce_s": 0.0, "allreduces": 0})

    def broken(self, what: str, e: BaseException) -> OverspillError:
        """A send, receive or collective failed: a peer is gone. One line ("rank 0: lost rank 1 while sending it
        hidden states (Connection reset by peer)"), and no more traffic from here."""
        self.failed = True
        if not claim_report():      # the heartbeat thread is already ending this process with its own line
            time.sleep(60)
        if self.heartbeat is not None:
            self.heartbeat.stop()
        return OverspillError(f"rank {self.rank}: lost {what} ({first_line(e)})")


_GROUP: Group | None = None       # joined once per process, kept for every model it loads


def join(stages: int, timeout: float, backend: str, flag: str = "--pp") -> Group:
    """Join the launcher's process group (see the module docstring), or reuse this process's: a script may load
    several models in turn (every rank loading the same ones). Left at process exit (``_at_exit``)."""
    import atexit

    import torch.distributed as dist

    global _GROUP
    rank, world, local = launch_env(stages, flag)
    if _GROUP is not None:
        if _GROUP.failed:
            raise OverspillError(f"rank {rank}: this process lost its pipeline peers earlier; start the ranks again")
        if _GROUP.backend != backend:
            raise OverspillError(f"rank {rank}: this process joined its pipeline with {_GROUP.backend}; a model "
                                 f"that needs {backend} needs the ranks started again")
        _GROUP.timeout = timeout
        return _GROUP
    if backend == "nccl":
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout))
        ctrl = dist.new_group(backend="gloo", timeout=_FOREVER)
        data = dist.new_group(backend=backend, timeout=_FOREVER) if backend != "gloo" else ctrl
    except Exception as e:   # a rank that never came, an unreachable address
        raise OverspillError(f"rank {rank}: could not join the other {world - 1} rank(s) within {timeout:g} s "
                             f"({first_line(e)})") from None
    g = Group(rank, world, local, backend, timeout, device, ctrl, data)
    g.heartbeat = Heartbeat(g)
    _GROUP = g
    atexit.register(_at_exit, g)
    return g


def _at_exit(g: Group) -> None:
    """The orderly end of a rank: stop its heartbeat and say it is done (the others stop watching it). Rank 0 then
    waits, up to the timeout, for the others to be done too: where the launcher is not torchrun, rank 0's process
    holds the rendezvous store, and their heartbeats would lose it."""
    import torch.distributed as dist

    hb = g.heartbeat
    if hb is None:
        return
    hb.stop()
    if g.failed:
        return
    try:
        hb.store.set(f"done/{g.rank}", "1")
        if g.rank == 0:
            end = time.monotonic() + g.timeout
            while time.monotonic() < end and not hb.store.check([f"done/{r}" for r in range(1, g.world)]):
                time.sleep(0.05)
        dist.destroy_process_group()
    except Exception:
        pass


class Heartbeat:
    """Every rank bumps its counter in the rendezvous store and watches the others' (see the module docstring). A
    second thread watches the first: a store that stops answering (its host stopped, a network partition) blocks
    the store calls rather than failing them."""

    def __init__(self, g: Group):
        from torch.distributed import PrefixStore
        from torch.distributed.distributed_c10d import _get_default_store

        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = PrefixStore(f"overspill-pp/{restart}/", _get_default_store())
        self.g, self.period = g, max(0.1, min(2.0, g.timeout / 6))
        self.last_round = time.monotonic()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, name="overspill-heartbeat", daemon=True),
                        threading.Thread(target=self._watch, name="overspill-heartbeat-watch", daemon=True)]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=self.period + 1)

    def _quiet(self) -> bool:
        return self._stop.is_set() or self.g.failed

    def _watch(self) -> None:
        g = self.g
        while not self._stop.wait(self.period):
            stalled = time.monotonic() - self.last_round
            if stalled > g.timeout and not self._quiet():
                die(f"rank {g.rank}: the rendezvous store stopped answering for {stalled:.0f} s, so the launcher "
                    f"or rank 0 is stopped or unreachable")

    def _run(self) -> None:
        g = self.g
        others = [r for r in range(g.world) if r != g.rank]
        seen = {r: (-1, time.monotonic()) for r in others}
        while not self._stop.wait(self.period):
            try:
                self.store.add(f"hb/{g.rank}", 1)
                others = [r for r in others if not self.store.check([f"done/{r}"])]   # done: exited in order
                counts = {r: self.store.add(f"hb/{r}", 0) for r in others}
            except Exception as e:
                if not self._quiet():
                    die(f"rank {g.rank}: lost the rendezvous store, so the launcher or rank 0 is gone "
                        f"({first_line(e)})")
                return
            now = self.last_round = time.monotonic()
            for r, c in counts.items():
                if c != seen[r][0]:
                    seen[r] = (c, now)
                elif now - seen[r][1] > g.timeout and not self._quiet():
                    die(f"rank {g.rank}: rank {r} stopped responding (no heartbeat for {g.timeout:g} s)")


def checkpoint_digest(path: str) -> str:
    """A cheap fingerprint of a checkpoint's weights, for comparing the copies ranks load (not a checksum).

    A layer store: its manifest, which holds every unit's sha256. A Hugging Face directory: config.json, and each
    weight file's name, size and three 64 KiB samples (start, middle, end)."""
    from ..checkpoint.store import MANIFEST, is_layer_store

    h = hashlib.sha256()
    if is_layer_store(path):
        with open(os.path.join(path, MANIFEST), "rb") as f:
            h.update(f.read())
        return h.hexdigest()[:16]
    names = sorted(n for n in os.listdir(path) if n == "config.json" or n.endswith((".safetensors", ".bin")))
    for n in names:
        p = os.path.join(path, n)
        size = os.path.getsize(p)
        h.update(f"{n}:{size}".encode())
        with open(p, "rb") as f:
            for off in sorted({0, max(0, size // 2 - (32 << 10)), max(0, size - (64 << 10))}):
                f.seek(off)
                h.update(f.read(64 << 10))
    return h.hexdigest()[:16]


def agree(g: Group, facts: dict) -> list[dict]:
    """All-gather every rank's ``facts`` (plain data: model, digest, settings, its unit range) and raise one line
    naming the first one the ranks disagree on. Returns them by rank."""
    import torch.distributed as dist

    out: list = [None] * g.world
    try:
        dist.all_gather_object(out, facts)   # the default group: every rank is here within moments of joining
    except Exception as e:
        raise g.broken("a rank during the start-up check", e) from None
    _raise_first_error(g, out, "could not open its checkpoint")
    for key in facts:
        vals = [json.dumps(o.get(key), sort_keys=True, default=str) for o in out]
        if len(set(vals)) > 1:
            mine = vals[g.rank]
            other = next(r for r, v in enumerate(vals) if v != mine)
            raise OverspillError(f"rank {g.rank}: the ranks disagree on {key}: rank {g.rank} has {mine}, rank "
                                 f"{other} has {vals[other]}; every rank must run the same command on the same "
                                 f"checkpoint")
    return out


def load_everywhere(g: Group, load: Callable[[], object], units: list[int], **report) -> tuple[object, list[dict]]:
    """This rank's ``load()`` (a loader.Built), then every rank's outcome all-gathered: {"units", "streams", "plan",
    **report} or its error line. The first rank's error ends every rank with one line (and closes what loaded)."""
    built = None
    try:
        built = load()
        outcome = {"units": units, "streams": bool(getattr(built.executor.source, "streamed", None)),
                   "plan": built.plan.to_json() if built.plan is not None else None, **report}
    except OverspillError as e:
        outcome = {"error": str(e)}
    except Exception as e:   # reported by every rank, in one line
        outcome = {"error": f"{type(e).__name__}: {first_line(e)}"}
    try:
        return built, gather_outcome(g, outcome)
    except OverspillError:
        if built is not None:
            built.executor.close()
        raise


def gather_outcome(g: Group, outcome: dict) -> list[dict]:
    """After loading (which takes each rank its own time: no deadline here, the heartbeat watches): every rank's
    outcome, {"error": line} or what it reports; the first rank's error ends every rank with one line."""
    import torch.distributed as dist

    out: list = [None] * g.world
    try:
        dist.all_gather_object(out, outcome, group=g.ctrl)
    except Exception as e:
        raise g.broken("a rank while waiting for every rank to load", e) from None
    _raise_first_error(g, out, "could not load its stage")
    return out


def _raise_first_error(g: Group, out: list[dict], what: str) -> None:
    """A rank's own error is its line; the others say which rank failed and why."""
    own = out[g.rank].get("error")
    if own:
        raise OverspillError(f"rank {g.rank}: {own}")
    bad = [(r, o["error"]) for r, o in enumerate(out) if o.get("error")]
    if bad:
        r, msg = bad[0]
        raise OverspillError(f"rank {g.rank}: rank {r} {what}: {msg}")
