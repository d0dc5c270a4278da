"""GPU benchmark: one unattended run on a machine with one CUDA GPU; every figure in one JSON file.

    bw ──► checkpoint ──► decode ──────────────────────────────────────────► finetune
    D2D,   make_checkpoint  a. overspill resident on cuda:0   (batch 1, 8)   a. overspill LoRA, bf16 and int8 base
    H2D     (--preset)      b. transformers bf16 .to(cuda:0)  (batch 1, 8)   b. transformers + PEFT LoRA
    pinned/                 c. overspill, ~40% of the blocks resident, the rest streamed from pinned host RAM
    pageable                d. accelerate device_map="auto" under the same cuda:0 budget (the rest on the CPU)

Parts (--parts, comma list; each is timed and runs inside its own try/except: a failure prints
`PART name: FAILED <ExcType>: <first line>` and the run goes on; the JSON file is rewritten after every part, so a
kill keeps what was done):
  bw         device-to-device copy GB/s (bytes read + written / time, 1 GiB tensors), pinned host -> device and
             pageable host -> device GB/s (256 MiB); medians of 5 after a warm-up, synchronized around each copy.
  checkpoint a random bf16 checkpoint made by make_checkpoint.py (--preset, default gptj-1b) under --work; weight
             bytes per decode step = every tensor but the embedding tables, the LM head counted
             (common.weight_bytes_per_token, safetensors headers only). Made whenever decode or finetune runs.
  decode     greedy decode of 64 new tokens after a 128-token random prompt (seeded), batch 1 and 8, after a 4-token
             warm-up generate. tokens/s per sequence = 63 / decode seconds (first token to last). Bounds:
               resident: (D2D copy GB/s / 2, the read half of read + write) / weight bytes per step
               streamed: streamed bytes per step / pinned H2D GB/s
             peak GPU memory per side (torch.cuda.max_memory_allocated, reset before each load).
  finetune   LoRA r=8, alpha 16, dropout 0.05 on every block linear, batch 1 x 256 tokens of
             overspill/data/shakespeare/heldout.txt, 4 optimizer steps; s/step = median of steps 2-4; tokens/s;
             peak GPU memory. overspill (finetune(), bf16 base and int8 base) against transformers + PEFT
             (gradient checkpointing, torch AdamW, the same batches).

Run on the GPU machine (from the repository root; ~2-3 min with gptj-1b on an H100):
    python benchmarks/bench_gpu.py --json gpu-results.json
    python benchmarks/bench_gpu.py --parts bw,decode --ckpt /path/to/existing/checkpoint --json out.json
Smoke here, on the CPU (GPU-only figures print "skipped (no CUDA)"; budgets are CPU budgets, and the streamed side
streams from disk instead of pinned host RAM):
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --preset gptj-tiny --json /tmp/bg.json
Tiny presets (vocabulary 1024) are made with a 4096-token vocabulary so the built-in tokenizer fits (finetune).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import common  # noqa: E402  (also puts the repository root on sys.path)

PARTS = ("bw", "checkpoint", "decode", "finetune")
DATA = common.REPO_ROOT / "overspill" / "data" / "shakespeare" / "heldout.txt"
PROMPT_LEN, NEW_TOKENS, WARMUP_TOKENS, BATCHES = 128, 64, 4, (1, 8)
STREAM_FRACTION = 0.4            # of the blocks' bytes resident on the device in decode side c
CPU_GIB = 16

T_START = time.perf_counter()


def say(msg: str = "") -> None:
    print(msg, flush=True)


def gb(x) -> str:
    return common.fmt(None if x is None else x / 1e9, ".3f") + " GB"


class Run:
    """The results object, written atomically (temp file, then os.replace) after every part."""

    def __init__(self, path: str, args: argparse.Namespace):
        self.path = Path(path)
        self.data: dict = {"args": vars(args), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "parts": {}}

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - T_START, 2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


# ---------------------------------------------------------------------------------------------
# device helpers


def is_cuda(dev: str) -> bool:
    return dev.startswith("cuda")


def sync(dev: str) -> None:
    if is_cuda(dev):
        import torch
        torch.cuda.synchronize(dev)


def reset_peak(dev: str) -> None:
    if is_cuda(dev):
        import torch
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def peak(dev: str) -> int | None:
    if is_cuda(dev):
        import torch
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev)
    return None


def free(dev: str, *objs) -> None:
    for o in objs:
        close = getattr(o, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                pass
    del objs
    gc.collect()
    if is_cuda(dev):
        import torch
        torch.cuda.empty_cache()


def budget_key(dev: str) -> str:
    """overspill's budget name for the compute device ("cuda:0"; "cpu" on the CPU)."""
    return dev if is_cuda(dev) else "cpu"


