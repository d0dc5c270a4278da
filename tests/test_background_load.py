"""A background load (the default on the CPU) returns before the resident weights are read and the first forward
computes each unit as soon as it is in: same logits as a load that reads everything first, errors raised by the
forward that needs the unit, nothing left running after close()."""
import threading
import time

import pytest
import torch

import overspill
from overspill.runtime import loader
from overspill.runtime.streaming import StreamingSource

VARIANT = "gpt_neox_parallel"


def _slow_fetch(monkeypatch, delay, log):
    real = loader.UnitBuilder.fetch

    def fetch(self, unit, table_shared):
        time.sleep(delay)
        out = real(self, unit, table_shared)
        log.append(("read", unit, time.perf_counter()))
        return out
    monkeypatch.setattr(loader.UnitBuilder, "fetch", fetch)


def _ids(n=5):
    return torch.arange(3, 3 + n).unsqueeze(0)


@pytest.mark.parametrize("budget", [None, "stream"])
def test_background_logits_equal_foreground(deep_dir, budget):
    path, _ = deep_dir(VARIANT)
    kw = dict(dtype="float32", max_seq_len=64)
    if budget:   # the embedding and two blocks resident, the rest streamed
        from test_streaming import _budgets
        kw["max_memory"] = {"cpu": _budgets(path, 2)}
    ref = overspill.load(path, background=False, **kw)
    m = overspill.load(path, **kw)
    if budget:
        assert isinstance(m.executor.source, StreamingSource)
    assert torch.equal(m.logits(_ids()), ref.logits(_ids()))
    assert torch.equal(m.logits(_ids(7)), ref.logits(_ids(7)))   # a second pass over the loaded units


def test_first_forward_computes_units_while_later_ones_load(deep_dir, monkeypatch):
    """The point of the background load: block 0 runs before the last resident unit has been read."""
    path, _ = deep_dir(VARIANT)
    log = []
    _slow_fetch(monkeypatch, 0.15, log)

    def hook(unit, name, lin):
        class Logged(torch.nn.Module):
            def forward(self, x):
                if name == "qkv":
                    log.append(("compute", unit, time.perf_counter()))
                return lin(x)
        return Logged()

    t0 = time.perf_counter()
    m = overspill.load(path, dtype="float32", max_seq_len=64, linear_hook=hook)
    returned = time.perf_counter() - t0
    m.logits(_ids())
    reads = [t for kind, u, t in log if kind == "read"]
    first_compute = min(t for kind, u, t in log if kind == "compute" and u == "block.0")
    assert len(reads) == 8                                   # embed, 6 blocks, head
    assert returned < 0.15 * 8 / 2, f"load returned after {returned:.2f} s: it read the weights first"
    assert first_compute < max(reads), "block 0 ran only after every unit was read: nothing overlapped"


def test_load_error_raised_by_the_forward_and_after(deep_dir, monkeypatch):
    path, _ = deep_dir(VARIANT)
    real = loader.UnitBuilder.fetch

    def fetch(self, unit, table_shared):
        if unit == "block.3":
            raise overspill.OverspillError("block.3: disk on fire")
        return real(self, unit, table_shared)
    monkeypatch.setattr(loader.UnitBuilder, "fetch", fetch)
    m = overspill.load(path, dtype="float32", max_seq_len=64)
    for _ in range(2):
        with pytest.raises(overspill.OverspillError, match="block.3: disk on fire"):
            m.logits(_ids())
    with pytest.raises(overspill.OverspillError, match="disk on fire"):
        m.wait_loaded()


def test_close_while_loading_stops_the_thread(deep_dir, monkeypatch):
    path, _ = deep_dir(VARIANT)
    _slow_fetch(monkeypatch, 0.2, [])
    before = {t for t in threading.enumerate()}
    m = overspill.load(path, dtype="float32", max_seq_len=64)
    assert any(t.name == "overspill-load-bg" for t in threading.enumerate())
    m.close()
    left = [t for t in threading.enumerate() if t not in before and t.is_alive() and t.name.startswith("overspill-load")]
    assert not left, f"threads still running after close(): {[t.name for t in left]}"
    with pytest.raises(overspill.OverspillError, match="closed"):
        m.logits(_ids())


def test_shape_mismatch_is_a_load_error_not_a_forward_error(deep_dir, tmp_path):
    """Shapes are checked from the headers before the background load starts."""
    import shutil

    from safetensors.torch import load_file, save_file
    path, _ = deep_dir(VARIANT)
    bad = tmp_path / "m"
    shutil.copytree(path, bad)
    sd = load_file(bad / "model.safetensors")
    name = next(k for k in sd if k.endswith("layers.4.mlp.dense_4h_to_h.weight"))
    sd[name] = sd[name][:, :-2].contiguous()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(overspill.OverspillError, match=r"shape mismatch in block\.4"):
        overspill.load(bad, dtype="float32")
