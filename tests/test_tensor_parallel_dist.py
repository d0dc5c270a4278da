"""Tensor parallel across processes (overspill/parallel/tensor_run.py) gives what one process gives.

Ranks are started as torchrun starts them (gloo on loopback; the helpers are test_parallel.py's): float32 logits
within 1e-5 of the single-process run and identical greedy tokens for grouped-query Llama (and at 4 ranks, where a
KV head is replicated on two ranks), GPT-J (parallel residual: one all-reduce per block), GPT-2 (biases: the
row-parallel ones added once) and bf16; --quantize int8 from a Hugging Face directory, quantized after sharding;
the same run without the all-reduce is wrong (the reduce is what the test measures); a rank failing mid-step ends
both with its one line; the CLI under torchrun prints what one process prints.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import overspill
from overspill.errors import OverspillError
from test_parallel import IDS, PROMPTS, SHAKESPEARE, _cli, _launch, _log, _torchrun, _wait

RANK_SCRIPT = r'''
import json, os, sys, torch
import overspill
from overspill.errors import OverspillError
spec = json.load(open(sys.argv[1]))
rank = int(os.environ["RANK"])
results = {}
for run in spec["runs"]:
    if run.get("no_reduce"):                 # every rank skips the sums: no collective inside a step
        import overspill.parallel.tensor_run as tr
        real_reducer = tr.all_reducer
        tr.all_reducer = lambda g, dtype: None
    if run.get("inject") and rank == 1:      # this rank fails its next ragged pass, before its first all-reduce
        from overspill.runtime.executor import Executor
        Executor.forward_ragged = lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("injected failure"))
    try:
        m = overspill.load(run["path"], dtype=run["dtype"], quantize=run.get("quantize"), tp=spec["tp"],
                           max_seq_len=64, max_batch_size=2)
    except OverspillError as e:
        results[run["name"]] = {"error": str(e)}
        break
    if run.get("no_reduce"):
        tr.all_reducer = real_reducer
    if m is None:
        continue
    r = {"logits": m.logits(torch.tensor(spec["ids"]))}
    try:
        r["greedy"] = m.generate(spec["prompts"], max_new_tokens=8, ignore_eos=True)
    except OverspillError as e:
        results[run["name"]] = {"error": str(e)}
        break
    r["kv_heads"] = m.executor.cfg.n_kv_heads
    results[run["name"]] = r
    m.close()
torch.save(results, spec["out"].format(rank=rank))
'''


def _single(path, dtype, quantize=None):
    m = overspill.load(path, dtype=dtype, quantize=quantize, max_seq_len=64, max_batch_size=2)
    r = {"logits": m.logits(torch.tensor(IDS)), "greedy": m.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)}
    m.close()
    return r


def _run_ranks(tmp_path, runs, tp):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"runs": runs, "ids": IDS, "prompts": PROMPTS, "tp": tp,
                                "out": str(tmp_path / "out{rank}.pt")}))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    procs = _launch([[str(script), str(spec)]] * tp, tmp_path, OVERSPILL_PP_TIMEOUT="10")
    codes = _wait(procs)
    assert codes == [0] * tp, "".join(_log(tmp_path, r)[-2000:] for r in range(tp))
    return [torch.load(tmp_path / f"out{r}.pt") for r in range(tp)]


def test_tp_outside_a_launcher_and_combined_with_pp(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(OverspillError, match="--tp 2 runs one process per rank.*--nproc-per-node 2"):
        overspill.load(SHAKESPEARE, tp=2)
    with pytest.raises(OverspillError, match="not supported yet"):
        overspill.load(SHAKESPEARE, tp=2, pp=2)


def test_two_tensor_parallel_ranks_equal_one_process(ref_dir, tmp_path):
    """One launch, two ranks, one model after another: float32 logits within 1e-5 and the same greedy tokens; bf16
    within its rounding; int8 quantized on the fly after sharding; without the all-reduce the logits are wrong;
    then rank 1 fails inside a step and both ranks end with its line."""
    runs = [{"name": v, "path": ref_dir(v)[0], "dtype": "float32"} for v in ("llama_gqa", "gptj", "gpt2",
                                                                            "gpt_neox_sequential")]
    runs.append({"name": "bf16", "path": ref_dir("gpt_neox_parallel")[0], "dtype": "bfloat16"})
    runs.append({"name": "int8", "path": ref_dir("llama_gqa")[0], "dtype": "float32", "quantize": "int8"})
    runs.append({"name": "no_reduce", "path": ref_dir("gpt2")[0], "dtype": "float32", "no_reduce": True})
    runs.append({"name": "inject", "path": ref_dir("gptj")[0], "dtype": "float32", "inject": True})
    got, got1 = _run_ranks(tmp_path, runs, 2)
    for run in runs[:5]:
        want = _single(run["path"], run["dtype"])
        r = got[run["name"]]
        tol = 1e-5 if run["dtype"] == "float32" else 0.05
        torch.testing.assert_close(r["logits"], want["logits"], rtol=0, atol=tol, msg=run["name"])
        assert r["greedy"] == want["greedy"], run["name"]
    assert got["llama_gqa"]["kv_heads"] == 1       # rank 0's local config: 2 query heads, 1 KV head
    # int8: scales are per output row, so the column-parallel weights (qkv, up) quantize exactly as whole, but the
    # row-parallel ones (out, down) are quantized per rank over their half of each row: the logits agree with the
    # single-process int8 run to within the quantization's own error, and greedy tokens may part at a near-tie
    want = _single(ref_dir("llama_gqa")[0], "float32", "int8")
    exact = got["llama_gqa"]["logits"]
    err_tp, err_one = ((x["logits"] - exact).abs().max().item() for x in (got["int8"], want))
    apart = (got["int8"]["logits"] - want["logits"]).abs().max().item()
    print(f"int8 max |logit error| vs float32: tp=2 {err_tp:.4f}, one process {err_one:.4f}; apart {apart:.4f}")
    assert apart < 0.05 and err_tp < 1.5 * err_one
    assert [g[:4] for g in got["int8"]["greedy"]] == [g[:4] for g in want["greedy"]]
    plain = _single(ref_dir("gpt2")[0], "float32")
    assert (got["no_reduce"]["logits"] - plain["logits"]).abs().max() > 0.1
    line = "rank 1: RuntimeError: injected failure"
    assert got["inject"]["error"] == f"rank 0: {line}" and got1["inject"]["error"] == line


def test_four_ranks_replicate_a_kv_head(ref_dir, tmp_path):
    """llama_gqa has 4 query heads and 2 KV heads: at 4 ranks each holds one query head and a copy of its KV head."""
    path = ref_dir("llama_gqa")[0]
    got = _run_ranks(tmp_path, [{"name": "gqa", "path": path, "dtype": "float32"}], 4)[0]["gqa"]
    want = _single(path, "float32")
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-5)
    assert got["greedy"] == want["greedy"] and got["kv_heads"] == 1


def test_torchrun_cli_generate_matches_one_process(capsys):
    """`torchrun --nproc-per-node 2 -m overspill.cli generate PROMPT --tp 2` prints what one process prints."""
    args = ["generate", "ROMEO:", "-n", "24", "--dtype", "float32", "--seed", "3", "--temperature", "0.8"]
    r = _torchrun(args + ["--tp", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    single = _cli(capsys, args)
    assert r.stdout == single and len(single) > 20


def test_a_layer_store_is_refused_in_one_line(ref_dir, tmp_path):
    from overspill.checkpoint.store import convert

    store = convert(ref_dir("gpt2")[0], str(tmp_path / "store"))
    got = _run_ranks(tmp_path, [{"name": "store", "path": store, "dtype": "auto"}], 2)
    for r, g in enumerate(got):
        assert g["store"]["error"].startswith(f"rank {r}: --tp 2: ") and "layer store" in g["store"]["error"]