def deadline_hit(a, what: str) -> bool:
    left = a.deadline_s - (time.perf_counter() - T_START)
    if left <= 0:
        say(f"  {what}: skipped (past --deadline-s {a.deadline_s:.0f} s)")
        return True
    return False


# ---------------------------------------------------------------------------------------------
# 1. bandwidths


def timed_copies(dst, src, dev: str, reps: int = 5, warm: int = 2) -> list[float]:
    out = []
    for i in range(warm + reps):
        sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync(dev)
        if i >= warm:
            out.append(time.perf_counter() - t0)
    return out


def part_bw(a, ctx: dict) -> dict:
    import torch

    if not is_cuda(a.device):
        say("  bw: skipped (no CUDA)")
        return {"skipped": "no CUDA"}
    dev = a.device
    n = 1 << 30
    x = torch.empty(n, dtype=torch.uint8, device=dev).fill_(1)
    y = torch.empty_like(x)
    t = timed_copies(y, x, dev)
    d2d = 2 * n / common.median(t) / 1e9
    del x, y
    torch.cuda.empty_cache()
    m = 256 << 20
    dst = torch.empty(m, dtype=torch.uint8, device=dev)
    pinned = torch.empty(m, dtype=torch.uint8, pin_memory=True).fill_(1)
    pageable = torch.empty(m, dtype=torch.uint8).fill_(1)
    h2d_pinned = m / common.median(timed_copies(dst, pinned, dev)) / 1e9
    h2d_pageable = m / common.median(timed_copies(dst, pageable, dev)) / 1e9
    del dst, pinned, pageable
    torch.cuda.empty_cache()
    r = {"d2d_rw_gbps": d2d, "d2d_read_gbps": d2d / 2, "h2d_pinned_gbps": h2d_pinned,
         "h2d_pageable_gbps": h2d_pageable, "d2d_times_s": t}
    say(f"  device->device copy: {d2d:.0f} GB/s (read+written; read bandwidth taken as half: {d2d / 2:.0f} GB/s)")
    say(f"  host->device pinned: {h2d_pinned:.1f} GB/s   pageable: {h2d_pageable:.1f} GB/s   (256 MiB, median of 5)")
    ctx.update(r)
    return r


# ---------------------------------------------------------------------------------------------
# 2. checkpoint


def part_checkpoint(a, ctx: dict) -> dict:
    from make_checkpoint import PRESETS

    if a.ckpt:
        out = Path(a.ckpt).resolve()
        made_s = None
        say(f"  using {out}")
    else:
        out = Path(a.work) / f"{a.preset}-bfloat16"
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "make_checkpoint.py"), "--preset", a.preset,
               "--dtype", "bfloat16", "--out", str(out)]
        if PRESETS[a.preset][1].get("vocab_size", 4096) < 4096:   # so the built-in tokenizer fits (finetune)
            cmd += ["--set", "vocab_size=4096", "--set", "bos_token_id=0", "--set", "eos_token_id=0"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        made_s = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"make_checkpoint.py exited {p.returncode}: {p.stdout.strip().splitlines()[-1:]}")
        say(f"  made {a.preset} in {made_s:.1f} s -> {out}")
    sizes = common.tensor_bytes(out)
    wbps = common.weight_bytes_per_token(out)
    cfg = common.read_config(out)
    r = {"path": str(out), "make_s": made_s, "total_bytes": sum(sizes.values()), "weight_bytes_per_step": wbps,
         "model_type": cfg.get("model_type"), "vocab_size": cfg["vocab_size"]}
    say(f"  {gb(r['total_bytes'])} in all; weight bytes per decode step {gb(wbps)} (embedding tables excluded)")
    ctx["ckpt"] = r
    return r


# ---------------------------------------------------------------------------------------------
# 3. decode


def prompts_for(vocab: int, batch: int) -> list[list[int]]:
    from bench_decode import make_prompts
    return make_prompts(vocab, batch, PROMPT_LEN, seed=0)


