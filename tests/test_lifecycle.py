"""A model's resources end with it; the streaming order is enforced; the linear hook reaches every unit on every
tier; per-device step tensors are built once per pass."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import overspill
from conftest import VOCAB


def _min_budget(path, **kw):
    import re
    with pytest.raises(overspill.OverspillError) as e:
        overspill.load(path, max_memory="cpu=1KiB", max_seq_len=64, **kw)
    return int(re.search(r"= (\d+) B", str(e.value)).group(1))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _streamed(path, budget):
    return overspill.load(path, dtype="float32", max_memory={"cpu": budget}, max_seq_len=64)


def test_dropped_models_free_threads_files_and_memory(deep_dir, tmp_path):
    """50 load / generate / drop cycles of a streamed model (an HF directory and a layer store, so the reader thread,
    its staging ring and open files all exist) leave the thread count and open file descriptors where they started,
    and RSS within 24 MiB (allocator slack; one model's staging ring here is ~0.2 MiB, so a leak of one per cycle
    shows in the thread and descriptor counts long before RSS)."""
    from overspill.checkpoint.store import convert
    path, _ = deep_dir("gpt_neox_parallel")
    store = convert(path, str(tmp_path / "store"), dtype="float32", progress=False)
    budgets = {p: _min_budget(p) for p in (path, store)}

    def cycle(p):
        m = _streamed(p, budgets[p])
        assert "stream" in {u.tier for u in m.plan.placements}
        assert len(m.generate([[5, 6, 7]], max_new_tokens=3, ignore_eos=True)[0]) == 3

    for p in (path, store):   # warm-up: the process-wide reader pool, kernel modules, allocator arenas
        cycle(p)
    threads, fds, rss = threading.active_count(), _fds(), _rss()
    for i in range(50):
        cycle((path, store)[i % 2])
    assert threading.active_count() == threads
    assert _fds() == fds
    assert _rss() - rss < 24 << 20, f"RSS grew {(_rss() - rss) / 2**20:.1f} MiB over 50 cycles"


def test_close_and_context_manager(deep_dir):
    path, _ = deep_dir("llama_gqa")
    with _streamed(path, _min_budget(path)) as m:   # warm-up: the process-wide reader pool starts once
        m.generate([[4, 5]], max_new_tokens=2, ignore_eos=True)
    threads = threading.active_count()
    with _streamed(path, _min_budget(path)) as m:
        m.wait_loaded()                                          # the background load's thread has ended
        assert threading.active_count() == threads + 1          # the prefetch thread
        m.generate([[4, 5]], max_new_tokens=2, ignore_eos=True)
    assert threading.active_count() == threads
    with pytest.raises(overspill.OverspillError, match="closed"):
        m.generate([[4, 5]], max_new_tokens=2)
    m.close()                                                    # idempotent


def test_dropping_a_model_on_a_reader_thread_does_not_wait_for_itself(deep_dir):
    """A model in a reference cycle is freed by whichever thread's allocation triggers a collection, which can be one
    of the reader pool's threads while it reads for the prefetcher: closing there must not wait for the prefetch
    thread (it waits for that very read). The thread stops and frees its buffers and files itself."""
    import gc
    from overspill.io import read_pool
    path, _ = deep_dir("gptj")
    fds = _fds()
    m = _streamed(path, _min_budget(path))
    m.generate([[4, 5]], max_new_tokens=2, ignore_eos=True)
    pf = m.executor.source._pf
    m.me = m                                  # a cycle: only a collection frees it
    del m
    assert read_pool().submit(gc.collect).result(timeout=30) is not None     # a collection on a reader thread
    deadline = __import__("time").time() + 30
    while pf.slots and __import__("time").time() < deadline:
        __import__("time").sleep(0.05)
    assert pf.closed and pf.slots == [] and pf.thread is None
    assert _fds() <= fds


def test_stream_order_is_checked_even_under_python_O(deep_dir):
    """Asking the ring for another unit than the reader produced is an error, not an assert that python -O strips
    (the executor would silently run one unit with another's weights)."""
    path, _ = deep_dir("gpt2")
    code = textwrap.dedent(f"""
        import overspill, re
        from overspill.runtime.streaming import StreamOrderError
        try:
            overspill.load({path!r}, max_memory="cpu=1KiB", max_seq_len=64)
        except overspill.OverspillError as e:
            budget = int(re.search(r"= (\\d+) B", str(e)).group(1))
        m = overspill.load({path!r}, dtype="float32", max_memory={{"cpu": budget}}, max_seq_len=64)
        src = m.executor.source
        src.begin_pass()
        try:
            src.acquire(src.streamed[1])       # the reader produces streamed[0] first
        except StreamOrderError as e:
            print("refused:", e)
        else:
            print("served another unit's weights")
    """)
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "refused: streaming order broken" in r.stdout, r.stdout + r.stderr[-1000:]


class Scaled:
    """A hook's wrapper: the base linear's output times k (what a LoRA wrapper looks like from outside)."""

    def __init__(self, base, k: float):
        self.base, self.k = base, k
        self.in_features, self.out_features = base.in_features, base.out_features

    def __call__(self, x):
        return self.base(x) * self.k

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    def dequantize(self):
        return self.base.dequantize() * self.k


def _hook(seen: set):
    def hook(unit: str, name: str, lin):
        seen.add((unit, name))
        return Scaled(lin, 0.5) if (unit, name) in {("block.1", "down"), ("block.4", "qkv"), ("head", "lm")} else lin
    return hook


def _all_linears(cfg):
    from overspill.model.weights import linear_names, units
    return {(u, n) for u in units(cfg) for n in linear_names(u)}


@pytest.mark.parametrize("fmt", ["hf", "store", "store-int8", "accelerator"])
def test_linear_hook_reaches_every_tier(deep_dir, tmp_path, fmt):
    """load(linear_hook=...) wraps every matmul of every unit: resident, streamed from disk (HF directory or layer
    store, quantized too), resident on an accelerator and held in host RAM for one (a plan for cuda:0 run with the
    CPU standing in). Each placement gives the logits of the all-resident run with the same hook, and the hook
    changes them."""
    from overspill.checkpoint.store import convert
    path, _ = deep_dir("llama_gqa")
    kw = {"dtype": "float32"}
    if fmt.startswith("store"):
        scheme = "int8" if fmt.endswith("int8") else None
        path = convert(path, str(tmp_path / "s"), dtype="bfloat16" if scheme else "float32", quantize=scheme,
                       progress=False)
        kw = {}
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    plain = overspill.load(path, **kw).logits(ids)
    seen: set = set()
    want = overspill.load(path, linear_hook=_hook(seen), **kw).logits(ids)
    cfg = overspill.load(path, **kw).config
    assert seen == _all_linears(cfg)
    assert not torch.allclose(want, plain)
    if fmt == "accelerator":
        m0 = overspill.load(path, max_memory="cpu=1GiB", max_seq_len=64, **kw)
        w = max(p.weight_bytes for p in m0.plan.placements)
        act = m0.plan.usage["cpu"]["total"] - m0.plan.usage["cpu"]["weights"]
        spec = f"cuda:0={act + 6 * w},cpu={4 * w}"
        runs = [overspill.load(path, max_memory=spec, max_seq_len=64, stand_in={"cuda:0": "cpu"},
                               linear_hook=_hook(seen := set()), **kw)]
        kinds = {(p.tier, p.home) for p in runs[0].plan.placements}
        assert {("resident", "cuda:0"), ("stream", "cpu"), ("stream", "disk")} <= kinds, kinds
    else:
        seen = set()
        runs = [overspill.load(path, max_memory={"cpu": _min_budget(path, **kw)}, max_seq_len=64,
                               linear_hook=_hook(seen), **kw)]
        assert {p.tier for p in runs[0].plan.placements} == {"stream"}
    got = runs[0].logits(ids)
    assert seen == _all_linears(cfg)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_each_device_gets_its_step_once_per_pass(deep_dir, monkeypatch):
    """With units on two devices, a forward moves the step's position/rotary/mask tensors to each device once,
    not once per unit."""
    from overspill.model.layers import Step
    path, _ = deep_dir("gptj")
    base = overspill.load(path, dtype="float32")
    m0 = overspill.load(path, dtype="float32", max_memory="cpu=1GiB", max_seq_len=64)
    w = max(p.weight_bytes for p in m0.plan.placements)
    act = m0.plan.usage["cpu"]["total"] - m0.plan.usage["cpu"]["weights"]
    m = overspill.load(path, dtype="float32", max_memory=f"cuda:0={act + 3 * w},cuda:1=1GiB", max_seq_len=64,
                       stand_in={"cuda:0": "cpu:0", "cuda:1": "cpu"})
    devs = {p.device for p in m.plan.placements}
    assert devs == {"cuda:0", "cuda:1"}, devs
    calls = []
    real = Step.to
    monkeypatch.setattr(Step, "to", lambda self, d: calls.append(d) or real(self, d))
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.logits(ids), base.logits(ids))
    assert 1 <= len(calls) <= 2, calls
