"""Pipeline parallel (overspill/parallel) gives what one process gives.

In process: the pure split and budget syntax, and every variant run as two stages handing hidden states over a
plain Python link (the executor's unit ranges and the stage caches, no torch.distributed). Across processes (gloo on
loopback; ranks started like torchrun: RANK, WORLD_SIZE, MASTER_ADDR/PORT, or by torchrun itself): every variant's
float32 logits and greedy tokens against the single-process run, beams and seeded sampling, bf16, a rank streaming
its range from disk under its own budget, errors on one stage, and the failures that must end every rank with one
line: a killed rank, a stopped rank, mismatched checkpoints, a wrong world size, two torchrun launchers (--nnodes 2).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import overspill
from conftest import VARIANTS
from overspill.errors import OverspillError
from overspill.parallel import rank_budgets, split_units
from overspill.parallel.pipeline import stage_cache
from overspill.runtime.loader import Reserve, build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "overspill", "data", "shakespeare")
IDS = [[1, 5, 9, 17, 33, 4, 8, 60], [2, 7, 7, 40, 41, 42, 3, 11]]
PROMPTS = [[1, 5, 9], [3, 4, 5, 6, 7]]


# -- pure --------------------------------------------------------------------------------------------------------------

def test_split_units_balances_bytes_with_embed_first_and_head_last():
    assert split_units([10, 5, 5, 5, 5, 10], 2) == [(0, 3), (3, 6)]
    assert split_units([100, 5, 5, 5, 5, 0], 2) == [(0, 2), (2, 6)]     # a big table: rank 0 runs one block
    assert split_units([0, 5, 5, 5, 5, 100], 2) == [(0, 4), (4, 6)]     # a big head: the last rank runs one
    r = split_units([1] * 10, 3)
    assert r[0][0] == 0 and r[-1][1] == 10 and all(a[1] == b[0] for a, b in zip(r, r[1:]))
    assert all(e - f >= 1 for f, e in r)
    with pytest.raises(OverspillError, match="2 block"):
        split_units([1, 1, 1, 1], 3)


def test_rank_budgets_syntax():
    assert rank_budgets("cpu=4GiB", 2) == ["cpu=4GiB", "cpu=4GiB"]
    assert rank_budgets("cpu=5GiB;cpu=4GiB", 2) == ["cpu=5GiB", "cpu=4GiB"]
    assert rank_budgets(" ;cpu=4GiB", 2) == [None, "cpu=4GiB"]
    assert rank_budgets(None, 3) == [None] * 3
    assert rank_budgets(["cpu=1GiB", {"cpu": 5}], 2) == ["cpu=1GiB", {"cpu": 5}]
    with pytest.raises(OverspillError, match="3 per-rank budgets for 2"):
        rank_budgets("cpu=1GiB;cpu=1GiB;cpu=1GiB", 2)
    with pytest.raises(OverspillError, match="per rank"):
        overspill.load(SHAKESPEARE, max_memory="cpu=1GiB;cpu=1GiB")


def test_pp_outside_a_launcher_and_wrong_world_size(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(OverspillError, match="torchrun --nproc-per-node 2"):
        overspill.load(SHAKESPEARE, pp=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(OverspillError, match=r"^rank 0: --pp 2 needs 2 processes but the launcher started 3"):
        overspill.load(SHAKESPEARE, pp=2)


# -- two stages in one process -----------------------------------------------------------------------------------------

class _Pipe:
    """The StageLink of one stage in this process: what the stage before sent, and what this one sends."""

    def __init__(self, first: int, end: int):
        self.first, self.end, self.inbox, self.sent = first, end, None, None

    def receive(self, shape, dtype, device):
        assert tuple(self.inbox.shape) == tuple(shape) and self.inbox.dtype == dtype
        return self.inbox

    def send(self, x):
        self.sent = x


def _stages(path, cut, budget=None):
    n = None
    out = []
    for first, end in cut:
        ex = build(path, "float32", None, budget, Reserve(2, 64), unit_range=(first, end)).executor
        ex.link = _Pipe(first, end)
        n = ex.cfg.n_layers + 2
        out.append(ex)
    assert cut[0][0] == 0 and cut[-1][1] == n
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stages_in_one_process_equal_the_whole_model(ref_dir, variant):
    """Each stage loads only its units and caches only its blocks; chained, they give the whole model's logits."""
    path, _ = ref_dir(variant)
    whole = build(path, "float32", None, None, Reserve(2, 64)).executor
    a, b = _stages(path, [(0, 2), (2, 4)])
    assert a.source.weights[2] is None and a.source.weights[3] is None and b.source.weights[0] is None
    ids = torch.tensor(IDS)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    ref = whole.forward(ids, pos, whole.new_cache(2, 16))
    ca, cb = stage_cache(a, a.link, 2, 16), stage_cache(b, b.link, 2, 16)
    assert ca.k[1] is None and cb.k[0] is None
    assert a.forward(ids, pos, ca) is None
    b.link.inbox = a.link.sent
    torch.testing.assert_close(b.forward(ids, pos, cb), ref, rtol=0, atol=0)
    # a ragged decode step over both rows, after the prompts
    cache = whole.new_cache(2, 16)
    whole.forward(ids, pos, cache)
    segs = [(0, 8, [5]), (1, 8, [6])]
    want, got = {}, {}
    whole.forward_ragged(segs, cache, [0, 1], lambda r0, r1, lg: want.update({r0: lg.clone()}))
    assert a.forward_ragged(segs, ca, [0, 1], None)
    b.link.inbox = a.link.sent
    assert b.forward_ragged(segs, cb, [0, 1], lambda r0, r1, lg: got.update({r0: lg.clone()}))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- processes ---------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int, **extra) -> dict:
    env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
    for k in ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"):
        env.pop(k, None)
    return env