def overspill_runs(m, vocab: int) -> dict:
    out = {}
    for b in BATCHES:
        prompts = prompts_for(vocab, b)
        m.generate(prompts, max_new_tokens=WARMUP_TOKENS, temperature=0, ignore_eos=True)
        outs = m.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        st = dict(m.last_stats)
        assert [len(o) for o in outs] == [NEW_TOKENS] * b, [len(o) for o in outs]
        out[b] = {"decode_s": st["decode_s"], "prefill_s": st.get("prefill_s"),
                  "tok_s": (NEW_TOKENS - 1) / st["decode_s"], "tokens0": list(outs[0][:16]), "last_stats": st}
    return out


def hf_runs(model, vocab: int, dev: str) -> dict:
    out = {}
    for b in BATCHES:
        prompts = prompts_for(vocab, b)
        common.hf_generate_timed(model, prompts, WARMUP_TOKENS, dev)
        ids, times, t0 = common.hf_generate_timed(model, prompts, NEW_TOKENS, dev)
        decode_s = times[-1] - times[0]
        out[b] = {"decode_s": decode_s, "prefill_s": times[0] - t0, "tok_s": (NEW_TOKENS - 1) / decode_s,
                  "tokens0": ids[0, PROMPT_LEN:PROMPT_LEN + 16].tolist()}
    return out


def kinds(m) -> set:
    return {(p.tier, p.device, p.home) for p in m.plan.placements}


def side(r: dict, name: str, fn, a) -> None:
    """One decode side in its own try/except: its result or its failure under r[name]."""
    if deadline_hit(a, name):
        r[name] = {"skipped": "deadline"}
        return
    t0 = time.perf_counter()
    try:
        r[name] = fn()
        r[name]["side_s"] = time.perf_counter() - t0
    except Exception as e:
        say(f"  {name}: FAILED {type(e).__name__}: {first_line(e)}")
        r[name] = {"error": f"{type(e).__name__}: {first_line(e)}", "traceback": traceback.format_exc()[-3000:]}
    finally:
        free(a.device)


def report(label: str, res: dict, bound: float | None = None, extra: str = "") -> None:
    for b, x in sorted(((k, v) for k, v in res.items() if isinstance(k, int)), key=lambda kv: kv[0]):
        frac = f", {x['tok_s'] / bound:.0%} of the bound {bound:.0f}" if bound else ""
        say(f"  {label} batch {b}: {x['tok_s']:.1f} tok/s per sequence ({x['tok_s'] * b:.1f} in all){frac}{extra}")


def ratio(r: dict, num: str, den: str, b: int):
    x, y = r.get(num, {}).get(b), r.get(den, {}).get(b)
    return x["tok_s"] / y["tok_s"] if x and y and y["tok_s"] else None


