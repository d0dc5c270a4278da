"""cpu=auto and the plan's host-memory line read this process's memory cgroup limit (v1 or v2, the tightest along
its path), else the RAM available."""
import pytest

import overspill
from overspill.placement import machine


def _tree(tmp_path, lines: str, files: dict[str, str]):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cgroup").write_text(lines)
    for rel, text in files.items():
        p = tmp_path / "fs" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(tmp_path / "cgroup"), str(tmp_path / "fs")


def test_cgroup_v1_limit_is_the_tightest_on_the_path(tmp_path):
    proc, root = _tree(tmp_path, "4:memory:/a/b\n3:cpu:/\n", {
        "memory/memory.limit_in_bytes": str(2**63 - 4096),          # the root: unlimited
        "memory/a/memory.limit_in_bytes": str(6 << 30),
        "memory/a/b/memory.limit_in_bytes": str(18 << 30)})
    assert machine.cgroup_limit(proc, root) == 6 << 30


def test_cgroup_v2_limit_and_unlimited(tmp_path):
    proc, root = _tree(tmp_path, "0::/svc\n", {"svc/memory.max": str(5 << 30), "memory.max": "max"})
    assert machine.cgroup_limit(proc, root) == 5 << 30
    proc, root = _tree(tmp_path / "u", "0::/svc\n", {"svc/memory.max": "max"})
    assert machine.cgroup_limit(proc, root) is None


def test_cpu_auto_leaves_the_process_overhead(monkeypatch, ref_dir):
    monkeypatch.setattr(machine, "memory_limit", lambda: (6 << 30, "memory cgroup limit"))
    assert machine.resolve_auto("cpu=auto") == f"cpu={(6 << 30) - machine.PROCESS_OVERHEAD}"
    assert machine.resolve_auto("cuda:0=1GiB,cpu=auto") == f"cuda:0=1GiB,cpu={(6 << 30) - machine.PROCESS_OVERHEAD}"
    path, _ = ref_dir("gptj")
    m = overspill.load(path, max_memory="cpu=auto", max_seq_len=64)
    assert m.plan.budgets["cpu"] == (6 << 30) - machine.PROCESS_OVERHEAD
    monkeypatch.setattr(machine, "memory_limit", lambda: (100 << 20, "memory cgroup limit"))
    with pytest.raises(overspill.OverspillError, match="leaves nothing beyond the process"):
        overspill.load(path, max_memory={"cpu": "auto"}, max_seq_len=64)