def _launch(argv_by_rank: list[list[str]], tmp_path, **extra) -> list[subprocess.Popen]:
    """One process per rank, as torchrun would start them (without its agent): logs in tmp_path/rankN.log."""
    port = _free_port()
    procs = []
    for r, argv in enumerate(argv_by_rank):
        log = open(tmp_path / f"rank{r}.log", "w")
        procs.append(subprocess.Popen([sys.executable, *argv], env=_env(r, len(argv_by_rank), port, **extra),
                                      stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def _wait(procs, timeout=90) -> list[int]:
    end = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.1, end - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _log(tmp_path, r) -> str:
    return (tmp_path / f"rank{r}.log").read_text()


def _error_lines(text: str) -> list[str]:
    """The CLI's error lines (stdout shares the log: a line may follow a token on the same line)."""
    return re.findall(r"overspill: error: .*", text)


RANK_SCRIPT = r'''
import json, os, sys, torch
import overspill
from overspill.errors import OverspillError
spec = json.load(open(sys.argv[1]))
rank = int(os.environ["RANK"])
IDS, PROMPTS = spec["ids"], spec["prompts"]
results = {}
for run in spec["runs"]:
    if run.get("inject") and rank == 1:     # this stage fails its n-th ragged pass (a micro-batch's) once
        from overspill.runtime.executor import Executor
        real, calls = Executor.forward_ragged, []
        def once(self, *a, **k):
            calls.append(1)
            if len(calls) < run.get("inject_at", 1):
                return real(self, *a, **k)
            Executor.forward_ragged = real
            raise RuntimeError("injected failure")
        Executor.forward_ragged = once
    m = overspill.load(run["path"], dtype=run["dtype"], max_memory=run.get("max_memory"), pp=2, max_seq_len=64,
                       max_batch_size=2)
    if m is None:
        continue
    r = {}
    if run.get("inject"):
        try:
            m.generate(PROMPTS, max_new_tokens=4, ignore_eos=True)
        except OverspillError as e:
            r["error"] = str(e)
    r["logits"] = m.logits(torch.tensor(IDS))
    r["greedy"] = m.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    if run.get("more"):
        r["beams"] = m.generate([PROMPTS[0]], max_new_tokens=5, num_beams=3, ignore_eos=True)
        r["sampled"] = m.generate(PROMPTS, max_new_tokens=6, temperature=0.9, top_k=20, seed=7, ignore_eos=True)
        r["logprobs"] = m.logprobs(torch.tensor(IDS))
        cache = m.executor.new_cache(1, 8)
        r["aborted"] = m.executor.forward_ragged([(0, 0, [1, 2, 3])], cache, [2], lambda *a: None, abort=lambda: True)
    r["stages"] = m.executor.stages
    r["micro"] = m.executor.micro_batches
    results[run["name"]] = r
    m.close()
if rank == 0:
    torch.save(results, spec["out"])
'''


def _single(path, dtype, more=False):
    m = overspill.load(path, dtype=dtype, max_seq_len=64, max_batch_size=2)
    r = {"logits": m.logits(torch.tensor(IDS)), "greedy": m.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)}
    if more:
        r["beams"] = m.generate([PROMPTS[0]], max_new_tokens=5, num_beams=3, ignore_eos=True)
        r["sampled"] = m.generate(PROMPTS, max_new_tokens=6, temperature=0.9, top_k=20, seed=7, ignore_eos=True)
        r["logprobs"] = m.logprobs(torch.tensor(IDS))
    m.close()
    return r


def _rank1_min_budget(path, dtype="float32") -> int:
    """The least budget rank 1 of two can run its range in (from the planner's refusal): it streams from disk."""
    from overspill.parallel import _stage_bytes
    from overspill.placement import PlanError
    from overspill.runtime.loader import make_plan, open_source

    src = open_source(path, dtype, None)
    reserve = Reserve(2, 64)
    first_end = split_units(_stage_bytes(src, reserve, False), 2)[1]
    with pytest.raises(PlanError) as e:
        make_plan(src.ckpt, src.ckpt.config, src.dtype, None, {"cpu": 1}, reserve, unit_range=first_end)
    return e.value.min_bytes


def test_plan_shows_each_ranks_range_and_plan(ref_dir, capsys):
    deep = ref_dir("llama_gqa", layers=12)[0]
    out = _cli(capsys, ["plan", deep, "--pp", "2", "--max-memory", f"cpu=1GiB;cpu={_rank1_min_budget(deep)}",
                        "--max-seq-len", "64", "--max-batch-size", "2", "--dtype", "float32", "--json"])
    ranks = json.loads(out)
    assert [r["units"][0] for r in ranks] == [0, ranks[0]["units"][1]] and ranks[1]["units"][1] == 14
    assert [p["unit"] for p in ranks[1]["plan"]["placements"]][-1] == "head"
    assert {p["tier"] for p in ranks[0]["plan"]["placements"]} == {"resident"}
    assert "stream" in {p["tier"] for p in ranks[1]["plan"]["placements"]}


def test_pipeline_of_two_processes_equals_one_process(ref_dir, tmp_path):
    """One launch, two ranks, one model after another: every variant's float32 logits and greedy tokens equal the
    single process's; beams, seeded sampling and log-probs on two; bf16; rank 1 streaming its blocks from disk under
    its own budget (from a Hugging Face directory, and from an int8 layer store with a tied head); a failure in rank
    1's stage reported on rank 0 as one line, after which the pipeline runs on."""
    runs = [{"name": v, "path": ref_dir(v)[0], "dtype": "float32", "more": v in ("llama_gqa", "gpt2")}
            for v in VARIANTS]
    runs.append({"name": "bf16", "path": ref_dir("gpt_neox_parallel")[0], "dtype": "bfloat16"})
    deep = ref_dir("llama_gqa", layers=12)[0]
    runs.append({"name": "streamed", "path": deep, "dtype": "float32", "max_memory": f";cpu={_rank1_min_budget(deep)}"})
    from overspill.checkpoint.store import convert
    store = convert(ref_dir("llama_tied", layers=12)[0], str(tmp_path / "store"), quantize="int8")
    runs.append({"name": "store", "path": store, "dtype": "auto",
                 "max_memory": f";cpu={_rank1_min_budget(store, 'auto')}"})
    runs.append({"name": "inject", "path": ref_dir("gptj")[0], "dtype": "float32", "inject": True})
    runs.append({"name": "inject2", "path": ref_dir("gptj")[0], "dtype": "float32", "inject": True, "inject_at": 2})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"runs": runs, "ids": IDS, "prompts": PROMPTS, "out": str(tmp_path / "out.pt")}))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    procs = _launch([[str(script), str(spec)]] * 2, tmp_path)
    assert _wait(procs) == [0, 0], _log(tmp_path, 0)[-3000:] + _log(tmp_path, 1)[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for run in runs:
        r = got[run["name"]]
        want = _single(run["path"], run["dtype"], run.get("more", False))
        tol = 1e-5 if run["dtype"] == "float32" else 0.05
        torch.testing.assert_close(r["logits"], want["logits"], rtol=0, atol=tol, msg=run["name"])
        assert r["greedy"] == want["greedy"], run["name"]
        for k in ("beams", "sampled"):
            if k in want:
                assert r[k] == want[k], (run["name"], k)
        if "logprobs" in want:
            torch.testing.assert_close(r["logprobs"], want["logprobs"], rtol=0, atol=1e-5)
            assert r["aborted"] is False
        ranges = [s["units"] for s in r["stages"]]
        assert ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] > ranges[1][0]
    for name in ("streamed", "store"):   # rank 1 streams (a tied head: its own copy of the table, on rank 1)
        tiers = [p["tier"] for p in json.loads(got[name]["stages"][1]["plan"])["placements"]]
        assert "stream" in tiers and got[name]["stages"][0]["plan"] is None
    assert got["inject"]["error"].startswith("rank 1: RuntimeError: injected failure")
    # micro-batches: the two prompts flow as two groups where no rank streams; a failure in the second group (the
    # first already went on to the head) is reported the same way and the pipeline stays in step
    assert got["inject2"]["error"].startswith("rank 1: RuntimeError: injected failure")
    assert {r["micro"] for name, r in got.items() if name not in ("streamed", "store")} == {2}
    assert got["streamed"]["micro"] == got["store"]["micro"] == 1


