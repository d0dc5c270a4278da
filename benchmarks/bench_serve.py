"""Serving benchmark: N concurrent streaming clients against OpenAI-style /v1/completions servers (`overspill serve`,
a transformers + accelerate baseline, llama.cpp's llama-server), the same client for every server.

    driver ─► per round, sides interleaved (A, B, C, A, B, C, ... --repeats rounds):
                streamed mode: disk probe on the side's files (O_DIRECT, 8 threads, 2 GiB), drop_caches(),
                               a fresh memory cgroup (--cgroup-limit) the server runs in
                start the server (a subprocess), wait for /health 200                  -> load s
                warm it with one request (--warmup-tokens)
                for N in --clients: N clients at once, one streaming request each       -> one row per N
                    (prompt: --prompt-len random token ids, different per client, fixed seed; max_tokens
                     --new-tokens, temperature 0, ignore_eos, stop [], usage asked for)
                server peak RSS (VmHWM) and the cgroup's peak; stop it (SIGTERM, then SIGKILL)
           ─► table of medians, the targets, rows appended to --out

Per level: aggregate tok/s = completion tokens of all requests (from usage) / wall time from the first send to
the last `data: [DONE]`; time to first token (TTFT) = send to first content chunk, per request; inter-token
latency (ITL) = gaps between consecutive content chunks, pooled over the level's requests; p50 / p95.

Modes:
  streamed  GPT-J-6B's shape bigger than memory: overspill serve on the HF dir, a bf16 layer store and an int8 layer
            store (`overspill convert`), --max-memory cpu=4GiB, each server in a 6 GiB memory cgroup, page cache
            dropped before each side; against serve_baseline.py (transformers `generate` on the checkpoint offloaded
            by accelerate under the same budget, one request at a time: measured at --baseline-clients 1,2)
  ram       the 1.1B Llama (tinyllama) in memory: overspill serve bf16 and --quantize int8 against
            llama-server -np 16 -c 16x256 --cont-batching -t 2 on a BF16 and a Q8_0 GGUF of the same weights

Random checkpoints have no tokenizer: each model directory is served through a view (symlinks to its files plus a
placeholder tokenizer.json of "<tN>" words, the vocabulary llamacpp_gguf.py gives llama.cpp), so every server
streams one text chunk per token. Prompts are token ids on every side.

    .venv/bin/python benchmarks/bench_serve.py --mode streamed      # see benchmarks/README.md, "Serving"
    .venv/bin/python benchmarks/bench_serve.py --mode ram
    .venv/bin/python benchmarks/bench_serve.py --smoke             # tiny random Llama, every side, clients 1,2
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import common  # noqa: E402  (also puts the repository root on sys.path)
from bench_offload import cgroup_memory_stat, cgroups_available, drop_unavailable_accelerate, fmt, make_prompts, \
    store_files

DEFAULT_OUT = common.CACHE_DIR / "results" / "serve.jsonl"
LLAMA_BUILD = common.CACHE_DIR / "llama.cpp-build"
SIDES = {"streamed": ("overspill-hf", "overspill-store", "overspill-store-int8", "accelerate"),
         "ram": ("overspill", "overspill-int8", "llama-bf16", "llama-q8_0")}
REFERENCE = {"overspill": "llama-bf16", "overspill-int8": "llama-q8_0"}   # ram mode: the pairs compared
MODE_DEFAULTS = {
    "streamed": dict(hf="bench-cache/gptj-6b-bfloat16", store="bench-cache/gptj-6b-bfloat16-store",
                     store_int8="bench-cache/gptj-6b-bfloat16-int8-store", max_memory="cpu=4GiB",
                     cgroup_limit="6GiB", prompt_len=32, new_tokens=16),
    "ram": dict(hf="bench-cache/tinyllama-bfloat16", gguf_bf16="bench-cache/gguf/tinyllama-bf16.gguf",
                gguf_q8="bench-cache/gguf/tinyllama-q8_0.gguf", prompt_len=100, new_tokens=64),
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """One rewritten status line, on a terminal only (logs and CI get the per-run lines alone)."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.shown = False

    def __call__(self, msg: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + msg)
            sys.stderr.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False


progress = Progress()


# ---------------------------------------------------------------------------------------------
# model directories with a tokenizer