def part_decode(a, ctx: dict) -> dict:
    import torch
    import overspill

    ck = ctx["ckpt"]
    path, vocab, wbps = ck["path"], ck["vocab_size"], ck["weight_bytes_per_step"]
    dev, cuda = a.device, is_cuda(a.device)
    read_bw = ctx.get("d2d_read_gbps")
    bound_res = read_bw * 1e9 / wbps if read_bw else None
    r: dict = {"prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "batches": list(BATCHES),
               "bound_resident_tok_s": bound_res,
               "bound_note": "D2D read bandwidth (half of the read+write copy figure) / weight bytes per step"}
    if bound_res:
        say(f"  bound, resident: {read_bw:.0f} GB/s (half the D2D read+write figure) / {gb(wbps)} = "
            f"{bound_res:.0f} tok/s per sequence")
    elif not cuda:
        say("  bounds: skipped (no CUDA)")
    spec = f"cuda:0=60GiB,cpu={CPU_GIB}GiB".replace("cuda:0", dev) if cuda else "cpu=60GiB"
    sizes: dict = {}

    def resident():
        reset_peak(dev)
        t0 = time.perf_counter()
        m = overspill.load(path, dtype="bfloat16", max_memory=spec, max_batch_size=max(BATCHES),
                           max_seq_len=PROMPT_LEN + NEW_TOKENS + 64)
        m.wait_loaded()
        load_s = time.perf_counter() - t0
        got = {(p.tier, p.device) for p in m.plan.placements}
        assert got == {("resident", dev)}, f"plan not all resident on {dev}: {got}"
        p = m.plan
        sizes.update(w={q.unit: q.weight_bytes for q in p.placements}, kv=sum(q.kv_bytes for q in p.placements),
                     act=p.activation_bytes)
        out = {"load_s": load_s, **overspill_runs(m, vocab), "peak_gpu_bytes": peak(dev), "max_memory": spec}
        free(dev, m)
        return out

    side(r, "overspill_resident", resident, a)
    report("overspill resident", r["overspill_resident"], bound_res)

    def hf():
        from transformers import AutoModelForCausalLM
        reset_peak(dev)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(dev).eval()
        load_s = time.perf_counter() - t0
        out = {"load_s": load_s, **hf_runs(model, vocab, dev), "peak_gpu_bytes": peak(dev)}
        del model
        return out

    side(r, "transformers", hf, a)
    report("transformers", r["transformers"], bound_res)
    for b in BATCHES:
        q = ratio(r, "overspill_resident", "transformers", b)
        r[f"ratio_resident_over_transformers_b{b}"] = q
        if q:
            say(f"  overspill resident / transformers, batch {b}: {q:.2f}")

    # c. ~40% of the blocks' bytes resident; the rest streamed (from pinned host RAM on CUDA, from disk on the CPU)
    budget = None
    if sizes:
        w, kv, act = sizes["w"], sizes["kv"], sizes["act"]
        blocks = [v for u, v in w.items() if u.startswith("block.")]
        block = max(blocks)
        fixed = sum(v for u, v in w.items() if not u.startswith("block."))    # embed, head
        slots = 3                                                            # a ring of 2, +1 for fusing an HF fetch
        budget = act + kv + slots * block + fixed + int(STREAM_FRACTION * sum(blocks)) + (1 << 20)
        r["stream_budget_bytes"] = budget
    home = "cpu" if cuda else "disk"
    spec_of = lambda b: f"{dev}={b},cpu={CPU_GIB}GiB" if cuda else f"cpu={b}"

    def streamed():
        nonlocal budget
        assert budget is not None, "no resident plan to size the budget from (the resident side failed)"
        reset_peak(dev)
        for _ in range(len(sizes["w"])):      # everything fits (tiny models: the KV reserve dwarfs a block): less
            t0 = time.perf_counter()
            m = overspill.load(path, dtype="bfloat16", max_memory=spec_of(budget), max_batch_size=max(BATCHES),
                               max_seq_len=PROMPT_LEN + NEW_TOKENS + 64)
            m.wait_loaded()
            load_s = time.perf_counter() - t0
            k = kinds(m)
            if any(t == "stream" and h == home for t, _, h in k):
                break
            free(dev, m)
            budget -= max(v for u, v in sizes["w"].items() if u.startswith("block."))
        else:
            raise AssertionError(f"no unit streams from {home}: {k}")
        r["stream_budget_bytes"] = budget
        if not cuda:
            say(f"  (no CUDA: the streamed side runs under cpu={budget / 2**20:.1f}MiB and streams from disk)")
        stream_spec = spec_of(budget)
        plan = m.plan
        sb = plan.streamed_bytes_per_token()
        n_stream = sum(p.tier == "stream" for p in plan.placements)
        h2d = ctx.get("h2d_pinned_gbps")
        bound = h2d * 1e9 / sb if (h2d and sb and cuda) else None
        out = {"load_s": load_s, "max_memory": stream_spec, "home": home, "kinds": sorted(map(list, k)),
               "streamed_units": n_stream, "units": len(plan.placements), "streamed_bytes_per_step": sb,
               "resident_bytes_on_device": plan.resident_bytes(dev), "bound_tok_s": bound,
               **overspill_runs(m, vocab), "peak_gpu_bytes": peak(dev)}
        copier = getattr(m.executor.source, "copier", None)
        if copier is not None and hasattr(copier, "read_stats"):
            out["copy_stats"] = copier.read_stats()
        if getattr(m.executor.source, "stats", None) is not None:
            out["source_stats"] = dict(m.executor.source.stats)
        say(f"  streamed plan: {n_stream} of {len(plan.placements)} units stream from {home}, {gb(sb)} per step; "
            f"bound " + (f"{gb(sb)} / {h2d:.1f} GB/s pinned H2D = {bound:.1f} tok/s" if bound else
                         "skipped (no CUDA)"))
        free(dev, m)
        return out

    side(r, "overspill_streamed", streamed, a)
    st = r["overspill_streamed"]
    report("overspill streamed", st, st.get("bound_tok_s"))
    if st.get("copy_stats"):
        s = st["copy_stats"]
        say(f"  copier: {s.get('copies')} copies, {gb(s.get('copy_bytes'))} in {common.fmt(s.get('copy_s'))} s, "
            f"compute stalled {common.fmt(s.get('stall_s'))} s, pageable {gb(s.get('pageable_bytes'))}")

    def accel():
        from transformers import AutoModelForCausalLM
        assert budget is not None, "no resident plan to size the budget from (the resident side failed)"
        if cuda:
            mm = {int(dev.split(":")[1]) if ":" in dev else 0: budget, "cpu": CPU_GIB << 30}
            kw = {}
        else:
            mm = {"cpu": budget}
            kw = {"offload_folder": tempfile.mkdtemp(prefix="offload-", dir=a.work)}
        reset_peak(dev)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto", max_memory=mm,
                                                     **kw).eval()
        load_s = time.perf_counter() - t0
        dmap = dict(getattr(model, "hf_device_map", {}) or {})
        out = {"load_s": load_s, "max_memory": {str(k): v for k, v in mm.items()},
               "device_map_counts": {str(v): sum(1 for x in dmap.values() if x == v) for v in set(dmap.values())},
               **hf_runs(model, vocab, dev), "peak_gpu_bytes": peak(dev)}
        say(f"  accelerate device map: {out['device_map_counts']}")
        del model
        return out

    side(r, "accelerate", accel, a)
    report("accelerate", r["accelerate"])
    for b in BATCHES:
        q = ratio(r, "overspill_streamed", "accelerate", b)
        r[f"ratio_streamed_over_accelerate_b{b}"] = q
        if q:
            say(f"  overspill streamed / accelerate, batch {b}: {q:.2f}")
    for name in ("overspill_resident", "transformers", "overspill_streamed", "accelerate"):
        pk = r.get(name, {}).get("peak_gpu_bytes")
        if pk is not None:
            say(f"  peak GPU memory {name}: {pk / 2**30:.2f} GiB")
    return r