def test_bad_micro_batch_setting_is_one_line(monkeypatch):
    for bad in ("two", "0", "-1"):
        monkeypatch.setenv("OVERSPILL_PP_MICRO_BATCHES", bad)
        with pytest.raises(OverspillError, match=r"^OVERSPILL_PP_MICRO_BATCHES must be a whole number >= 1"):
            overspill.load(SHAKESPEARE, pp=2)


def test_micro_batches_split_whole_sequences_by_tokens():
    from overspill.parallel.pipeline import micro_batches
    segs = [(r, 0, [7] * n) for r, n in enumerate([1, 1, 5, 1])]
    got = micro_batches(segs, [0, 1, 6, 7], 2)
    assert [[s[0] for s in g] for g, _, _ in got] == [[0, 1], [2, 3]]
    assert [(rows, first) for _, rows, first in got] == [([0, 1], 0), ([4, 5], 2)]   # rows renumbered per group
    assert [[s[0] for s in g] for g, _, _ in micro_batches(segs, [6], 3)] == [[0, 1], [2], [3]]
    assert [(rows, first) for _, rows, first in micro_batches(segs, [6], 3)] == [([], 0), ([4], 0), ([], 1)]
    assert micro_batches(segs, [0], 1) == [(segs, [0], 0)] and len(micro_batches(segs[:1], [0], 4)) == 1