def placeholder_tokenizer(vocab_size: int, path: Path) -> None:
    """A word-level tokenizer.json whose token i is "<ti>": the placeholder vocabulary llamacpp_gguf.py writes into
    GGUF files, so every server streams the same kind of text, one piece per token."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({f"<t{i}>": i for i in range(vocab_size)}, unk_token="<t0>"))
    tok.save(str(path))


def model_vocab(path: Path) -> int:
    """vocab_size of a Hugging Face directory or a layer store."""
    if (path / "manifest.json").exists():
        m = json.loads((path / "manifest.json").read_text())
        return (m.get("hf_config") or {}).get("vocab_size") or m["config"]["vocab_size"]
    return common.read_config(path)["vocab_size"]


def tokenizer_view(src: Path, views: Path) -> Path:
    """`src` itself where it has a tokenizer.json; else views/<name>: a symlink to each of its entries plus a
    placeholder tokenizer.json (remade every run; the checkpoint itself is not touched)."""
    src = src.resolve()
    if (src / "tokenizer.json").exists():
        return src
    view = views / src.name
    if view.exists():
        shutil.rmtree(view)
    view.mkdir(parents=True)
    for entry in src.iterdir():
        (view / entry.name).symlink_to(entry)
    placeholder_tokenizer(model_vocab(src), view / "tokenizer.json")
    return view


# ---------------------------------------------------------------------------------------------
# servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Side:
    name: str
    kind: str                       # overspill | accelerate | llama
    model: Path                     # what the server loads (a view, a store view or a GGUF)
    files: list[Path]               # its weight files (the disk probe's)
    scheme: str
    args: list[str] = field(default_factory=list)   # kind-specific server flags

    def command(self, a: argparse.Namespace, port: int) -> list[str]:
        host = ["--host", "127.0.0.1", "--port", str(port)]
        if self.kind == "overspill":
            cmd = [sys.executable, "-m", "overspill.cli", "serve", "--model", str(self.model), *self.args,
                   "--max-batch-size", str(a.max_batch_size), "--max-seq-len", str(a.max_seq_len),
                   "--max-queue", str(a.max_queue), "--log-level", "warning"]
            if a.max_memory:
                cmd += ["--max-memory", a.max_memory]
            return cmd + host
        if self.kind == "accelerate":
            return [sys.executable, str(Path(__file__).with_name("serve_baseline.py")), "--model", str(self.model),
                    "--dtype", a.dtype, "--max-memory", a.max_memory or "cpu=4GiB", "--threads", str(a.threads),
                    *(["--offload-dir", a.offload_dir] if a.offload_dir else []), *host]
        return [a.llama_server, "-m", str(self.model), "-np", str(a.max_batch_size),
                "-c", str(a.max_batch_size * a.llama_ctx), "--cont-batching", "-t", str(a.threads), *host]


class Server:
    """A server subprocess: its output to `log`, optionally inside a memory cgroup (joined between fork and exec)."""

    def __init__(self, cmd: list[str], log: Path, cgroup: Path | None = None):
        self.cmd, self.log_path = cmd, log
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log, "w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(common.REPO_ROOT)] + [p for p in [
            os.environ.get("PYTHONPATH")] if p])}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, preexec_fn=common._join_cgroup(cgroup) if cgroup else None)

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, url: str, timeout: float, label: str) -> float:
        """Poll /health until 200; seconds from start. Raises RuntimeError if the process exits or time runs out."""
        import httpx

        t0 = time.perf_counter()
        with httpx.Client(timeout=5) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited {self.proc.returncode} while loading")
                try:
                    if client.get(url + "/health").status_code == 200:
                        return time.perf_counter() - t0
                except httpx.TransportError:
                    pass
                el = time.perf_counter() - t0
                if el > timeout:
                    raise RuntimeError(f"no /health 200 after {timeout:.0f} s")
                progress(f"   {label}: loading, {el:.0f} s")
                time.sleep(0.25)

    def peak_rss_bytes(self) -> int | None:
        try:
            return common._status_kib("VmHWM", self.proc.pid) * 1024
        except OSError:
            return None

    def stop(self, grace: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


# ---------------------------------------------------------------------------------------------
# the client


def percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one_request(client, body: dict) -> dict:
    """One streaming request: the send time, the time of every content chunk, the usage, how it ended."""
    r = {"t_send": time.perf_counter(), "chunks": [], "usage": None, "finish_reason": None, "done": False,
         "error": None, "status": None}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            r["status"] = resp.status_code
            if resp.status_code != 200:
                r["error"] = (await resp.aread()).decode(errors="replace")[:500]
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                now = time.perf_counter()
                if data == "[DONE]":
                    r["done"], r["t_done"] = True, now
                    break
                obj = json.loads(data)
                if "error" in obj:
                    r["error"] = json.dumps(obj["error"])[:500]
                    continue
                if obj.get("usage"):
                    r["usage"] = obj["usage"]
                for ch in obj.get("choices") or []:
                    if ch.get("text"):
                        r["chunks"].append(now)
                    if ch.get("finish_reason"):
                        r["finish_reason"] = ch["finish_reason"]
    except Exception as e:   # noqa: BLE001 - a failed request is a figure of the level, not a crash
        r["error"] = f"{type(e).__name__}: {e}"[:500]
    r.setdefault("t_done", time.perf_counter())
    return r


def request_body(prompt: list[int], max_tokens: int) -> dict:
    """The same body for every server: token ids, greedy, no stop strings, EOS ignored, usage in the stream."""
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "stop": []}


async def run_level_async(url: str, prompts: list[list[int]], max_tokens: int, timeout: float, label: str) -> list:
    import httpx

    n = len(prompts)
    limits = httpx.Limits(max_connections=n + 2, max_keepalive_connections=n + 2)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout, connect=30), limits=limits) as client:
        tasks = [asyncio.create_task(one_request(client, request_body(p, max_tokens))) for p in prompts]
        t0 = time.perf_counter()
        if progress.tty:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.5)
                done = sum(t.done() for t in tasks)
                progress(f"   {label}: {done}/{n} requests done, {time.perf_counter() - t0:.0f} s")
        return await asyncio.gather(*tasks)


def level_figures(reqs: list[dict], max_tokens: int) -> dict:
    """A level's figures from its requests (see the module docstring)."""
    ok = [r for r in reqs if r["done"] and r["error"] is None and r["status"] == 200]
    tokens = []
    for r in ok:
        u = r["usage"] or {}
        tokens.append(u["completion_tokens"] if "completion_tokens" in u else len(r["chunks"]))
    wall = max(r["t_done"] for r in reqs) - min(r["t_send"] for r in reqs)
    ttft = [r["chunks"][0] - r["t_send"] for r in ok if r["chunks"]]
    itl = [y - x for r in ok for x, y in zip(r["chunks"], r["chunks"][1:])]
    e2e = [r["t_done"] - r["t_send"] for r in ok]
    errors = [r["error"] or f"status {r['status']}, done {r['done']}" for r in reqs if r not in ok]
    return {"ok": len(ok) == len(reqs) and all(t > 0 for t in tokens), "requests": len(reqs), "requests_ok": len(ok),
            "completion_tokens": sum(tokens), "tokens_per_request": tokens,
            "tokens_from_usage": all(r["usage"] for r in ok), "exact": all(t == max_tokens for t in tokens),
            "chunks_per_request": [len(r["chunks"]) for r in ok],
            "finish_reasons": sorted({str(r["finish_reason"]) for r in ok}),
            "wall_s": wall, "agg_tok_s": sum(tokens) / wall if wall > 0 else None,
            "ttft_s": ttft, "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "itl_p50_s": percentile(itl, 0.5), "itl_p95_s": percentile(itl, 0.95), "itl_count": len(itl),
            "itl_mean_s": sum(itl) / len(itl) if itl else None,
            "e2e_p50_s": percentile(e2e, 0.5), "e2e_max_s": max(e2e) if e2e else None, "errors": errors[:5]}


