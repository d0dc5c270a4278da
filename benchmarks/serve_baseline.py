"""The baseline server of bench_serve.py: transformers' `generate` on a model offloaded by accelerate, behind the same
OpenAI /v1/completions streaming subset that `overspill serve` and llama-server speak, so one client drives all three.

    GET  /health            503 while the model loads, 200 once it is ready
    POST /v1/completions    prompt: token ids (a list, or one list in a list; text where the model directory has a
                            tokenizer.json), max_tokens, temperature (0: greedy), ignore_eos, stream, stream_options
                            {include_usage}; one choice. SSE: one `data:` chunk per token, a final chunk with
                            finish_reason, a usage chunk when asked, then `data: [DONE]`.

The model is loaded as bench_offload.py's accelerate side loads it: AutoModelForCausalLM.from_pretrained(dtype,
device_map="auto", max_memory={"cpu": BUDGET}, offload_folder=a temp dir). Requests are served one at a time
(a single generation thread; the others wait in its queue): that is what `generate` on one offloaded model does.
A client that goes away stops its generation at the next token.

    .venv/bin/python benchmarks/serve_baseline.py --model bench-cache/gptj-6b-bfloat16 --max-memory cpu=4GiB --port 8100
"""

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor


def parse_max_memory(s: str) -> dict:
    """'cpu=4GiB' (or '4GiB') -> {"cpu": "4GiB"}, the form accelerate takes."""
    out = {}
    for part in s.split(","):
        dev, _, size = part.strip().rpartition("=")
        out[dev or "cpu"] = size
    return out


class State:
    def __init__(self):
        self.model = None
        self.tokenizer = None
        self.error: str | None = None
        self.ready = False
        self.offload: str | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")   # one request at a time


def load(a: argparse.Namespace, st: State) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        st.offload = tempfile.mkdtemp(prefix="offload-", dir=a.offload_dir)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype), device_map="auto",
                                                     max_memory=parse_max_memory(a.max_memory),
                                                     offload_folder=st.offload)
        model.eval()
        tok = os.path.join(a.model, "tokenizer.json")
        if os.path.exists(tok):
            from tokenizers import Tokenizer
            st.tokenizer = Tokenizer.from_file(tok)
        st.model = model
        st.ready = True
        dmap = getattr(model, "hf_device_map", None) or {}
        on_disk = sum(v == "disk" for v in dmap.values())
        print(f"baseline: {a.model} loaded in {time.perf_counter() - t0:.1f} s ({on_disk} of {len(dmap)} modules "
              f"offloaded to disk, {torch.get_num_threads()} threads)", file=sys.stderr, flush=True)
    except Exception as e:   # noqa: BLE001 - /health reports it and the server exits
        st.error = f"{type(e).__name__}: {e}"
        print(f"baseline: loading failed: {st.error}", file=sys.stderr, flush=True)
        os._exit(2)


def generate(st: State, ids: list[int], max_tokens: int, temperature: float, ignore_eos: bool, put, gone) -> None:
    """Runs on the generation thread: `put(token_id)` per new token, `put(None)` at the end (or `put(exc)`)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class Push(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:   # generate hands the prompt over first
                self.prompt_seen = True
                return
            for t in value.reshape(-1).tolist():
                put(int(t))

        def end(self):
            pass

    class Gone(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), gone.is_set(), dtype=torch.bool)

    try:
        model = st.model
        x = torch.tensor([ids])
        gc = model.generation_config
        pad = gc.pad_token_id if gc.pad_token_id is not None else gc.eos_token_id
        pad = (pad[0] if isinstance(pad, list) else pad) or 0
        kw = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        if ignore_eos:
            kw["min_new_tokens"] = max_tokens
        with torch.inference_mode():
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, num_beams=1,
                           use_cache=True, pad_token_id=pad, streamer=Push(),
                           stopping_criteria=StoppingCriteriaList([Gone()]), **kw)
        put(None)
    except Exception as e:   # noqa: BLE001 - reported to the client
        put(e)


def make_app(a: argparse.Namespace, st: State):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load, args=(a, st), daemon=True, name="load").start()
        yield
        st.pool.shutdown(wait=False, cancel_futures=True)
        if st.offload:
            shutil.rmtree(st.offload, ignore_errors=True)

    app = FastAPI(lifespan=lifespan)
    name = os.path.basename(os.path.normpath(a.model))

    def error(status: int, msg: str, param: str | None = None):
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error", "param": param,
                                       "code": None}}, status_code=status)

    @app.get("/health")
    async def health():
        if st.ready:
            return {"status": "ok"}
        return JSONResponse({"status": "failed" if st.error else "loading", "error": st.error}, status_code=503)

    def token_text(t: int) -> str:
        return " " + st.tokenizer.decode([t]) if st.tokenizer is not None else f" <t{t}>"

    @app.post("/v1/completions")
    async def completions(request: Request):
        if not st.ready:
            return error(503, "the model is still loading")
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return error(400, "the body is not JSON")
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], list):
            p = p[0]
        if isinstance(p, str):
            if st.tokenizer is None:
                return error(400, "this model has no tokenizer.json: send token ids", "prompt")
            p = st.tokenizer.encode(p).ids
        if not (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
            return error(400, "prompt: one prompt, as token ids (or text where the model has a tokenizer)", "prompt")
        if int(body.get("n", 1)) != 1:
            return error(400, "n: only 1", "n")
        max_tokens = int(body.get("max_tokens") or 16)
        temperature = float(body.get("temperature", 1.0))
        ignore_eos = bool(body.get("ignore_eos", False))
        stream = bool(body.get("stream", False))
        usage_chunk = stream and bool((body.get("stream_options") or {}).get("include_usage"))

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()
        st.pool.submit(generate, st, p, max_tokens, temperature, ignore_eos,
                       lambda item: loop.call_soon_threadsafe(queue.put_nowait, item), gone)
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

        def chunk(text: str, finish: str | None) -> bytes:
            d = {"id": rid, "object": "text_completion", "created": created, "model": name,
                 "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            return b"data: " + json.dumps(d).encode() + b"\n\n"

        async def events():
            n = 0
            try:
                while True:
                    item = await queue.get()
                    if item is None:
                        break
                    if isinstance(item, Exception):
                        yield b"data: " + json.dumps({"error": {"message": f"generation failed: {item}",
                                                                "type": "server_error"}}).encode() + b"\n\n"
                        return
                    n += 1
                    yield chunk(token_text(item), None)
                yield chunk("", "length" if n >= max_tokens else "stop")
                if usage_chunk:
                    u = {"prompt_tokens": len(p), "completion_tokens": n, "total_tokens": len(p) + n}
                    yield b"data: " + json.dumps({"id": rid, "object": "text_completion", "created": created,
                                                  "model": name, "choices": [], "usage": u}).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                gone.set()   # a client that left stops its generation at the next token

        if stream:
            return StreamingResponse(events(), media_type="text/event-stream")
        text, n = "", 0
        while (item := await queue.get()) is not None:
            if isinstance(item, Exception):
                return error(500, f"generation failed: {item}")
            text, n = text + token_text(item), n + 1
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": "length" if n >= max_tokens else "stop"}],
                "usage": {"prompt_tokens": len(p), "completion_tokens": n, "total_tokens": len(p) + n}}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-memory", default="cpu=4GiB", help="accelerate's max_memory, as 'cpu=4GiB'")
    p.add_argument("--offload-dir", default=None, help="where the temporary offload_folder goes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    a = p.parse_args(argv)
    import torch
    import uvicorn

    if a.threads:
        torch.set_num_threads(a.threads)
    uvicorn.run(make_app(a, State()), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