def _torchrun(args: list[str], nproc: int = 2, **extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, **extra}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--master-port", str(_free_port()), "-m", "overspill.cli", *args],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def _cli(capsys, args: list[str]) -> str:
    """What the single-process CLI prints."""
    from overspill.cli import main

    capsys.readouterr()
    assert main(args) == 0
    return capsys.readouterr().out


def test_torchrun_cli_generate_and_eval_match_one_process(capsys):
    """`torchrun --nproc-per-node 2 -m overspill.cli generate PROMPT --pp 2` prints what one process prints, with a
    budget for each rank; eval's perplexity is the same."""
    args = ["generate", "ROMEO:", "-n", "24", "--dtype", "float32", "--seed", "3", "--temperature", "0.8"]
    r = _torchrun(args + ["--pp", "2", "--max-memory", "cpu=1GiB;cpu=512MiB"])
    assert r.returncode == 0, r.stderr[-3000:]
    ev = _torchrun(["eval", "--text", os.path.join(SHAKESPEARE, "heldout.txt"), "--max-chars", "1500", "--context",
                    "96", "--stride", "48", "--json", "--dtype", "float32", "--pp", "2"])
    assert ev.returncode == 0, ev.stderr[-3000:]
    single = _cli(capsys, args)
    assert r.stdout == single and len(single) > 20
    m = overspill.load(SHAKESPEARE, dtype="float32", max_seq_len=96)
    from overspill.evaluate import perplexity
    with open(os.path.join(SHAKESPEARE, "heldout.txt")) as f:
        want = perplexity(m, m.encode(f.read()[:1500]), 96, 48)
    assert abs(json.loads(ev.stdout)["nll"] - want["nll"]) < 1e-5


