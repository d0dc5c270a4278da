"""Placement planner (pure, sizes only) and a smoke test of the bandwidth probes."""
from __future__ import annotations

import dataclasses
import math
import random
import re

import pytest

from overspill.placement.planner import _spread
from overspill.placement import (Bandwidths, Plan, PlanError, UnitCost, parse_memory, parse_size,
                                 plan_placement)

GiB, MiB = 2**30, 2**20


def model(n_blocks=8, block=100, kv=10, embed=100, embed_stream=10, head=100) -> list[UnitCost]:
    return ([UnitCost("embed", embed, 0, embed_stream)]
            + [UnitCost(f"block.{i}", block, kv) for i in range(n_blocks)]
            + [UnitCost("head", head)])


def homes(plan: Plan) -> list[str]:
    return [p.home for p in plan.placements]


# ---------------------------------------------------------------------------------------------
# parse_memory


@pytest.mark.parametrize("spec,expected", [
    ("cuda:0=10GiB,cuda:1=10GiB,cpu=4GiB", {"cuda:0": 10 * GiB, "cuda:1": 10 * GiB, "cpu": 4 * GiB}),
    ("0=1GB, cpu = 512MiB", {"cuda:0": 10**9, "cpu": 512 * MiB}),
    ("cpu=123", {"cpu": 123}),
    ("cpu=1.5gib,disk=1TB", {"cpu": 3 * GiB // 2, "disk": 10**12}),
    ("CPU=2KiB,cuda:3=7B,1=3kb", {"cpu": 2048, "cuda:3": 7, "cuda:1": 3000}),
    ("cuda:0=1TiB", {"cuda:0": 2**40}),
])
def test_parse_memory_good(spec, expected):
    got = parse_memory(spec)
    assert got == expected
    assert list(got) == list(expected)  # order kept: it is the fill order


@pytest.mark.parametrize("spec,piece", [
    ("cpu", "cpu"),
    ("cpu=", "cpu="),
    ("cpu=4XB", "cpu=4XB"),
    ("gpu0=1GiB", "gpu0=1GiB"),
    ("cpu=-1GiB", "cpu=-1GiB"),
    ("cuda:0=1GiB,,cpu=1GiB", ""),
    ("cuda=1GiB", "cuda=1GiB"),
])
def test_parse_memory_bad(spec, piece):
    with pytest.raises(ValueError) as e:
        parse_memory(spec)
    msg = str(e.value)
    assert "\n" not in msg
    assert repr(piece) in msg
    assert "expected DEVICE=SIZE" in msg and "cuda:0=10GiB" in msg


def test_parse_memory_bad_other():
    for spec in ("", "  "):
        with pytest.raises(ValueError, match="empty memory spec"):
            parse_memory(spec)
    with pytest.raises(ValueError, match="'cpu' given twice"):
        parse_memory("cpu=1GiB,cpu=2GiB")
    assert parse_size("3MiB") == 3 * MiB


# ---------------------------------------------------------------------------------------------
# CPU-only plans (hand-computed)
#   units: embed 100 B (streams 10 B), 8 blocks of 100 B + 10 B KV, head 100 B; activations 50;
#   2 slots. Everything streamed: ring 2x100 + KV 80 + act 50 = 330.


def test_all_resident_when_budget_is_big():
    plan = plan_placement(model(), {"cpu": 10 * GiB}, activation_bytes=50)
    assert all(p.tier == "resident" and p.device == "cpu" and p.home == "cpu" for p in plan.placements)
    assert plan.ring_slots == 0 and plan.staging_bytes == 0 and plan.compute_device is None
    assert plan.usage["cpu"] == {"weights": 1000, "kv": 80, "staging": 0, "activations": 50, "total": 1130}
    assert plan.streamed_bytes_per_token() == 0
    assert plan.resident_bytes("cpu") == 1000


def test_missing_cpu_budget_is_unlimited():
    plan = plan_placement(model(), {})
    assert set(homes(plan)) == {"cpu"}
    assert "unlimited" in plan.table()


def test_partial_streaming():
    # The plan reading the fewest bytes per forward: streaming the embedding reads only its 10 B of rows, so its
    # 100 B of RAM go to a fourth block: four blocks resident: 400 + ring 200 + KV 80 + act 50 = 730.
    # Disk bytes 10 + 400 + 100 = 510 (embed + three blocks resident instead: 600). The resident blocks alternate
    # with the streamed ones (0, 2, 4, 6), so the reader fetches the next streamed block while one computes.
    plan = plan_placement(model(), {"cpu": 730}, activation_bytes=50)
    assert homes(plan) == ["disk"] + ["cpu", "disk"] * 4 + ["disk"]
    assert [p.tier for p in plan.placements] == ["stream"] + ["resident", "stream"] * 4 + ["stream"]
    assert all(p.device == "cpu" for p in plan.placements)
    assert plan.ring_slots == 2 and plan.staging_bytes == 100 and plan.compute_device == "cpu"
    assert plan.usage["cpu"]["total"] == 730
    assert plan.streamed_bytes_per_token() == plan.disk_bytes_per_token() == 510
    plan = plan_placement(model(), {"cpu": 729}, activation_bytes=50)
    assert plan.disk_bytes_per_token() == 610


def test_a_big_head_stays_resident_so_the_ring_holds_blocks():
    # head 400 B: streaming it needs 2 x 400 B of slots; resident it costs 400 and the slots shrink to 2 x 100
    units = model(head=400, embed_stream=100)
    plan = plan_placement(units, {"cpu": 1000}, activation_bytes=50)
    assert plan.placement("head").tier == "resident" and plan.staging_bytes == 100
    # 400 head + 200 ring + 80 KV + 50 act = 730: 270 left for 2 blocks (embed, 100 read, is no cheaper than a block)
    assert plan.disk_bytes_per_token() == 100 * 7 and plan.usage["cpu"]["total"] <= 1000


def test_everything_streamed_when_budget_only_fits_ring():
    plan = plan_placement(model(), {"cpu": 330}, activation_bytes=50)
    assert [(p.tier, p.home) for p in plan.placements] == [("stream", "disk")] * 10  # embed and head too
    assert plan.usage["cpu"] == {"weights": 0, "kv": 80, "staging": 200, "activations": 50, "total": 330}
    assert plan.streamed_bytes_per_token() == 10 + 800 + 100  # the embedding streams only its rows


def test_no_ring_when_the_big_head_is_resident():
    # streaming only a 1000 B head needs a 2000 B ring: keeping it resident is cheaper and chosen
    units = model(head=1000)
    plan = plan_placement(units, {"cpu": 1900 + 80})
    assert set(homes(plan)) == {"cpu"} and plan.ring_slots == 0


def test_impossible_budget_names_the_minimum_and_it_works():
    units = [UnitCost("embed", 300 * MiB, 0, MiB)] + [UnitCost(f"block.{i}", 512 * MiB, 25 * MiB) for i in range(12)] \
        + [UnitCost("head", 300 * MiB)]
    with pytest.raises(PlanError) as e:
        plan_placement(units, {"cpu": 1 * GiB}, activation_bytes=64 * MiB)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("cpu=1.00 GiB is too small: need at least 1.36 GiB")  # 1388 MiB = 1.3555 GiB, rounded up
    assert "2 staging slots of 512.00 MiB + KV 300.00 MiB + activations 64.00 MiB" in msg
    need = 2 * 512 * MiB + 300 * MiB + 64 * MiB
    assert e.value.device == "cpu" and e.value.min_bytes == need
    plan = plan_placement(units, {"cpu": need}, activation_bytes=64 * MiB)
    assert plan.usage["cpu"]["total"] <= need
    # the printed (rounded up) figure works when typed back in
    printed = re.search(r"need at least (\S+ \S+)", msg).group(1).replace(" ", "")
    plan_placement(units, parse_memory(f"cpu={printed}"), activation_bytes=64 * MiB)
    with pytest.raises(PlanError):
        plan_placement(units, {"cpu": need - 1}, activation_bytes=64 * MiB)


# ---------------------------------------------------------------------------------------------
# accelerators (fake budgets: the planner never touches a device)


def test_multi_gpu_budgets():
    # cuda:0 = 350: embed + block.0-1 (100 + 2x110) + act 50 = 370 > 350 -> embed + block.0 (260)
    # cuda:1 (compute device) = 800: reserve ring 2x100 + KV of streamed + act 50
    units = model()
    plan = plan_placement(units, {"cuda:0": 350, "cuda:1": 800, "cpu": 300}, activation_bytes=50)
    got = [(p.unit, p.tier, p.device, p.home) for p in plan.placements]
    # cuda:1 holds block.1..k: 50 act + 200 ring + 10*(7-m) KV streamed + 110*m resident <= 800
    #   m=5: 50+200+20+550 = 820 > 800; m=4: 50+200+30+440 = 720 -> block.1-4
    # cpu: block.5-6 (200 B weights) + pinned host ring 2x100 = 400 > 300 -> block.5 only (300)
    assert got == ([("embed", "resident", "cuda:0", "cuda:0"), ("block.0", "resident", "cuda:0", "cuda:0")]
                   + [(f"block.{i}", "resident", "cuda:1", "cuda:1") for i in range(1, 5)]
                   + [("block.5", "stream", "cuda:1", "cpu")]
                   + [(f"block.{i}", "stream", "cuda:1", "disk") for i in (6, 7)]
                   + [("head", "stream", "cuda:1", "disk")])
    assert plan.compute_device == "cuda:1"
    assert plan.usage["cuda:0"] == {"weights": 200, "kv": 10, "staging": 0, "activations": 50, "total": 260}
    assert plan.usage["cuda:1"] == {"weights": 400, "kv": 70, "staging": 200, "activations": 50, "total": 720}
    assert plan.usage["cpu"] == {"weights": 100, "kv": 0, "staging": 200, "activations": 0, "total": 300}
    assert plan.resident_bytes("cuda:1") == 400 and plan.resident_bytes("cpu") == 100


def test_gpu_order_is_the_order_given():
    plan = plan_placement(model(), {"cuda:1": 10**6, "cuda:0": 10**6})
    assert set(homes(plan)) == {"cuda:1"}


def test_explicit_compute_device_and_missing_gpu_budget():
    plan = plan_placement(model(), {"cuda:0": 700, "cuda:1": 250, "cpu": 10**6}, compute_device="cuda:0")
    assert plan.compute_device == "cuda:0" and {"cuda:0", "cuda:1", "cpu"} <= set(homes(plan))
    assert plan.usage["cuda:0"]["staging"] == 200 and plan.usage["cuda:1"]["staging"] == 0
    auto = plan_placement(model(), {"cuda:0": 700, "cuda:1": 250, "cpu": 10**6})
    assert auto.compute_device == "cuda:1" and auto.usage["cuda:1"]["staging"] == 200  # last GPU with room
    with pytest.raises(PlanError, match=r"^cuda:2=0 \(no budget given\) is too small") as e:
        plan_placement(model(), {"cpu": 10**6}, compute_device="cuda:2")
    assert e.value.min_bytes == 2 * 100 + 80  # ring + KV, nothing resident there
    plan_placement(model(), {"cpu": 10**6, "cuda:2": e.value.min_bytes}, compute_device="cuda:2")


def test_gpu_plan_too_small_host_ring_blames_cpu():
    with pytest.raises(PlanError, match=r"^cpu=50 B is too small: need at least 200 B") as e:
        plan_placement(model(), {"cuda:0": 400, "cpu": 50})
    assert e.value.device == "cpu"


# ---------------------------------------------------------------------------------------------
# properties over many random cases


def _check_plan(plan: Plan, units: list[UnitCost], budgets: dict[str, int], act: int, slots: int):
    assert [p.unit for p in plan.placements] == [u.name for u in units]
    accels = [d for d in budgets if d not in ("cpu", "disk")]
    rank = {d: i for i, d in enumerate(accels + ["cpu", "disk"])}
    if accels:
        hs = homes(plan)
        assert hs == sorted(hs, key=rank.__getitem__), "order kept: each tier is a contiguous run, in order"
    else:   # the embedding and head placed freely; of equal blocks the resident ones spread among the streamed
        blocks = [i for i, u in enumerate(units) if u.name not in ("embed", "head")]
        held = [i for i in blocks if plan.placements[i].tier == "resident"]
        if len({units[i].weight_bytes for i in blocks}) == 1:
            assert held == _spread(blocks, len(held)), homes(plan)
    c = plan.compute_device
    streamed = [p for p in plan.placements if p.tier == "stream"]
    expect = {d: dict(weights=0, kv=0, staging=0, activations=0) for d in plan.usage}
    for p, u in zip(plan.placements, units):
        assert (p.weight_bytes, p.kv_bytes, p.stream_bytes) == (u.weight_bytes, u.kv_bytes, u.read_bytes)
        if p.tier == "resident":
            assert p.home == p.device
        else:
            assert p.device == c and p.home in ("cpu", "disk") and p.home != c
        if p.home != "disk":
            expect[p.home]["weights"] += p.weight_bytes
        expect[p.device]["kv"] += p.kv_bytes
        expect[p.device]["activations"] = act
    if streamed:
        expect[c]["staging"] += slots * max(p.stream_bytes for p in streamed)
        disk = [p.stream_bytes for p in streamed if p.home == "disk"]
        if c != "cpu" and disk:
            expect["cpu"]["staging"] += slots * max(disk)
    for d, u in plan.usage.items():
        assert {k: v for k, v in u.items() if k != "total"} == expect[d], d
        assert u["total"] == sum(expect[d].values())
        if d in budgets:
            assert u["total"] <= budgets[d], f"{d} over budget: {u['total']} > {budgets[d]}"


def _random_case(rng: random.Random):
    n = rng.randint(1, 10)
    block = rng.randint(1, 1000)
    units = [UnitCost("embed", rng.randint(1, 3000), 0, rng.randint(0, 50))]
    units += [UnitCost(f"block.{i}", block + rng.randint(0, 50), rng.randint(0, 100)) for i in range(n)]
    units += [UnitCost("head", rng.randint(1, 3000))]
    total = sum(u.weight_bytes for u in units)
    budgets: dict[str, int] = {}
    for g in rng.sample(range(4), rng.randint(0, 3)):
        budgets[f"cuda:{g}"] = rng.randint(0, total)
    if rng.random() < 0.85:
        budgets["cpu"] = rng.randint(0, total + 2000)
    return units, budgets, rng.choice([0, 7, 300]), rng.choice([1, 2, 3])


def test_random_budgets_are_never_exceeded_and_minimums_work():
    rng = random.Random(1234)
    planned = refused = 0
    for _ in range(300):
        units, budgets, act, slots = _random_case(rng)
        try:
            plan = plan_placement(units, budgets, activation_bytes=act, ring_slots=slots)
        except PlanError as e:
            refused += 1
            assert e.min_bytes is not None, str(e)
            fixed = {**budgets, e.device: e.min_bytes}
            _check_plan(plan_placement(units, fixed, activation_bytes=act, ring_slots=slots), units, fixed, act, slots)
            with pytest.raises(PlanError):
                plan_placement(units, {**budgets, e.device: e.min_bytes - 1}, activation_bytes=act, ring_slots=slots)
            continue
        planned += 1
        _check_plan(plan, units, budgets, act, slots)
        assert plan_placement(units, dict(budgets), activation_bytes=act, ring_slots=slots) == plan  # deterministic
    assert planned > 50 and refused > 20


def _fits(units, resident, cpu, act, slots):
    streamed = [u for i, u in enumerate(units) if i not in resident]
    ring = slots * max((u.read_bytes for u in streamed), default=0)
    use = sum(units[i].weight_bytes for i in resident) + sum(u.kv_bytes for u in units) + act + ring
    return use <= cpu, sum(u.read_bytes for u in streamed)


def test_cpu_only_reads_the_fewest_bytes():
    """Brute force: never more disk bytes than the best resident prefix (accelerate's sequential map); with
    equal blocks, the fewest over every subset of units; refused exactly when no subset fits."""
    rng = random.Random(7)
    for case in range(200):
        units, budgets, act, slots = _random_case(rng)
        if case % 2:   # equal blocks: the planner's search (free ends, block prefix) is exhaustive
            units = [u if u.name in ("embed", "head") else dataclasses.replace(u, weight_bytes=units[1].weight_bytes)
                     for u in units]
        cpu = budgets.get("cpu", 10**9)
        n = len(units)
        prefix = [d for t in range(n + 1) for ok, d in [_fits(units, set(range(t)), cpu, act, slots)] if ok]
        subsets = [d for m in range(1 << n)
                   for ok, d in [_fits(units, {i for i in range(n) if m >> i & 1}, cpu, act, slots)] if ok]
        try:
            plan = plan_placement(units, {"cpu": cpu}, activation_bytes=act, ring_slots=slots)
        except PlanError:
            assert not subsets
            continue
        assert plan.disk_bytes_per_token() <= min(prefix, default=math.inf)
        if case % 2:
            assert plan.disk_bytes_per_token() == min(subsets)


def test_deterministic_and_json_round_trip():
    units = model()
    budgets = {"cuda:0": 350, "cuda:1": 800, "cpu": 300}
    a = plan_placement(units, budgets, activation_bytes=50)
    b = plan_placement(units, budgets, activation_bytes=50)
    assert a == b and a.to_json() == b.to_json()
    back = Plan.from_json(a.to_json())
    assert back == a and back.to_json() == a.to_json()
    assert isinstance(back.placements[0], type(a.placements[0]))


# ---------------------------------------------------------------------------------------------
# prediction and display


def test_predict_bounds():
    units = [UnitCost("embed", 10**9, 0, 10**6)] + [UnitCost(f"block.{i}", 10**9, 10**7) for i in range(10)] \
        + [UnitCost("head", 10**9)]
    bw = Bandwidths(mem_gbps=40.0, disk_gbps=1.0, h2d_gbps=20.0, gpu_mem_gbps=2000.0, matmul_tflops=None)

    r = plan_placement(units, {"cpu": 100 * 10**9}).predict(bw)  # all in RAM: memory bound
    assert r["bound"] == "memory" and r["disk_s"] == 0
    assert r["s_per_token"] == pytest.approx((10**6 + 11 * 10**9 + 10**8) / 40e9)

    plan = plan_placement(units, {"cpu": 5 * 10**9})  # half from disk: disk bound
    r = plan.predict(bw)
    assert r["bound"] == "disk"
    assert r["s_per_token"] == pytest.approx(plan.disk_bytes_per_token() / 1e9)
    assert r["tokens_per_s"] == pytest.approx(1 / r["s_per_token"])

    plan = plan_placement(units, {"cuda:0": 4 * 10**9})  # GPU computes units held in RAM: h2d bound
    r = plan.predict(bw)
    assert r["bound"] == "h2d" and r["disk_s"] == 0
    assert r["h2d_s"] == pytest.approx(plan.streamed_bytes_per_token() / 20e9)

    r = plan_placement(units, {"cpu": 100 * 10**9}).predict(
        Bandwidths(mem_gbps=40.0, disk_gbps=1.0, matmul_tflops=1e-3), batch=8)  # tiny compute: compute bound
    assert r["bound"] == "compute"
    assert r["s_per_token"] == pytest.approx(2 * 8 * 11 * 10**9 / 2 / 1e9)
    assert r["tokens_per_s"] == pytest.approx(8 / r["s_per_token"])
    # quantized weights: 1 byte per parameter, which only the units' own parameter counts tell the compute term
    q = [dataclasses.replace(u, params=u.weight_bytes if u.name != "embed" else 0) for u in units]
    r = plan_placement(q, {"cpu": 100 * 10**9}).predict(Bandwidths(mem_gbps=40.0, disk_gbps=1.0, matmul_tflops=1e-3), batch=8)
    assert r["s_per_token"] == pytest.approx(2 * 8 * 11 * 10**9 / 1e9)


def test_a_gpu_plan_predicted_on_a_machine_without_a_gpu_names_what_is_missing():
    """No GPU probed: the CPU's matmul speed is not taken for the GPU's; the table says what it could not count."""
    units = [UnitCost(f"block.{i}", 10**9) for i in range(4)]
    cpu_only = Bandwidths(mem_gbps=40.0, disk_gbps=1.0, matmul_tflops=1e-3)
    r = plan_placement(units, {"cuda:0": 10 * 10**9}).predict(cpu_only, batch=8)
    assert r["s_per_token"] == 0 and r["compute_s"] == 0
    assert r["missing"] == ["gpu_memory bandwidth for cuda:0", "matmul speed for cuda:0"]
    assert "predicted: n/a (not measured on this machine: gpu_memory bandwidth for cuda:0, matmul speed for cuda:0)" \
        in plan_placement(units, {"cuda:0": 10 * 10**9}).table(cpu_only)
    text = plan_placement(units, {"cuda:0": 3 * 10**9, "cpu": 2 * 10**9}).table(cpu_only)   # from disk: a disk bound
    assert "bound: disk" in text and "not in the prediction (not measured on this machine): h2d_gbps" in text
    gpu = Bandwidths(mem_gbps=40.0, disk_gbps=1.0, h2d_gbps=20.0, gpu_mem_gbps=2000.0, matmul_tflops=1e-3)
    r = plan_placement(units, {"cuda:0": 10 * 10**9}).predict(gpu, batch=8)   # a probed GPU: its matmul speed
    assert r["bound"] == "compute" and r["missing"] == []


def test_table_is_readable():
    plan = plan_placement(model(), {"cpu": 730}, activation_bytes=50)
    text = plan.table(Bandwidths(mem_gbps=40.0, disk_gbps=1.0))
    lines = text.splitlines()
    assert any(re.match(r"block\.0,2,4,6\s+resident\s+cpu\s+cpu\s+400 B", ln) for ln in lines), text
    assert any(re.match(r"block\.1,3,5,7\s+stream\s+cpu\s+disk", ln) for ln in lines), text
    assert any(re.fullmatch(r"cpu\s+400 B\s+80 B\s+200 B\s+50 B\s+730 B\s+730 B\s+100%", ln) for ln in lines), text
    assert "bound: disk" in text and "s/token" in text
    assert "s/step of 8 tokens" in plan.table(Bandwidths(mem_gbps=40.0, disk_gbps=1.0), batch=8)
    big = [UnitCost(f"block.{i}", 3 * GiB // 2) for i in range(4)]
    assert "6.00 GiB" in plan_placement(big, {}).table()


# ---------------------------------------------------------------------------------------------
# bandwidth probes (smoke only: tiny and fast)


def test_bandwidth_probes_smoke(tmp_path):
    from overspill.placement import bandwidth

    m = bandwidth.mem_read_gbps(nbytes=4 * MiB, reps=2)
    assert m > 0 and math.isfinite(m)
    f = tmp_path / "probe.bin"
    f.write_bytes(bytes(range(256)) * (4096 * 3 + 7))  # not a multiple of the O_DIRECT alignment
    for kw in ({}, {"direct": False}, {"threads": 3, "block": 1 << 16}):
        d = bandwidth.disk_read_gbps(str(f), **kw)
        assert d > 0 and math.isfinite(d)
    assert bandwidth.disk_read_gbps([f, f], max_bytes=100) > 0


@pytest.mark.parametrize("skip", [0, 4096, 3 * 4096 + 100, 20 * 4096, 11 * 4096, 10 ** 9])
def test_disk_probe_segments_cover_the_region_after_skip(tmp_path, skip):
    """The disk probe's pieces cover `max_bytes` of the concatenated files from `skip` on, each byte once, at aligned
    in-file offsets (measure() probes distinct regions so a host-side cache cannot serve a re-read)."""
    from overspill.placement import bandwidth
    sizes = [9 * 4096 + 5, 4096, 15 * 4096]
    paths = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * n)
        paths.append(str(p))
    concat = [(p, o) for p, n in zip(paths, sizes) for o in range(n)]
    start = len(concat)
    if skip < len(concat):   # the aligned offset at or before `skip` within the file where it falls
        p, o = concat[skip]
        start = concat.index((p, o // 4096 * 4096))
    want = concat[start:start + 12 * 4096]
    segs = bandwidth._segments(paths, 12 * 4096, 3, skip)
    got = [(p, o) for piece in segs for p, off, n in piece for o in range(off, off + n)]
    assert got == want
    assert all(off % 4096 == 0 for piece in segs for _, off, _ in piece) and len(segs) <= 3
    if want:
        assert bandwidth.disk_read_gbps(paths, max_bytes=12 * 4096, skip=skip) > 0


def test_runtime_read_probe_reads_the_region(tmp_path):
    """measure()'s disk probe reads through the runtime's own reader (O_DIRECT chunks on its thread pool): the bytes
    it lands in the buffer are the region's, for an unaligned file end and a skip."""
    from overspill.placement import bandwidth
    from overspill.io import aligned_buffer
    data = bytes(range(256)) * (4096 * 3 + 7)
    f = tmp_path / "probe.bin"
    f.write_bytes(data)
    buf = aligned_buffer(len(data) + 4096)
    for skip, n in ((0, len(data)), (8192, 100_000), (8192 + 5, len(data))):
        buf.zero_()
        assert bandwidth.runtime_read_gbps([str(f)], n, skip=skip, buf=buf) > 0
        start = skip // 4096 * 4096
        got = min(n, len(data) - start)
        assert bytes(buf[:got].numpy()) == data[start:start + got]
