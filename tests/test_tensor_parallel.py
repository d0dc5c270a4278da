"""Tensor-parallel sharding (model/shard.py): each rank's block over its share of the heads and MLP, with the
partial sums added across ranks where the decoder reduces, equals the whole block. The ranks run as threads here
with an in-process sum standing in for the all-reduce; the distributed runs are in test_parallel.py."""
import threading

import pytest
import torch

import overspill
from overspill.checkpoint.hf import HFCheckpoint
from overspill.model.layers import Rope, block_forward, make_step
from overspill.model.weights import bind
from overspill.model.shard import local_config, shard_block

from conftest import VARIANTS


def _ranks(world, fn):
    """Run fn(rank, reduce) on ``world`` threads whose reduce() sums the ranks' tensors, in step."""
    bar, buf, outs = threading.Barrier(world), {}, [None] * world

    def make_reduce(r):
        n = [0]

        def reduce(y):
            k = n[0]
            n[0] += 1
            buf[k, r] = y
            bar.wait()
            s = sum(buf[k, j] for j in range(world))
            bar.wait()
            return s
        return reduce

    def go(r):
        outs[r] = fn(r, make_reduce(r))
    threads = [threading.Thread(target=go, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_block_sums_to_the_whole_block(ref_dir, variant, world):
    path, _ = ref_dir(variant)
    ck = HFCheckpoint(path)
    cfg = ck.config
    t = ck.finish("block.1", ck.read_unit_raw("block.1", torch.float32))
    lc = local_config(cfg, world)
    assert lc.n_heads * world == cfg.n_heads and lc.intermediate_size * world == cfg.intermediate_size
    x = torch.randn(2, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(7)[None].expand(2, 7)
    step = lambda c: make_step(c, Rope(c) if c.rotary_dim else None, pos, 0, None, torch.float32, False)
    want = block_forward(cfg, bind(cfg, "block.1", t), x, step(cfg), None, None)
    shards = [bind(lc, "block.1", shard_block(cfg, t, r, world)) for r in range(world)]
    outs = _ranks(world, lambda r, red: block_forward(lc, shards[r], x, step(lc), None, None, reduce=red))
    for o in outs:
        assert (o - want).abs().max() < 1e-5
    # bytes: each rank holds about 1/world of the block's matmul weights (KV heads replicated where fewer)
    full = sum(v.numel() for k, v in t.items() if k.endswith(".weight") and "norm" not in k)
    mine = sum(v.numel() for k, v in shard_block(cfg, t, 1, world).items() if k.endswith(".weight") and "norm" not in k)
    assert mine <= full / world * (1.6 if cfg.n_kv_heads < world else 1.0) + 1


def test_unsplittable_models_are_one_line(ref_dir):
    path, _ = ref_dir("llama_gqa")      # 4 query heads, 2 KV heads, MLP 128
    cfg = HFCheckpoint(path).config
    with pytest.raises(overspill.OverspillError, match="--tp 3.*4 query heads"):
        local_config(cfg, 3)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("world", [2, 4])
def test_a_rank_reads_its_slices_of_a_hugging_face_directory(ref_dir, variant, world):
    """A tensor-parallel view of an HF directory reads only its rank's rows (and the row-parallel weights, whole, cut
    in memory), finishes them at the local config, and gets exactly what shard_block cuts from the whole block;
    the bytes it reads from the files (the kernel's count, /proc/self/io) are what it says it reads."""
    path, _ = ref_dir(variant)
    whole = HFCheckpoint(path)
    cfg = whole.config
    t = whole.finish("block.1", whole.read_unit_raw("block.1", torch.float32))
    full_bytes = whole.unit_read_bytes("block.1", torch.float32)
    for r in range(world):
        view = HFCheckpoint(path, shard=(r, world))
        before = _bytes_read()
        raw = view.read_unit_raw("block.1", torch.float32)
        got_bytes = _bytes_read() - before
        mine = view.finish("block.1", raw)
        want = shard_block(cfg, t, r, world)
        assert sorted(mine) == sorted(want)
        for k in want:
            assert torch.equal(mine[k], want[k]), k
        planned = view.unit_read_bytes("block.1", torch.float32)
        # GPT-2 stores [in, out]: its column-parallel weights are the strided ones, read whole
        assert planned < full_bytes * ({2: 0.75, 4: 0.6}[world] if variant != "gpt2" else 0.85)
        assert planned <= got_bytes <= planned + 64 * 1024   # page-rounded reads of small tensors
        for u in ("embed", "head"):   # replicated, read whole
            assert view.unit_read_bytes(u, torch.float32) == whole.unit_read_bytes(u, torch.float32)


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