def test_one_rank_under_torchrun_runs_the_distributed_path(capsys):
    """`torchrun --nproc-per-node 1 ... --tp 1` (or --pp 1) joins a group of one and runs the tensor-parallel
    executor, printing what the plain process prints: the check of a machine's collectives (NCCL on one
    GPU, tests/test_gpu.py). A backend override that does not exist proves the group was joined; without --tp/--pp
    the same launch runs the plain path."""
    args = ["generate", "ROMEO:", "-n", "16", "--dtype", "float32"]
    single = _cli(capsys, args)
    for flag in ("--tp", "--pp"):
        r = _torchrun(args + [flag, "1"], nproc=1)
        assert r.returncode == 0 and r.stdout == single, (flag, r.stderr[-3000:])
        bad = _torchrun(args + [flag, "1"], nproc=1, OVERSPILL_PP_BACKEND="carrier-pigeon")
        assert bad.returncode != 0 and "OVERSPILL_PP_BACKEND must be gloo or nccl" in bad.stderr, bad.stderr[-2000:]
    plain = _torchrun(args, nproc=1, OVERSPILL_PP_BACKEND="carrier-pigeon")
    assert plain.returncode == 0 and plain.stdout == single, plain.stderr[-2000:]


CLI_LONG = ["-m", "overspill.cli", "generate", "ROMEO:", "-n", "480", "--ignore-eos", "--pp", "2"]


@pytest.mark.parametrize("victim,sig", [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)])
def test_a_rank_that_dies_or_stops_ends_the_other_with_one_line(tmp_path, victim, sig):
    """Killed mid-generation: the survivor's channel breaks at once. Stopped (alive, silent): its heartbeat stands
    still and the survivor ends within the timeout (3 s here). Either way one line, exit code 2, no hang."""
    procs = _launch([CLI_LONG + ["--pp-timeout", "3"]] * 2, tmp_path)
    end = time.monotonic() + 60
    while len(_log(tmp_path, 0)) < 40 and time.monotonic() < end and procs[0].poll() is None:
        time.sleep(0.05)                                   # rank 0 is printing tokens: mid-generation
    assert len(_log(tmp_path, 0)) >= 40 and procs[0].poll() is None
    os.kill(procs[victim].pid, sig)
    t0 = time.monotonic()
    other = procs[1 - victim]
    try:
        rc = other.wait(timeout=20)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    took = time.monotonic() - t0
    lines = _error_lines(_log(tmp_path, 1 - victim))
    assert rc == 2 and len(lines) == 1, _log(tmp_path, 1 - victim)[-2000:]
    assert lines[0].startswith(f"overspill: error: rank {1 - victim}: ")
    assert "Traceback" not in _log(tmp_path, 1 - victim)
    if sig == signal.SIGKILL:   # rank 0 also holds the rendezvous store here: whichever the survivor notices first
        assert f"lost rank {victim}" in lines[0] or (victim == 0 and "rendezvous store" in lines[0]), lines
        assert took < 3
    else:
        assert "rank 1 stopped responding (no heartbeat for 3 s)" in lines[0] and took < 8


