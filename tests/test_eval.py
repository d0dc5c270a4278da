"""Perplexity: the eval command agrees with a direct exp(mean cross-entropy)."""
import json
import math
import subprocess
import sys

import torch
import torch.nn.functional as F

import overspill
from overspill.evaluate import perplexity


def test_perplexity_equals_direct_computation():
    m = overspill.load(dtype="float32")
    text = open(overspill.default_model_path() + "/heldout.txt").read()[:600]
    ids = m.encode(text)
    assert 100 < len(ids) <= 256   # within the 256-token windows the model was trained on
    logits = m.logits(torch.tensor([ids]))[0, :-1]
    direct = math.exp(F.cross_entropy(logits, torch.tensor(ids[1:])).item())
    r = perplexity(m, ids, context=512, stride=512)
    assert r["tokens"] == len(ids) - 1
    assert abs(r["perplexity"] - direct) / direct < 1e-5
    # A sliding window with overlap scores every token once, each with some left context.
    r2 = perplexity(m, ids, context=96, stride=48)
    assert r2["tokens"] == len(ids) - 1
    assert direct * 0.8 < r2["perplexity"] < direct * 1.5   # less context: similar, usually a bit worse


def test_eval_cli_matches_api(tmp_path):
    text = open(overspill.default_model_path() + "/heldout.txt").read()[:600]
    f = tmp_path / "t.txt"
    f.write_text(text)
    r = subprocess.run([sys.executable, "-m", "overspill.cli", "eval", "--text", str(f), "--context", "512",
                        "--stride", "512", "--dtype", "float32", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    m = overspill.load(dtype="float32")
    want = perplexity(m, m.encode(text), 512, 512)
    assert abs(got["perplexity"] - want["perplexity"]) < 1e-6 * want["perplexity"]


def test_eval_missing_file_is_one_line():
    r = subprocess.run([sys.executable, "-m", "overspill.cli", "eval", "--text", "/nope.txt"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "/nope.txt: cannot read" in r.stderr and "Traceback" not in r.stderr
