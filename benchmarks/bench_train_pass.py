"""Training passes alone, on a streamed base: how long a pass takes and how long its compute waits on reads.

Builds the model as `overspill finetune` does (the trainer's reserve, LoRA r=8 on every block linear, float32
training activations where the CPU has no native bf16), then times --passes forward+backward passes of one
--seq-len row of random ids after a warm-up pass. Per pass it prints the wall time, the time the compute waited for
a streamed unit (the source's io_wait_s) and the reader's busy time (read_s), and the plan's layout (R resident,
s streamed, in execution order). No optimizer, no data loading: what the plan and the overlap of reads with
compute give. Use it to compare plans or commits on one machine in one sitting (alternate them: this VM drifts).

    .venv/bin/python benchmarks/bench_train_pass.py bench-cache/gptj-6b-bfloat16-int8-store --budget 4GiB
    .venv/bin/python benchmarks/bench_train_pass.py STORE --budget 4GiB --checkpoint --seq-len 64
    .venv/bin/python benchmarks/bench_train_pass.py --smoke    # a tiny random int8 store, some blocks streamed
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import common  # noqa: F401  (puts the repository root on sys.path)


def run(model: str, budget: int | None, quantize: str | None, seq_len: int, passes: int, checkpoint: bool) -> dict:
    """Build as the trainer does under ``budget`` bytes of cpu (None: the least the planner accepts plus two blocks,
    so some blocks stream), then time ``passes`` training passes after a warm-up; prints a line each and a summary."""
    import torch

    from overspill.finetune.backward import train_pass, trains_in_float32
    from overspill.finetune.lora import LoraAdapter, LoraSettings
    from overspill.finetune.trainer import TrainSettings, train_reserve
    from overspill.placement.planner import PlanError
    from overspill.runtime.loader import build, open_source

    src = open_source(model, "auto", quantize)
    cfg = src.ckpt.config
    st = TrainSettings(lora=LoraSettings(r=8, alpha=16, dropout=0.05, targets=("qkv", "out", "up", "down")),
                       seq_len=seq_len, grad_checkpoint=checkpoint)
    ad = LoraAdapter(cfg, st.lora, generator=torch.Generator().manual_seed(0))
    ad.train()
    reserve = train_reserve(st, ad.n_parameters() * 4, 8.0)
    if trains_in_float32(src.dtype, cpu_only=True):
        reserve = dataclasses.replace(reserve, train_dtype=torch.float32)
    if budget is None:
        try:
            build(model, "auto", quantize, {"cpu": 1}, reserve)
        except PlanError as e:
            budget = e.min_bytes + 2 * max(src.ckpt.unit_bytes(f"block.{i}") for i in range(cfg.n_layers))
    built = build(model, "auto", quantize, {"cpu": budget}, reserve, linear_hook=ad.hook)
    ex = built.executor
    layout = "".join("s" if pl.tier == "stream" else "R" for pl in built.plan.placements)
    ids = torch.randint(0, min(cfg.vocab_size, 4096), (1, seq_len), generator=torch.Generator().manual_seed(0))
    stats = getattr(ex.source, "stats", None) or {}
    rows = []
    for k in range(passes + 1):
        s0, t0 = dict(stats), time.perf_counter()
        train_pass(ex, ids, ids.clone(), checkpoint=checkpoint)
        row = {"pass_s": round(time.perf_counter() - t0, 3),
               "waited_on_reads_s": round(stats.get("io_wait_s", 0) - s0.get("io_wait_s", 0), 3),
               "reader_busy_s": round(stats.get("read_s", 0) - s0.get("read_s", 0), 3)}
        if k:                                       # the first pass is a warm-up
            rows.append(row)
            print(json.dumps(row), flush=True)
    ex.close()
    med = {k: sorted(r[k] for r in rows)[len(rows) // 2] for k in rows[0]}
    print(f"layout {layout}  passes {passes}: median {med['pass_s']} s a pass, {med['waited_on_reads_s']} s waiting "
          f"on reads, reader busy {med['reader_busy_s']} s", flush=True)
    return {"layout": layout, "budget": budget, **med}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="a layer store or Hugging Face directory")
    p.add_argument("--budget", default="4GiB", help="the cpu budget (what does not fit streams from disk)")
    p.add_argument("--quantize", default=None, help="quantize an HF directory's blocks on load")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--checkpoint", action="store_true", help="gradient checkpointing on (default: graphs kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a tiny random int8 store with some blocks streamed")
    a = p.parse_args(argv)
    if not a.smoke and not a.model:
        p.error("give a model directory (or --smoke)")

    import torch

    from overspill.io import map_large_allocations
    from overspill.placement import parse_size

    torch.set_num_threads(a.threads)
    map_large_allocations()
    if not a.smoke:
        run(a.model, parse_size(a.budget), a.quantize, a.seq_len, a.passes, a.checkpoint)
        return
    from overspill.cli import main as overspill_cli

    with common.Smoke() as sm:
        store = sm.dir / "store"
        if overspill_cli(["convert", str(sm.checkpoint("gptj-tiny")), str(store), "--quantize", "int8"]):
            raise SystemExit("smoke: overspill convert failed")
        r = run(str(store), None, None, 8, 2, False)
        if "s" not in r["layout"][1:-1]:
            raise SystemExit(f"smoke: expected some blocks streamed, got {r['layout']}")


if __name__ == "__main__":
    main()