def test_mismatched_checkpoints_end_every_rank_with_one_line(ref_dir, tmp_path):
    a, b = ref_dir("llama_gqa")[0], ref_dir("llama_tied")[0]
    cli = ["-m", "overspill.cli", "generate", "x", "--pp", "2", "--pp-timeout", "10"]
    procs = _launch([cli + ["--model", a], cli + ["--model", b]], tmp_path)
    assert _wait(procs, 60) == [2, 2]
    for r in (0, 1):
        lines = _error_lines(_log(tmp_path, r))
        assert len(lines) == 1 and "Traceback" not in _log(tmp_path, r), _log(tmp_path, r)
        assert re.match(rf"overspill: error: rank {r}: the ranks disagree on weights: rank {r} has .*digest", lines[0])


def test_wrong_world_size_ends_every_rank_with_one_line(tmp_path):
    procs = _launch([["-m", "overspill.cli", "generate", "x", "--pp", "2"]] * 3, tmp_path)
    assert _wait(procs, 60) == [2, 2, 2]
    for r in range(3):
        assert _error_lines(_log(tmp_path, r)) == [f"overspill: error: rank {r}: --pp 2 needs 2 processes but the "
                                                   f"launcher started 3 (WORLD_SIZE=3); use --nproc-per-node (x "
                                                   f"--nnodes) = 2"]


def test_two_torchrun_launchers_nnodes_2(tmp_path, capsys):
    """Multi-node, on loopback: two torchrun agents (--nnodes 2, c10d rendezvous), one rank each."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    args = ["generate", "ROMEO:", "-n", "16", "--dtype", "float32", "--pp", "2"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(n),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"127.0.0.1:{port}", "--rdzv-id", "overspill-test", "-m", "overspill.cli", *args],
                              stdout=open(tmp_path / f"node{n}.out", "w"), stderr=open(tmp_path / f"node{n}.err", "w"),
                              env=env, cwd=ROOT) for n in (0, 1)]
    rcs = _wait(procs, 120)
    out = [(tmp_path / f"node{n}.out").read_text() for n in (0, 1)]
    assert rcs == [0, 0], (tmp_path / "node0.err").read_text()[-2000:] + (tmp_path / "node1.err").read_text()[-2000:]
    assert _cli(capsys, args[:-2]) in out and "" in out   # the node with rank 0 prints; the other nothing


@pytest.mark.parametrize("flag", ["--pp", "--tp"])
def test_serve_over_two_ranks(tmp_path, flag):
    """`torchrun --nproc-per-node 2 -m overspill.cli serve --pp 2` (or --tp 2): rank 0 serves HTTP and its
    batching engine drives rank 1. Concurrent completions through the official client equal the single process's
    greedy generation; SIGTERM to both ranks (as torchrun forwards it) drains rank 0, which closes the model, and
    both exit 0."""
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx")
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["ROMEO:", "JULIET:\nO", "To be, or"]
    m = overspill.load(dtype="float32")
    want = [m.generate([p], max_new_tokens=12, ignore_eos=True)[0] for p in prompts]
    port = _free_port()
    argv = ["-m", "overspill.cli", "serve", "--dtype", "float32", flag, "2", "--port", str(port),
            "--max-batch-size", "4", "--log-level", "warning"]
    procs = _launch([argv] * 2, tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 120
        while time.monotonic() < end and all(p.poll() is None for p in procs):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert httpx.get(url + "/health", timeout=5).status_code == 200, _log(tmp_path, 0)[-3000:]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
        ask = lambda p: client.completions.create(model="shakespeare", prompt=p, max_tokens=12, temperature=0,
                                                  extra_body={"ignore_eos": True}).choices[0].text
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(ask, prompts))
        assert got == want
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    assert _wait(procs, timeout=60) == [0, 0], _log(tmp_path, 0)[-2000:] + _log(tmp_path, 1)[-2000:]
