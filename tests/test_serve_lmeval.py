"""lm-evaluation-harness scores text through the server (its `local-completions` model: echo + logprobs over token
ids) exactly as its `hf` model scores the same checkpoint with transformers."""
import os
import shutil

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")

from _serve_util import live_server  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random GPT-NeoX with the built-in model's tokenizer, saved by transformers (float32)."""
    import transformers

    from overspill.api import default_model_path
    d = tmp_path_factory.mktemp("lmeval") / "neox"
    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, rotary_pct=0.25, max_position_embeddings=256,
                                     bos_token_id=0, eos_token_id=0)
    transformers.GPTNeoXForCausalLM(cfg).eval().save_pretrained(d)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(default_model_path(), "tokenizer.json"),
                                               eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(d)
    shutil.copy(os.path.join(default_model_path(), "tokenizer.json"), d / "tokenizer.json")
    return d


def _requests():
    from lm_eval.api.instance import Instance
    pairs = [("ROMEO:\nBut soft, what light", " through yonder window breaks?"),
             ("JULIET:\n", "O Romeo, Romeo!"),
             ("First Citizen:\nBefore we proceed any further,", " hear me speak.")]
    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


def test_local_completions_scores_equal_hf(ckpt):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    hf = HFLM(pretrained=str(ckpt), dtype="float32", batch_size=1, device="cpu")
    want = hf.loglikelihood(_requests())
    with live_server(model=str(ckpt), dtype="float32", served_model_name="neox") as s:
        api = LocalCompletionsAPI(base_url=s.url + "/v1/completions", model="neox", tokenizer_backend="huggingface",
                                  tokenizer=str(ckpt), tokenized_requests=True, num_concurrent=1, max_retries=1)
        got = api.loglikelihood(_requests())
    assert len(got) == len(want) == 3
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4), (got, want)
        assert g_greedy == w_greedy
