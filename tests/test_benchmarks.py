"""Every script in benchmarks/ runs from a fresh clone as benchmarks/README.md says.

Each script's `--smoke` (tiny random checkpoints made on the fly in a temp dir, a few tokens, seconds) runs as a
subprocess, `sys.executable benchmarks/X.py --smoke ...`, from a temporary working directory where bench-cache/
does not exist; results go to `bench-cache/results/*.jsonl` relative to it, the README's default path, so a script
that does not create that directory fails here. The runs overlap, PARALLEL at a time (they are mostly interpreter
start-up and imports), and each test waits for its own.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
TIMEOUT_S = 600
PARALLEL = int(os.environ.get("SMOKE_PARALLEL", 2))   # runs at a time (2 cores: mostly start-up and imports)

# script -> (extra arguments, python modules without which the script cannot run at all); slowest first
SMOKES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "bench_offload": (["--out", "bench-cache/results/offload.jsonl"], ("transformers",)),
    "bench_serve": (["--out", "bench-cache/results/serve.jsonl"], ("transformers", "httpx", "fastapi", "uvicorn")),
    "bench_flagship": (["--out", "bench-cache/results/flagship.jsonl"], ("transformers",)),
    "bench_decode": (["--out", "bench-cache/results/decode.jsonl"], ("transformers",)),
    "bench_llamacpp": (["--out", "bench-cache/results/llamacpp.jsonl"], ("transformers",)),
    "make_checkpoint": ([], ("transformers",)),
    "bench_train_pass": ([], ("transformers",)),
    "quality": ([], ()),
    "bench_linear": ([], ()),
    "llamacpp_gguf": ([], ("transformers", "gguf")),
}


def missing(name: str) -> list[str]:
    return [m for m in SMOKES[name][1] if importlib.util.find_spec(m) is None]


class SmokeRun:
    """One script's smoke run in its own fresh working directory, started when a slot is free."""

    def __init__(self, name: str, cwd: Path):
        self.name, self.cwd = name, cwd
        self.proc: subprocess.Popen | None = None
        self.started = threading.Event()
        self.log = open(cwd / "output.txt", "w+")

    def start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        env.pop("XDG_CACHE_HOME", None)
        self.proc = subprocess.Popen([sys.executable, str(BENCH / f"{self.name}.py"), "--smoke", *SMOKES[self.name][0]],
                                     cwd=self.cwd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.started.set()


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    """Starts the smoke run of every script this session's tests ask for, PARALLEL at a time, slowest first;
    yields name -> SmokeRun."""
    wanted = {item.callspec.params["name"] for item in request.session.items
              if item.module is request.module and "name" in getattr(getattr(item, "callspec", None), "params", {})}
    runs = {}
    for name in sorted(wanted, key=list(SMOKES).index):
        if not missing(name):
            cwd = tmp_path_factory.mktemp(f"fresh-{name}")
            assert not (cwd / "bench-cache").exists()
            runs[name] = SmokeRun(name, cwd)
    stop = threading.Event()

    def scheduler() -> None:
        pending = list(runs.values())
        while pending and not stop.is_set():
            if sum(r.proc is not None and r.proc.poll() is None for r in runs.values()) < PARALLEL:
                pending.pop(0).start()
            else:
                time.sleep(0.05)

    thread = threading.Thread(target=scheduler, daemon=True)
    thread.start()
    yield runs
    stop.set()
    thread.join()
    for run in runs.values():
        if run.proc is not None and run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        run.log.close()


def finish(runs: dict, name: str) -> tuple[str, Path]:
    """Wait for one smoke run; assert it exited 0; return its output and working directory."""
    if missing(name):
        pytest.skip(f"{name}.py --smoke needs {', '.join(missing(name))}, not installed")
    run = runs[name]
    assert run.started.wait(TIMEOUT_S), f"{name}.py --smoke never started"
    try:
        rc = run.proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        rc = run.proc.wait()
    run.log.seek(0)
    out = run.log.read()
    assert rc == 0, f"{name}.py --smoke exited {rc}:\n{out[-4000:]}"
    return out, run.cwd


def results(cwd: Path, name: str) -> list[dict]:
    path = cwd / "bench-cache" / "results" / name
    assert path.exists(), f"no {path}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table_row(out: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row whose first cell is `first_cell`."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{out[-3000:]}")


def test_append_jsonl_creates_the_results_directory(tmp_path):
    """A fresh clone has no bench-cache/results/: the first row written must create it."""
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    path = tmp_path / "bench-cache" / "results" / "x.jsonl"
    common.append_jsonl(path, {"kind": "run", "n": 1})
    common.append_jsonl(path, {"kind": "summary"})
    assert [json.loads(line)["kind"] for line in path.read_text().splitlines()] == ["run", "summary"]


@pytest.mark.parametrize("name", ["make_checkpoint"])
def test_make_checkpoint_smoke(smoke_runs, name):
    out, _ = finish(smoke_runs, name)
    for preset in ("gpt2-tiny", "gptj-tiny", "llama-tiny", "neox-tiny"):
        assert f"smoke: {preset}: " in out and "MISMATCH" not in out, out


@pytest.mark.parametrize("name", ["bench_decode"])
def test_bench_decode_smoke(smoke_runs, name):
    out, cwd = finish(smoke_runs, name)
    rows = results(cwd, "decode.jsonl")
    runs = [r for r in rows if r["kind"] == "run"]
    assert {r["side"] for r in runs} == {"hf", "overspill"} and all(r["ok"] for r in runs), runs
    assert all(r["decode_tok_s"] > 0 for r in runs)
    assert [r["kind"] for r in rows].count("summary") == 1
    for side in ("hf", "overspill"):
        cells = table_row(out, side)
        assert cells[2] == "1/1" and float(cells[4]) > 0, cells   # ok runs, decode tok/s/seq
    assert "overspill/hf decode tok/s:" in out


@pytest.mark.parametrize("name", ["bench_llamacpp"])
def test_bench_llamacpp_smoke(smoke_runs, name):
    """Without llama-bench (or gguf) the llama.cpp side is skipped with one line; overspill's side runs."""
    out, cwd = finish(smoke_runs, name)
    runs = results(cwd, "llamacpp.jsonl")
    assert any(r["side"] == "overspill" and r["scheme"] == "int8+head" and r["decode_tok_s"] > 0 for r in runs), runs
    cells = table_row(out, "int8+head")
    assert float(cells[2]) > 0, cells                               # overspill decode tok/s
    if not any(r["side"] == "llama.cpp" for r in runs):
        assert "llama.cpp side skipped:" in out, out


@pytest.mark.parametrize("name", ["bench_offload"])
def test_bench_offload_smoke(smoke_runs, name):
    """Under a budget below the model's size both overspill sides stream, and every side's run succeeds."""
    out, cwd = finish(smoke_runs, name)
    rows = results(cwd, "offload.jsonl")
    runs = {r["side"]: r for r in rows if r["kind"] == "run"}
    expected = {"overspill-hf", "overspill-store"} | ({"accelerate"} if importlib.util.find_spec("accelerate") else set())
    assert set(runs) == expected and all(r["ok"] for r in runs.values()), rows
    for side in ("overspill-hf", "overspill-store"):
        assert runs[side]["plan"]["streamed_units"] > 0, runs[side]["plan"]
        assert runs[side]["step_s_median"] > 0 and table_row(out, side)[2] == "1/1"
    assert [r["kind"] for r in rows].count("summary") == 1


@pytest.mark.parametrize("name", ["bench_serve"])
def test_bench_serve_smoke(smoke_runs, name):
    """Every server that can run here serves a tiny random Llama to 1 and 2 concurrent streaming clients: each request
    streams exactly the tokens asked for, with TTFT, ITL and aggregate figures; the streamed mode under a budget below
    the model's size. llama-server's side is skipped with one line where it is absent."""
    out, cwd = finish(smoke_runs, name)
    rows = results(cwd, "serve.jsonl")
    runs = [r for r in rows if r["kind"] == "run"]
    assert runs and all(r["ok"] for r in runs), [r for r in runs if not r["ok"]]
    expected = {"overspill-hf", "overspill-store", "overspill-store-int8", "overspill", "overspill-int8"} | \
        ({"accelerate"} if importlib.util.find_spec("accelerate") else set())
    assert expected <= {r["side"] for r in runs}, {r["side"] for r in runs}
    for r in runs:
        assert r["clients"] in (1, 2) and r["tokens_per_request"] == [4] * r["clients"] and r["exact"], r
        assert r["agg_tok_s"] > 0 and r["ttft_p50_s"] > 0 and r["itl_p50_s"] > 0 and r["load_s"] > 0, r
        assert r["chunks_per_request"] == [4] * r["clients"], r        # one content chunk per token
        if r["side"].startswith("overspill"):                         # the engine's steps, from /metrics
            assert r["engine_steps"] > 0 and 1 <= r["engine_batch_mean"] <= r["clients"], r
    assert {(r["side"], r["clients"]) for r in runs} >= {(s, n) for s in expected for n in (1, 2)}
    for side in expected:
        assert table_row(out, side)[3] == "1/1", table_row(out, side)   # ok runs
    assert "overspill-hf: aggregate at 2 clients / at 1 client:" in out
    if not any(r["side"].startswith("llama") for r in runs):
        assert "llama.cpp side skipped:" in out, out
    assert [r["kind"] for r in rows].count("summary") == 2            # streamed and ram


@pytest.mark.parametrize("name", ["bench_flagship"])
def test_bench_flagship_smoke(smoke_runs, name):
    """A tiny GPT-NeoX: both conversions, both stores (cold load, batch 1, batch 8), bf16 under a budget below its
    size (streaming) and accelerate, each run once and every one succeeding; the three tables and both targets."""
    out, cwd = finish(smoke_runs, name)
    rows = results(cwd, "flagship.jsonl")
    runs = [r for r in rows if r["kind"] == "run"]
    assert all(r["ok"] for r in runs), runs
    got = {(r["side"], r.get("scheme")) for r in runs if r["side"] in ("convert", "store-int8", "store-int4")}
    assert got == {("convert", "int8"), ("convert", "int4"), ("store-int8", "int8"), ("store-int4", "int4")}, got
    sides = {r["side"]: r for r in runs}
    expected = {"convert", "store-int8", "store-int4", "bf16"} | \
        ({"accelerate"} if importlib.util.find_spec("accelerate") else set())
    assert set(sides) == expected, set(sides)
    for r in runs:
        if r["side"] == "convert":
            assert r["store_bytes"] > 0 and r["write_bound_s"] > 0 and r["peak_rss_bytes"] > 0, r
        elif r["side"].startswith("store-"):
            assert r["first_token_from_load_s"] >= r["load_s"] > 0 and r["step_s_median"] > 0 and r["bound_s"] > 0
            assert r["agg_tok_s"] > 0 and r["compute_bound_tok_s"] > 0 and r["batch"] == 8, r
        else:
            assert r["first_token_from_load_s"] >= r["load_s"] > 0 and r["step_s_median"] > 0, r
            assert r["ckpt_read_s"] > 0 and r["first_token_target_s"] == pytest.approx(1.1 * r["ckpt_read_s"])
    assert sides["bf16"]["plan"]["streamed_units"] > 0, sides["bf16"]["plan"]   # the budget is below the model's size
    for scheme in ("int8", "int4"):
        assert float(table_row(out, scheme)[2]) > 0           # the convert table: seconds
    cells = table_row(out, "bf16")
    assert cells[2] == "1/1" and float(cells[7]) > 0, cells   # ok runs, s/token
    assert "bf16 first token from start of load / one read of the checkpoint:" in out
    if "accelerate" in sides:
        assert "overspill / accelerate s/token (same-round ratios, median):" in out
    assert [r["kind"] for r in rows].count("summary") == 1


@pytest.mark.parametrize("name", ["bench_linear"])
def test_bench_linear_smoke(smoke_runs, name):
    out, _ = finish(smoke_runs, name)
    for batch in (1, 2):
        assert f"== W[128x256] batch {batch} x bfloat16" in out, out
    timed = {line.split("  ")[1].strip() for line in out.splitlines() if line.startswith("  ") and "GB/s" in line}
    assert {"bf16 F.linear", "int8", "int8-dynamic", "int4", "nf4"} <= timed, timed


@pytest.mark.parametrize("name", ["bench_train_pass"])
def test_bench_train_pass_smoke(smoke_runs, name):
    """Two timed training passes on a tiny int8 store with some blocks streamed: a line of figures each, then the
    layout with streamed blocks in it and the medians."""
    out, _ = finish(smoke_runs, name)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{"pass_s"')]
    assert len(rows) == 2 and all(r["pass_s"] > 0 and r["reader_busy_s"] > 0 for r in rows), out
    layout = next(line.split()[1] for line in out.splitlines() if line.startswith("layout "))
    assert "s" in layout[1:-1], layout


@pytest.mark.parametrize("name", ["quality"])
def test_quality_smoke(smoke_runs, name):
    out, _ = finish(smoke_runs, name)
    for label in ("float32", "int8", "int8 + head", "int8-dynamic", "int4", "int4 + head", "nf4", "float32, KV int8"):
        cells = table_row(out, label)
        assert float(cells[3]) > 1, cells                           # a perplexity


@pytest.mark.parametrize("name", ["llamacpp_gguf"])
def test_llamacpp_gguf_smoke(smoke_runs, name):
    out, _ = finish(smoke_runs, name)
    assert "in the checkpoint" in out and "FAILED" not in out, out


SMOKES["bench_finetune"] = (["--out", "bench-cache/results/finetune.jsonl"], ("transformers",))


@pytest.mark.parametrize("name", ["bench_finetune"])
def test_bench_finetune_smoke(smoke_runs, name):
    """A tiny random GPT-J: every ram configuration trains one warm-up and one timed step on the same batches (the
    first-step loss, the base's, agrees with PEFT's); both layer stores train streamed under a budget below their
    size, reading each streamed block twice per step (forward, then backward); accelerate + PEFT reports an outcome;
    the tables and the three ram targets are printed."""
    out, cwd = finish(smoke_runs, name)
    rows = results(cwd, "finetune.jsonl")
    runs = [r for r in rows if r["kind"] == "run"]
    assert all(r["ok"] for r in runs), [r for r in runs if not r["ok"]]
    ram = {r["side"]: r for r in runs if r["part"] == "ram"}
    expected = {"overspill", "overspill-int8", "overspill-int8-blocks", "overspill-int4", "overspill-no-ckpt"} | \
        ({"peft"} if importlib.util.find_spec("peft") else set())
    assert set(ram) == expected, set(ram)
    for r in ram.values():
        assert len(r["steps_s"]) == 2 and r["step_s_median"] > 0 and r["tokens_per_s"] > 0, r
        assert r["peak_rss_bytes"] > 0 and r["lora_params"] == ram["overspill"]["lora_params"], r
        assert table_row(out, r["side"])[3] == "1/1", table_row(out, r["side"])
    if "peft" in ram:
        assert abs(ram["peft"]["first_loss"] - ram["overspill"]["first_loss"]) < 1e-3, ram
    for label in ("int8 peak RSS / ", "int8 tokens/s / ", "tokens/s / PEFT tokens/s:"):
        assert label in out, out
    streamed = {r["side"]: r for r in runs if r["part"] == "streamed"}
    for side in ("store", "store-int8"):
        r = streamed[side]
        assert r["plan"]["streamed_units"] > 0 and r["step_s_median"] > 0 and r["bound_s"] > 0, r
        # two reads of each streamed unit per step (counted in units: a pass's byte window shifts with read-ahead)
        assert r["source_stats"]["units_read"] >= 2 * r["plan"]["streamed_units"] * len(r["passes"]), r
        assert table_row(out, side)[2] == "1/1", table_row(out, side)
    if importlib.util.find_spec("accelerate") and importlib.util.find_spec("peft"):
        assert streamed["accelerate"]["outcome"] in ("ok", "refused", "failed", "OOM", "timed out"), streamed
        assert "accelerate + PEFT (" in out
    assert [r["kind"] for r in rows].count("summary") == 2            # ram and streamed


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_bench_gpu_runs_on_the_cpu(tmp_path):
    """bench_gpu.py's decode part end to end with --device cpu on a tiny GPT-J (~20 s): GPU-only figures say
    "skipped (no CUDA)", every overspill side runs (the streamed one streams part of the model from disk) and the
    JSON file holds the figures."""
    out = tmp_path / "bg.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    p = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--device", "cpu", "--preset", "gptj-tiny",
                        "--parts", "bw,decode", "--work", str(tmp_path / "work"), "--json", str(out)],
                       capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "bw: skipped (no CUDA)" in p.stdout and "PART decode: done" in p.stdout, p.stdout[-3000:]
    d = json.loads(out.read_text())["parts"]["decode"]
    for name in ("overspill_resident", "overspill_streamed", "transformers"):
        assert d[name]["1"]["tok_s"] > 0 and d[name]["8"]["tok_s"] > 0, (name, d[name])
    assert d["overspill_streamed"]["streamed_units"] > 0, d["overspill_streamed"]


SMOKES["bench_parallel"] = ([], ())


@pytest.mark.parametrize("name", ["bench_parallel"])
def test_bench_parallel_smoke(smoke_runs, name):
    """A tiny random GPT-J (4 blocks): one process, --tp 2 and --pp 2 as separate rank processes at batch 1 and 2,
    and the pp2 / single pair of the 6B part; every run finishes, the tensor-parallel ranks report one all-reduce
    per block per step (GPT-J's parallel residual), and every rank's idle share is printed."""
    out, _ = finish(smoke_runs, name)
    assert "smoke: 9 of 9 runs ok" in out, out
    assert "(4 per step)" in out and out.count("idle share per rank") == 5, out
    assert "pp2 faster than single by" in out