# ---------------------------------------------------------------------------------------------
# 4. finetune


def part_finetune(a, ctx: dict) -> dict:
    import torch
    import bench_finetune as bf

    ck = ctx["ckpt"]
    dev, cuda = a.device, is_cuda(a.device)
    view = bf.tokenizer_view(Path(ck["path"]), Path(a.work) / "views")
    ns = SimpleNamespace(path=str(view), data=str(DATA), dtype="bfloat16", lora_r=8, no_grad_checkpoint=False,
                         steps=3, batch_size=1, seq_len=256, seed=0)
    r: dict = {"batch_size": 1, "seq_len": 256, "lora_r": 8, "lora_alpha": 16, "steps": 4,
               "targets_overspill": bf.OVERSPILL_TARGETS}
    budgets = {dev: 60 << 30, "cpu": CPU_GIB << 30} if cuda else {"cpu": 60 << 30}

    def overspill_side(quantize):
        def run():
            from overspill.finetune.trainer import finetune
            out_dir = tempfile.mkdtemp(prefix="ft-out-", dir=a.work)
            lines: list[str] = []
            reset_peak(dev)
            t0 = time.perf_counter()
            try:
                res = finetune(str(view), str(DATA), out_dir, bf.train_settings(ns), dtype="bfloat16",
                               quantize=quantize, max_memory=budgets, progress=False, log=lines.append)
            finally:
                shutil.rmtree(out_dir, ignore_errors=True)
            return {"total_s": time.perf_counter() - t0, **bf.step_figures(res.history), "steps_run": res.steps,
                    "peak_gpu_bytes": peak(dev), "peak_rss_bytes": res.peak_rss_bytes, "log": lines[-5:]}
        return run

    def peft_side():
        import dataclasses
        model = bf.peft_model(ns).to(dev)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
        batches = bf.train_batches(ns)
        torch.manual_seed(0)
        reset_peak(dev)
        history = []
        for step in range(4):
            b = next(batches)
            b = dataclasses.replace(b, input_ids=b.input_ids.to(dev), labels=b.labels.to(dev))
            sync(dev)
            t0 = time.perf_counter()
            loss = bf.peft_step(model, opt, params, b)
            sync(dev)
            history.append({"step": step + 1, "loss": loss, "tokens": b.loss_tokens, "s": time.perf_counter() - t0})
        out = {**bf.step_figures(history), "steps_run": len(history), "peak_gpu_bytes": peak(dev),
               "lora_params": sum(p.numel() for p in params)}
        del model, opt, params
        return out

    for name, fn in (("overspill_bf16", overspill_side(None)), ("overspill_int8", overspill_side("int8")),
                     ("peft", peft_side)):
        side(r, name, fn, a)
        x = r[name]
        if x.get("step_s_median"):
            pk = x.get("peak_gpu_bytes")
            say(f"  {name}: {x['step_s_median']:.3f} s/step, {x['tokens_per_s']:.0f} tokens/s, first loss "
                f"{x['first_loss']:.3f}, peak GPU memory " + (f"{pk / 2**30:.2f} GiB" if pk is not None
                                                              else "skipped (no CUDA)"))
    p = r.get("peft", {})
    for name in ("overspill_bf16", "overspill_int8"):
        x = r.get(name, {})
        if x.get("tokens_per_s") and p.get("tokens_per_s"):
            r[f"{name}_tok_s_over_peft"] = x["tokens_per_s"] / p["tokens_per_s"]
            line = f"  {name} / PEFT: tokens/s {r[f'{name}_tok_s_over_peft']:.2f}"
            if x.get("peak_gpu_bytes") and p.get("peak_gpu_bytes"):
                r[f"{name}_peak_gpu_over_peft"] = x["peak_gpu_bytes"] / p["peak_gpu_bytes"]
                line += f", peak GPU memory {r[f'{name}_peak_gpu_over_peft']:.2f}"
            say(line)
    return r


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda:0", help="cuda:0 (default) or cpu (a smoke run: GPU figures skipped)")
    p.add_argument("--preset", default="gptj-1b", help="make_checkpoint.py preset (default gptj-1b)")
    p.add_argument("--ckpt", help="an existing checkpoint directory instead of making one")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)} (default: all)")
    p.add_argument("--work", help="scratch directory (default: a new one under /tmp)")
    p.add_argument("--json", default="bench_gpu.json", help="where every figure goes (rewritten after each part)")
    p.add_argument("--deadline-s", type=float, default=230.0,
                   help="sides not started by then are skipped, saying so (default 230)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    a = p.parse_args(argv)
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"--parts: unknown {bad}; choose from {PARTS}")
    if ("decode" in parts or "finetune" in parts) and "checkpoint" not in parts:
        parts.append("checkpoint")
    parts = [x for x in PARTS if x in parts]
    a.work = a.work or tempfile.mkdtemp(prefix="bench-gpu-")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XDG_CACHE_HOME", str(Path(a.work) / "cache"))   # overspill's bandwidth cache
    run = Run(a.json, a)
    ctx: dict = {}
    try:
        import torch
        if a.threads:
            torch.set_num_threads(a.threads)
        meta = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
                "device": a.device, "cpu_count": os.cpu_count()}
        if is_cuda(a.device):
            meta["gpu"] = torch.cuda.get_device_name(a.device)
            meta["gpu_total_bytes"] = torch.cuda.get_device_properties(a.device).total_memory
        for mod in ("transformers", "accelerate", "peft"):
            try:
                meta[mod] = __import__(mod).__version__
            except Exception as e:
                meta[mod] = f"missing ({type(e).__name__})"
        run.data["meta"] = meta
        say(f"bench_gpu: {meta}; work dir {a.work}; parts {','.join(parts)}")
    except Exception as e:
        say(f"PART meta: FAILED {type(e).__name__}: {first_line(e)}")
    run.write()
    fns = {"bw": part_bw, "checkpoint": part_checkpoint, "decode": part_decode, "finetune": part_finetune}
    failed = 0
    for name in parts:
        say(f"PART {name}")
        t0 = time.perf_counter()
        try:
            if name in ("decode", "finetune") and "ckpt" not in ctx:
                raise RuntimeError("no checkpoint (the checkpoint part failed)")
            res = fns[name](a, ctx)
            res["part_s"] = time.perf_counter() - t0
            run.data["parts"][name] = res
            say(f"PART {name}: done in {res['part_s']:.1f} s")
        except Exception as e:
            failed += 1
            say(f"PART {name}: FAILED {type(e).__name__}: {first_line(e)}")
            run.data["parts"][name] = {"error": f"{type(e).__name__}: {first_line(e)}",
                                       "traceback": traceback.format_exc()[-3000:],
                                       "part_s": time.perf_counter() - t0}
        try:
            free(a.device)
        except Exception:
            pass
        run.write()
    say(f"bench_gpu: {len(parts) - failed}/{len(parts)} parts done in {time.perf_counter() - T_START:.1f} s; "
        f"figures in {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