STEP_METRICS = ("overspill_step_seconds_sum", "overspill_step_seconds_count", "overspill_step_batch_size_sum",
                "overspill_step_tokens_sum")


def scrape(url: str) -> dict[str, float]:
    """overspill serve's engine counters (/metrics, unlabelled samples); {} from servers without them."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in STEP_METRICS:
            out[name] = float(value)
    return out


def run_level(url: str, prompts: list[list[int]], max_tokens: int, timeout: float, label: str) -> dict:
    """One level; where the server reports engine steps (overspill serve), also the level's steps, mean step seconds
    and mean sequences per step (how much the requests were batched)."""
    before = scrape(url)
    reqs = asyncio.run(run_level_async(url, prompts, max_tokens, timeout, label))
    progress.clear()
    fig = level_figures(reqs, max_tokens)
    after = scrape(url)
    if before and len(after) == len(STEP_METRICS):
        d = {k: after[k] - before.get(k, 0.0) for k in STEP_METRICS}
        steps = d["overspill_step_seconds_count"]
        fig.update(engine_steps=int(steps), engine_step_s_mean=d["overspill_step_seconds_sum"] / steps if steps else None,
                   engine_batch_mean=d["overspill_step_batch_size_sum"] / steps if steps else None,
                   engine_step_tokens=int(d["overspill_step_tokens_sum"]))
    return fig


# ---------------------------------------------------------------------------------------------
# one side, one round


def levels_of(a: argparse.Namespace, side: Side) -> list[int]:
    return a.baseline_levels if side.kind == "accelerate" else a.levels


def side_run(a: argparse.Namespace, side: Side, rnd: int, ctx: dict) -> list[dict]:
    """Start the side's server (cold, in a cgroup in streamed mode), warm it, run every client level, stop it.
    Returns one row per level (one failed row if the server never became ready)."""
    base = {"kind": "run", "mode": a.mode, "time": ctx["stamp"], "side": side.name, "scheme": side.scheme,
            "round": rnd, "model": str(side.model), "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
            "max_batch_size": a.max_batch_size, "max_memory": a.max_memory if side.kind != "llama" else None}
    if a.mode == "streamed":
        base["disk_gbps_run"] = common.disk_read_gbps(side.files, max_bytes=a.read_probe_bytes, threads=8, direct=True)
        base["weight_file_bytes"] = sum(f.stat().st_size for f in side.files)
    if a.drop_caches:
        common.drop_caches()
    port = free_port()
    cmd = side.command(a, port)
    base["command"] = shlex.join(cmd)
    say(f"   round {rnd + 1}/{a.repeats} {side.name}: {base['command']}")
    url = f"http://127.0.0.1:{port}"
    log = Path(ctx["logs"]) / f"{ctx['stamp'].replace(':', '')}-{side.name}-r{rnd}.log"
    cg = common.MemoryCgroup(f"bench-serve-{os.getpid()}", ctx["limit"]) if ctx["cgroups"] else None
    rows: list[dict] = []
    server = None
    try:
        if cg is not None:
            cg.__enter__()
        try:
            server = Server(cmd, log, cg.path if cg else None)
            base["load_s"] = server.wait_ready(url, a.load_timeout, side.name)
            progress.clear()
            t0 = time.perf_counter()
            warm = run_level(url, make_prompts(ctx["vocab"], 1, a.prompt_len, a.seed + 10_000), a.warmup_tokens,
                             a.request_timeout, f"{side.name} warm-up")
            base["warmup_s"] = time.perf_counter() - t0
            if not warm["ok"]:
                raise RuntimeError(f"the warm-up request failed: {warm['errors']}")
        except (RuntimeError, OSError) as e:
            progress.clear()
            row = {**base, "clients": None, "ok": False, "error": f"{type(e).__name__}: {e}",
                   "stderr_tail": server.tail() if server is not None else ""}
            say(f"   round {rnd + 1}/{a.repeats} {side.name}: FAILED: {e}\n"
                + "\n".join("      " + ln for ln in row["stderr_tail"].splitlines()[-8:]))
            return [row]
        for n in levels_of(a, side):
            prompts = make_prompts(ctx["vocab"], n, a.prompt_len, a.seed + n)   # the same prompts on every side
            fig = run_level(url, prompts, a.new_tokens, a.request_timeout, f"{side.name} {n} clients")
            row = {**base, "clients": n, **fig}
            rows.append(row)
            if fig["ok"]:
                say(f"   round {rnd + 1}/{a.repeats} {side.name:20s} {n:3d} clients: {fig['agg_tok_s']:8.2f} tok/s "
                    f"aggregate, TTFT p50 {fmt(fig['ttft_p50_s'])} s p95 {fmt(fig['ttft_p95_s'])} s, ITL p50 "
                    f"{fmt(fig['itl_p50_s'])} s p95 {fmt(fig['itl_p95_s'])} s, {fig['completion_tokens']} tokens in "
                    f"{fig['wall_s']:.1f} s"
                    + (f"; {fig['engine_steps']} engine steps of {fmt(fig['engine_step_s_mean'])} s, "
                       f"{fmt(fig['engine_batch_mean'])} sequences each" if fig.get("engine_steps") else "")
                    + ("" if fig["exact"] else
                                                  f" (NOT {a.new_tokens} tokens each: {fig['tokens_per_request']})"))
            else:
                say(f"   round {rnd + 1}/{a.repeats} {side.name} {n} clients: FAILED: {fig['requests_ok']}/"
                    f"{fig['requests']} requests finished; {fig['errors'][:2]}")
    finally:
        progress.clear()
        if server is not None:
            peak = server.peak_rss_bytes()
            rc = server.stop()
            cg_stats = cg.stats() if cg is not None else None
            cg_mem = cgroup_memory_stat(cg.path) if cg is not None else None
            for row in rows:
                row.update(server_peak_rss_bytes=peak, server_exit=rc, cgroup=cg_stats, cgroup_memory_stat=cg_mem)
            if rows:
                say(f"   round {rnd + 1}/{a.repeats} {side.name}: load {base.get('load_s', 0):.1f} s, server peak "
                    f"RSS {(peak or 0) / 2**30:.2f} GiB" + (f", cgroup max {(cg_stats['max_usage_bytes'] or 0) / 2**30:.2f}"
                                                            f" GiB, OOM kills {cg_stats.get('oom_kill')}" if cg_stats else "")
                    + (f", disk {base['disk_gbps_run']:.2f} GB/s" if "disk_gbps_run" in base else ""))
        if cg is not None:
            cg.__exit__(None, None, None)
    return rows


# ---------------------------------------------------------------------------------------------
# sides, tables, targets


def resolve(p: str | None) -> Path | None:
    if not p:
        return None
    path = Path(p)
    return path if path.is_absolute() or path.exists() else common.REPO_ROOT / path


def build_sides(a: argparse.Namespace, names: list[str], views: Path) -> list[Side]:
    """The sides asked for whose files exist; each missing one is skipped with one line saying how to make it."""
    hf = resolve(a.hf)
    if not (hf / "config.json").exists():
        raise SystemExit(f"no checkpoint at {hf}: make it with benchmarks/make_checkpoint.py (benchmarks/README.md)")
    py = ".venv/bin/python"
    sides, view = [], {}
    for name in names:
        if name in ("overspill-hf", "overspill", "overspill-int8", "accelerate"):
            args = ["--dtype", a.dtype] + (["--quantize", "int8"] if name == "overspill-int8" else [])
            scheme = "int8" if name == "overspill-int8" else a.dtype
            view = view or {"hf": tokenizer_view(hf, views)}
            sides.append(Side(name, "accelerate" if name == "accelerate" else "overspill", view["hf"],
                              common.safetensors_files(hf), scheme, args))
        elif name in ("overspill-store", "overspill-store-int8"):
            store = resolve(a.store if name == "overspill-store" else a.store_int8)
            if store is None or not (store / "manifest.json").exists():
                q = " --quantize int8" if name.endswith("int8") else ""
                say(f"{name} skipped: no layer store at {store}; make it with: {py} -m overspill.cli convert {a.hf} "
                    f"{a.store if name == 'overspill-store' else a.store_int8}{q}")
                continue
            m = json.loads((store / "manifest.json").read_text())
            sides.append(Side(name, "overspill", tokenizer_view(store, views / "stores"), store_files(store),
                              m.get("quantize") or m.get("dtype") or "?", ["--dtype", "auto"]))
        else:   # llama-bf16, llama-q8_0
            gguf = resolve(a.gguf_bf16 if name == "llama-bf16" else a.gguf_q8)
            if not (a.llama_server and shutil.which(a.llama_server)):
                say(f"{name} skipped: no llama-server at {a.llama_server} (--llama-server; build it as benchmarks/README.md, 'Serving', "
                    f"says)")
                continue
            if gguf is None or not gguf.exists():
                say(f"{name} skipped: no GGUF at {gguf} (benchmarks/README.md, 'Serving', says how to write it)")
                continue
            sides.append(Side(name, "llama", gguf, [gguf], "bf16" if name == "llama-bf16" else "q8_0"))
    return sides


def med(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return common.median(vals) if vals else None


def ratios(rows: list[dict], num: tuple[str, int], den: tuple[str, int]) -> list[float]:
    """Same-round ratios of agg_tok_s: (side, clients) over (side, clients)."""
    by = {(r["round"], r["side"], r["clients"]): r["agg_tok_s"] for r in rows if r.get("ok") and r.get("agg_tok_s")}
    rounds = sorted({k[0] for k in by})
    return [by[(x, *num)] / by[(x, *den)] for x in rounds if (x, *num) in by and (x, *den) in by]


def table(rows: list[dict], sides: list[Side], a: argparse.Namespace) -> str:
    lines = ["| side | scheme | clients | ok runs | tokens/request | aggregate tok/s | x 1 client | TTFT p50 s | "
             "TTFT p95 s | ITL p50 s | ITL p95 s | wall s | load s | server peak RSS GiB | cgroup max GiB |",
             "|" + "---|" * 15]
    for side in sides:
        for n in levels_of(a, side):
            all_ = [r for r in rows if r["side"] == side.name and r.get("clients") == n]
            ok = [r for r in all_ if r.get("ok")]
            runs = [r for r in rows if r["side"] == side.name and r.get("clients") in (n, None)]
            scale = ratios(rows, (side.name, n), (side.name, 1))
            toks = sorted({t for r in ok for t in r["tokens_per_request"]})
            cgmax = [(r.get("cgroup") or {}).get("max_usage_bytes") for r in all_]
            cgmax = [c for c in cgmax if c]
            lines.append(
                f"| {side.name} | {side.scheme} | {n} | {len(ok)}/{len(runs)} | "
                f"{','.join(map(str, toks)) or '-'} | {fmt(med(ok, 'agg_tok_s'), '.3g')} | "
                f"{fmt(common.median(scale) if scale else None, '.2f')} | {fmt(med(ok, 'ttft_p50_s'))} | "
                f"{fmt(med(ok, 'ttft_p95_s'))} | {fmt(med(ok, 'itl_p50_s'))} | {fmt(med(ok, 'itl_p95_s'))} | "
                f"{fmt(med(ok, 'wall_s'))} | {fmt(med(ok, 'load_s'))} | "
                f"{fmt((med(ok, 'server_peak_rss_bytes') or float('nan')) / 2**30, '.2f')} | "
                f"{fmt(max(cgmax) / 2**30 if cgmax else None, '.2f')} |")
    return "\n".join(lines)


def targets(rows: list[dict], sides: list[Side], a: argparse.Namespace) -> list[str]:
    """The issue's targets, from same-round ratios (medians, each round's listed)."""
    names = [s.name for s in sides]
    n = a.target_clients
    out = []

    def line(label: str, rs: list[float], goal: float) -> str:
        if not rs:
            return f"{label}: - (not measured)"
        m = common.median(rs)
        return (f"{label}: {m:.2f}x (rounds: {', '.join(f'{x:.2f}' for x in rs)}); target >= {goal:g}x: "
                f"{'MET' if m >= goal else 'NOT MET'}")

    for s in sides:
        if s.kind != "overspill":
            continue
        if a.mode == "streamed":
            out.append(line(f"{s.name}: aggregate at {n} clients / at 1 client", ratios(rows, (s.name, n), (s.name, 1)),
                            8))
            if "accelerate" in names:
                out.append(line(f"{s.name}: aggregate at {n} clients / accelerate's single-request rate",
                                ratios(rows, (s.name, n), ("accelerate", 1)), 10))
        elif REFERENCE.get(s.name) in names:
            ref = REFERENCE[s.name]
            out.append(line(f"{s.name}: aggregate at {n} clients / {ref} at {n} clients",
                            ratios(rows, (s.name, n), (ref, n)), 1))
    return out


def driver(a: argparse.Namespace) -> Path:
    """Every side, round and level; prints the table and the targets; returns the results file."""
    names = [s.strip() for s in a.sides.split(",") if s.strip()] if a.sides else list(SIDES[a.mode])
    bad = [s for s in names if s not in SIDES[a.mode]]
    if bad or not names:
        raise SystemExit(f"--sides in {a.mode} mode takes a comma list of {SIDES[a.mode]}, got {a.sides!r}")
    drop_unavailable_accelerate(names, a.smoke)
    if importlib.util.find_spec("overspill.serve") is None:
        if not a.smoke:
            raise SystemExit("overspill serve is not there (overspill/serve/): nothing to measure")
        say("smoke: overspill sides skipped: overspill serve is not there (overspill/serve/)")
        names = [s for s in names if not s.startswith("overspill")]
    out = Path(a.out)
    views = Path(a.views) if a.views else common.CACHE_DIR / "serve-views"
    sides = build_sides(a, names, views)
    if not sides:
        raise SystemExit("no side left to run")
    if len(sides) < len(names) and not a.smoke and not a.allow_missing:
        raise SystemExit("some sides cannot run (above); make what they need, leave them out of --sides, or pass "
                         "--allow-missing")
    no_cgroup = cgroups_available() if a.mode == "streamed" else "not used in ram mode"
    if a.mode == "streamed" and no_cgroup:
        if not a.smoke:
            raise SystemExit(f"cannot make a memory cgroup ({no_cgroup}): streamed mode runs each server in one "
                             "(cgroup v1 mounted at /sys/fs/cgroup/memory, as root)")
        say(f"smoke: no memory cgroup ({no_cgroup}): the servers run without a memory limit")
    if not a.drop_caches and a.mode == "streamed" and not a.smoke:
        say("--no-drop-caches: the servers may read from the page cache (plumbing checks only)")
    from overspill.placement import parse_size

    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    ctx = {"stamp": stamp, "vocab": model_vocab(resolve(a.hf)), "cgroups": a.mode == "streamed" and not no_cgroup,
           "limit": parse_size(a.cgroup_limit) if a.cgroup_limit else None,
           "logs": a.logs or str(out.parent / "serve-logs")}
    title = (f"{resolve(a.hf).name}  mode {a.mode}  prompt {a.prompt_len}  new {a.new_tokens}  clients "
             f"{','.join(map(str, a.levels))}" + (f" (accelerate {','.join(map(str, a.baseline_levels))})"
                                                 if any(s.kind == 'accelerate' for s in sides) else "")
             + (f"  max_memory {a.max_memory}" if a.max_memory else "")
             + (f"  cgroup {a.cgroup_limit}" if ctx["cgroups"] else "") + f"  max batch {a.max_batch_size}"
             + f"  drop caches {a.drop_caches}  repeats {a.repeats}")
    say(f"== {title}\n   reproduce: {shlex.join([sys.executable, *sys.argv])}\n   server logs: {ctx['logs']}")
    rows: list[dict] = []
    for rnd, name in common.interleave([s.name for s in sides], a.repeats):
        side = next(s for s in sides if s.name == name)
        for row in side_run(a, side, rnd, ctx):
            rows.append(row)
            common.append_jsonl(out, row)
    note = []
    if a.mode == "streamed":
        probes = [(r["side"], r["round"], r["disk_gbps_run"]) for r in rows if r.get("disk_gbps_run")]
        seen = sorted({(s, x, g) for s, x, g in probes}, key=lambda t: (t[1], t[0]))
        if seen:
            note.append(f"disk (O_DIRECT, 8 threads, before each side): median {common.median(g for _, _, g in seen):.2f}"
                        f" GB/s ({', '.join(f'{s} r{x + 1} {g:.2f}' for s, x, g in seen)})")
    inexact = sorted({r["side"] for r in rows if r.get("ok") and not r.get("exact")})
    if inexact:
        note.append(f"NOT exactly {a.new_tokens} tokens per request on: {', '.join(inexact)} (tokens counted from usage)")
    tgt = targets(rows, sides, a)
    print(f"### {title}\n\n{table(rows, sides, a)}\n\n" + "\n".join(tgt + note) + "\n", flush=True)
    summary = {"kind": "summary", "mode": a.mode, "time": stamp, "title": title, "sides": [s.name for s in sides],
               "clients": a.levels, "baseline_clients": a.baseline_levels, "targets": tgt,
               "commands": sorted({r["command"] for r in rows if r.get("command")}),
               "reproduce": shlex.join([sys.executable, *sys.argv])}
    for s in sides:
        for n in levels_of(a, s):
            ok = [r for r in rows if r["side"] == s.name and r.get("clients") == n and r.get("ok")]
            summary[f"{s.name}@{n}"] = {k: med(ok, k) for k in ("agg_tok_s", "ttft_p50_s", "ttft_p95_s", "itl_p50_s",
                                                               "itl_p95_s", "wall_s", "load_s", "server_peak_rss_bytes")}
    common.append_jsonl(out, summary)
    say(f"raw rows appended to {out}")
    return out


# ---------------------------------------------------------------------------------------------
# smoke


def llama_tools(a: argparse.Namespace) -> str | None:
    """Why the llama.cpp side cannot run in a smoke run, or None. Finds gguf-py through the build's CMakeCache where
    the gguf package is not importable."""
    if not (a.llama_server and shutil.which(a.llama_server)):
        return "no llama-server (--llama-server, or build it as benchmarks/README.md, 'Serving', says)"
    if importlib.util.find_spec("gguf") is None:
        cache = Path(a.llama_server).resolve().parent.parent / "CMakeCache.txt"
        try:
            src = next(ln.split("=", 1)[1] for ln in cache.read_text().splitlines()
                       if ln.startswith("CMAKE_HOME_DIRECTORY:"))
            if (Path(src) / "gguf-py" / "gguf").is_dir():
                sys.path.insert(0, str(Path(src) / "gguf-py"))
        except (OSError, StopIteration):
            pass
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not importable (PYTHONPATH=<llama.cpp>/gguf-py)"
    return None


def smoke(a: argparse.Namespace) -> None:
    """--smoke: a tiny random Llama served by every side, both modes, clients 1,2 and a few tokens; the streamed mode
    under a budget below the model's size (so overspill streams), no page cache dropped. Fails unless every run
    succeeded."""
    with common.Smoke(a.keep) as sm:
        from overspill.cli import main as overspill_cli

        a.dtype = a.dtype or common.compute_dtype()
        a.llama_server = a.llama_server or default_llama_server()
        ckpt = sm.checkpoint("llama-tiny", a.dtype)
        a.hf, a.views = str(ckpt), str(sm.dir / "views")
        a.out = a.out or str(sm.out("serve.jsonl"))
        a.logs = a.logs or str(sm.dir / "serve-logs")
        elems = sum(math.prod(t["shape"]) for f in common.safetensors_files(ckpt)
                    for t in common.safetensors_header(f).values())
        budget = f"cpu={int(0.9 * elems * (4 if a.dtype == 'float32' else 2)) >> 10}KiB"
        asked = [s.strip() for s in a.sides.split(",")] if a.sides else None
        runs = 0
        for mode in ("streamed", "ram"):
            sides = [s for s in SIDES[mode] if asked is None or s in asked]
            if not sides:
                continue
            b = argparse.Namespace(**vars(a))
            b.mode, b.sides = mode, ",".join(sides)
            b.max_memory = budget if mode == "streamed" else None
            b.cgroup_limit = "2GiB" if mode == "streamed" else None
            if mode == "streamed":
                for name, q in (("store", None), ("store_int8", "int8")):
                    if f"overspill-{name.replace('_', '-')}" in sides:
                        dst = sm.dir / name
                        rc = overspill_cli(["convert", str(ckpt), str(dst), "--dtype", a.dtype]
                                           + (["--quantize", q] if q else []))
                        if rc:
                            raise SystemExit(f"smoke: overspill convert exited {rc}")
                        setattr(b, name, str(dst))
            else:
                why = llama_tools(b)
                if why:
                    say(f"smoke: llama.cpp side skipped: {why}")
                    b.sides = ",".join(s for s in sides if not s.startswith("llama"))
                else:
                    import llamacpp_gguf

                    b.gguf_bf16 = str(sm.dir / "tiny-bf16.gguf")
                    llamacpp_gguf.convert(ckpt, b.gguf_bf16)
                    quantize = Path(b.llama_server).with_name("llama-quantize")
                    if quantize.exists():
                        b.gguf_q8 = str(sm.dir / "tiny-q8_0.gguf")
                        subprocess.run([str(quantize), b.gguf_bf16, b.gguf_q8, "Q8_0", "1"], check=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    else:
                        say("smoke: llama-q8_0 skipped: no llama-quantize beside llama-server")
                        b.sides = ",".join(s for s in sides if s != "llama-q8_0")
                if not b.sides:
                    continue
            fill_defaults(b)
            driver(b)
            runs += 1
        if not runs:
            raise SystemExit("smoke: no side ran")
        common.smoke_check(a.out, min_runs=2)


# ---------------------------------------------------------------------------------------------
# arguments


def default_llama_server() -> str | None:
    exe = LLAMA_BUILD / "bin" / "llama-server"
    return str(exe) if exe.exists() else shutil.which("llama-server")


def fill_defaults(a: argparse.Namespace) -> None:
    """The mode's defaults for what was not given, then the derived values."""
    for k, v in MODE_DEFAULTS[a.mode].items():
        if getattr(a, k, None) is None and not (a.smoke and k in ("hf", "store", "store_int8", "gguf_bf16", "gguf_q8",
                                                                  "max_memory", "cgroup_limit")):
            setattr(a, k, v)
    a.dtype = a.dtype or "bfloat16"
    a.levels = [int(x) for x in str(a.clients).split(",") if x.strip()]
    a.baseline_levels = [int(x) for x in str(a.baseline_clients).split(",") if x.strip()]
    if 1 not in a.levels:
        raise SystemExit("--clients must include 1 (the scaling figures are against one client)")
    if a.target_clients not in a.levels:
        a.target_clients = max(a.levels)
    a.max_seq_len = a.max_seq_len or a.prompt_len + a.new_tokens
    if a.llama_ctx < a.prompt_len + a.new_tokens:
        a.llama_ctx = a.prompt_len + a.new_tokens
    a.llama_server = a.llama_server or default_llama_server()
    a.threads = a.threads or os.cpu_count()
    if a.drop_caches is None:
        a.drop_caches = a.mode == "streamed" and not a.smoke


SMOKE_DEFAULTS = dict(clients="1,2", baseline_clients="1,2", prompt_len=8, new_tokens=4, warmup_tokens=2,
                      max_batch_size=2, repeats=1, threads=1, load_timeout=120, request_timeout=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=tuple(SIDES), default="ram", help="streamed: GPT-J-6B's shape bigger than memory "
                   "against the accelerate baseline; ram: the 1.1B Llama in memory against llama-server")
    p.add_argument("--sides", default=None, help="comma list (streamed: overspill-hf, overspill-store, "
                   "overspill-store-int8, accelerate; ram: overspill, overspill-int8, llama-bf16, llama-q8_0); "
                   "default all of the mode's")
    p.add_argument("--clients", default="1,4,16,32", help="concurrent clients per level (must include 1)")
    p.add_argument("--baseline-clients", default="1,2", help="levels of the accelerate baseline (it serves one "
                   "request at a time)")
    p.add_argument("--target-clients", type=int, default=16, help="the level the targets are read at")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt token ids (streamed 32, ram 100)")
    p.add_argument("--new-tokens", type=int, default=None, help="max_tokens of every request (streamed 16, ram 64)")
    p.add_argument("--warmup-tokens", type=int, default=2, help="max_tokens of the one warm-up request")
    p.add_argument("--hf", default=None, help="Hugging Face checkpoint dir (streamed: bench-cache/gptj-6b-bfloat16, "
                   "ram: bench-cache/tinyllama-bfloat16)")
    p.add_argument("--store", default=None, help="bf16 layer store of --hf (overspill convert; streamed default "
                   "bench-cache/gptj-6b-bfloat16-store)")
    p.add_argument("--store-int8", default=None, help="int8 layer store of --hf (overspill convert --quantize int8; "
                   "streamed default bench-cache/gptj-6b-bfloat16-int8-store)")
    p.add_argument("--gguf-bf16", default=None, help="ram: BF16 GGUF of --hf (default bench-cache/gguf/tinyllama-bf16.gguf)")
    p.add_argument("--gguf-q8", default=None, help="ram: its Q8_0 (default bench-cache/gguf/tinyllama-q8_0.gguf)")
    p.add_argument("--llama-server", default=None, help="the llama-server executable (default "
                   "bench-cache/llama.cpp-build/bin/llama-server, else on PATH)")
    p.add_argument("--llama-ctx", type=int, default=256, help="llama-server context per slot (-c = this x "
                   "--max-batch-size)")
    p.add_argument("--max-memory", default=None, help="overspill serve --max-memory, and the baseline's (streamed "
                   "default cpu=4GiB; ram: none, loaded whole)")
    p.add_argument("--cgroup-limit", default=None, help="streamed: each server's memory cgroup (default 6GiB)")
    p.add_argument("--max-batch-size", type=int, default=16, help="overspill serve --max-batch-size and "
                   "llama-server -np")
    p.add_argument("--max-seq-len", type=int, default=None, help="overspill serve --max-seq-len (default prompt + "
                   "new tokens)")
    p.add_argument("--max-queue", type=int, default=64, help="overspill serve --max-queue")
    p.add_argument("--dtype", default=None, help="overspill's and the baseline's dtype for HF dirs (default "
                   "bfloat16; a store keeps its own)")
    p.add_argument("--threads", type=int, default=None, help="llama-server -t and the baseline's torch threads "
                   "(default: all cores; overspill serve uses torch's default, all cores)")
    p.add_argument("--offload-dir", default=None, help="where the baseline's temporary offload_folder goes")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false", default=None,
                   help="streamed: do not drop the page cache before each side (plumbing checks only)")
    p.add_argument("--read-probe-bytes", type=int, default=2 << 30, help="streamed: bytes of the disk probe")
    p.add_argument("--load-timeout", type=float, default=3600, help="seconds a server may take to answer /health")
    p.add_argument("--request-timeout", type=float, default=7200, help="seconds without a byte before a request "
                   "is given up")
    p.add_argument("--allow-missing", action="store_true", help="run the sides that can run when others cannot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--views", default=None, help="where the tokenizer views go (default bench-cache/serve-views)")
    p.add_argument("--logs", default=None, help="server logs (default: serve-logs/ beside --out)")
    p.add_argument("--out", default=None, help=f"JSONL file the raw rows are appended to (default {DEFAULT_OUT})")
    p.add_argument("--smoke", action="store_true", help="check the whole path in seconds: a tiny random Llama, both "
                   "modes, every side that can run, clients 1,2 (measures nothing)")
    p.add_argument("--keep", action="store_true", help="--smoke: keep the temp dir")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**SMOKE_DEFAULTS)
    a = p.parse_args(argv)
    if a.smoke:
        return smoke(a)
    fill_defaults(a)
    a.out = a.out or str(DEFAULT_OUT)
    if a.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (inter-token latency needs two tokens)")
    driver(a)


if __name__ == "__main__":
    main()
