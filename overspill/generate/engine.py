"""Continuous batching: one engine thread, one pass over the weights per step for every running sequence.

    submit(Request) ──► waiting (FCFS, bounded) ──admit: a free cache row──► running
                                                                              │
    step:  every running sequence contributes its next tokens to one ragged forward (Executor.forward_ragged):
           a decoding sequence 1 token, a sequence still in its prompt a chunk of it (the prompt rides the same
           weight pass as the others' next tokens: with streamed weights a pass of its own costs a read of the model)
           ──► logits of each sequence's last token ──► its own sampler, stop check, events on its Handle
           ──► finished or cancelled sequences leave at once and free their row for the next waiting one

Each sequence has its own cache row, length, sampler (seeded generator, penalties) and stop conditions, and its
attention runs alone over its row, so its tokens do not depend on what else runs (float32: bitwise; see
Executor.forward_ragged). Memory: the KV cache is max_batch_size rows of max_seq_len slots, the reserve the model
was loaded with; a step holds at most ``step_tokens`` new tokens (activations within the reserve).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from ..errors import OverspillError
from ..tokenizer import Detokenizer
from .beam import BeamSearch
from .config import GenerationConfig
from .requests import EngineBusy, EngineClosed, Finished, Handle, Request, RequestTooLong, TokenEvent
from .sampling import Sampler


class EngineObserver:
    """Hooks for metrics (no-ops here); called on the engine thread, keep them cheap."""

    def on_step(self, batch_size: int, prompt_tokens: int, decode_tokens: int, seconds: float) -> None:
        pass

    def on_first_token(self, seconds: float) -> None:
        pass

    def on_finish(self, finished: Finished) -> None:
        pass


def check_request(req: Request, vocab: int, max_seq_len: int, max_rows: int = 1 << 30) -> None:
    """One clear line for what a request gets wrong (RequestTooLong names both numbers)."""
    if not req.prompt:
        raise OverspillError("the prompt is empty: give at least one token")
    bad = [t for t in req.prompt if not (isinstance(t, int) and 0 <= t < vocab)]
    if bad:
        raise OverspillError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
    if not isinstance(req.max_tokens, int) or req.max_tokens < 0:
        raise OverspillError(f"max_tokens must be an integer >= 0, got {req.max_tokens!r}")
    import math
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        v = getattr(req, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise OverspillError(f"{name} must be a finite number, got {v!r}")
    if req.seed is not None and (isinstance(req.seed, bool) or not isinstance(req.seed, int)
                                 or not -2**63 <= req.seed < 2**64):
        raise OverspillError(f"seed must be an integer in [-2^63, 2^64), got {req.seed!r}")
    if req.temperature < 0:
        raise OverspillError(f"temperature must be >= 0, got {req.temperature}")
    if req.repetition_penalty <= 0:
        raise OverspillError(f"repetition_penalty must be > 0, got {req.repetition_penalty}")
    if not 0 < req.top_p <= 1:
        raise OverspillError(f"top_p must be in (0, 1], got {req.top_p}")
    if req.top_k < 0:
        raise OverspillError(f"top_k must be >= 0, got {req.top_k}")
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise OverspillError(f"logprobs must be between 0 and 20, got {req.logprobs}")
    need = len(req.prompt) + req.max_tokens
    if need > max_seq_len:
        raise RequestTooLong(f"this request needs {need} tokens (prompt {len(req.prompt)} + max_tokens "
                             f"{req.max_tokens}) but the context holds {max_seq_len}")
    if isinstance(req.num_beams, bool) or not isinstance(req.num_beams, int) or req.num_beams < 1:
        raise OverspillError(f"num_beams must be an integer >= 1, got {req.num_beams!r}")
    if req.num_beams > 1:
        if req.temperature != 0:
            raise OverspillError("beam search is deterministic: use temperature 0 with num_beams > 1")
        if req.logprobs is not None or req.prompt_logprobs or req.presence_penalty or req.frequency_penalty:
            raise OverspillError("num_beams > 1 returns the best hypothesis only: no logprobs, echo or "
                                 "presence/frequency penalties")
        if req.num_beams > max_rows:
            raise RequestTooLong(f"num_beams {req.num_beams} needs a cache row per beam but the engine has "
                                 f"{max_rows}")


class _TextStop:
    """Text deltas of one sequence with its stop strings withheld until they can no longer match (as Model.stream)."""

    def __init__(self, decode, prompt: list[int], stop: list[str]):
        self.detok = Detokenizer(decode, prompt) if decode is not None else None
        self.stop, self.held, self.text = stop, "", ""

    def push(self, tok: int) -> tuple[str, bool]:
        """-> (text to emit now, stopped by a stop string)."""
        if self.detok is None:
            return "", False
        self.held += self.detok.push(tok)
        hits = [i for i in map(self.held.find, self.stop) if i >= 0]
        if hits:
            out, self.held = self.held[: min(hits)], ""
            self.text += out
            return out, True
        keep = max((k for s in self.stop for k in range(len(s), 0, -1) if self.held.endswith(s[:k])), default=0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out):]
        self.text += out
        return out, False

    def flush(self) -> str:
        """At the end (length or a stop id): what was withheld, and a trailing split character."""
        if self.detok is None:
            return ""
        out = self.held + self.detok.flush()
        self.held = ""
        self.text += out
        return out


@dataclass
class _Seq:
    handle: Handle
    req: Request
    row: int
    submitted: float
    sampler: Sampler
    text: _TextStop
    done: int = 0                      # prompt tokens already in the cache
    out: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)   # generated token -> occurrences (penalties)
    first_token_s: float | None = None
    prompt_lp: list | None = None
    prompt_top: list | None = None
    beams: BeamSearch | None = None    # a beam-search request: its beams, each holding a cache row
    spare: list[int] = field(default_factory=list)     # its rows no beam holds

    @property
    def length(self) -> int:           # tokens in the cache
        return self.done + max(0, len(self.out) - 1)


def _sampler(req: Request, vocab: int) -> Sampler:
    seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, ()).item())
    # a temperature this close to 0 overflows logits / temperature: it means greedy
    temperature = req.temperature if req.temperature >= 1e-4 else 0.0
    gc = GenerationConfig(max_new_tokens=max(1, req.max_tokens), temperature=temperature, top_k=req.top_k,
                          top_p=req.top_p, seed=seed, repetition_penalty=req.repetition_penalty)
    return Sampler(gc, 1, vocab, [req.prompt])


def _top(lp: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    v, i = lp.topk(k)
    return list(zip(i.tolist(), v.tolist()))


class Engine:
    """Serves Requests from one thread (``start()``) over a loaded Model; see the module docstring."""

    def __init__(self, model, *, max_batch_size: int | None = None, max_seq_len: int | None = None,
                 max_queue: int = 64, step_tokens: int | None = None, observer: EngineObserver | None = None,
                 pad_to: int | None = None):
        """model: a loaded Model (its executor, config and tokenizer). max_batch_size x max_seq_len: the cache rows
        (default: the reserve the model was loaded with, else 16 x its context); a budgeted model refuses more than
        its reserve. pad_to: the packed batch's row multiple (default 4 where several sequences may share a step:
        batch invariance; 1 for a single row)."""
        ex = model.executor
        reserve = ex.reserve
        cfg = model.config
        if max_batch_size is None:
            max_batch_size = reserve.max_batch if reserve is not None else 16
        if max_seq_len is None and reserve is not None:
            max_seq_len = reserve.max_seq_len
        self.max_seq_len = min(max_seq_len or cfg.max_positions, cfg.max_positions)
        if max_batch_size < 1:
            raise OverspillError("max_batch_size must be at least 1")
        self.pad_to = pad_to or (4 if max_batch_size > 1 else 1)
        self.model, self.ex, self.cfg = model, ex, cfg
        self.max_batch, self.max_queue = max_batch_size, max_queue
        # A step's new tokens. Its blocks run over micro-batches of at most micro_tokens (the activation reserve),
        # so the bound is latency, not memory: where weights stream from disk every pass costs a read of them, and
        # all waiting prompts ride one pass; resident weights cost little to read again, and a step stays about
        # one micro-batch long so running sequences keep their pace while a long prompt is read in.
        micro = ex.head_reserve.micro_tokens
        streams = bool(getattr(ex.source, "streamed", None))
        self.step_tokens = max(max_batch_size, step_tokens or (max_batch_size * self.max_seq_len if streams else micro))
        # Prompts are cut at fixed boundaries (multiples of this, never where a step's budget happened to end), so a
        # prompt's attention is computed over the same chunks whatever else runs; a chunk fits a micro-batch, and
        # beside a decode token of every other row
        self.prefill_chunk = max(1, min(micro, self.step_tokens - (max_batch_size - 1)))
        self.observer = observer or EngineObserver()
        self.decode = model.decode if getattr(model, "tokenizer", None) is not None else None
        self.cache = ex.new_cache(max_batch_size, self.max_seq_len)
        self.free_rows = list(range(max_batch_size))[::-1]
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: list[_Seq] = []
        self.cv = threading.Condition()
        self.accepting, self.stopping = True, False
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.step_ends: collections.deque[float] = collections.deque(maxlen=1 << 16)   # when each step ended

    # -- client side ----------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._run, name="overspill-engine", daemon=True)
        self.thread.start()
        return self

    def submit(self, req: Request) -> Handle:
        check_request(req, self.cfg.vocab_size, self.max_seq_len, self.max_batch)
        h = Handle(req)
        seq = _Seq(h, req, -1, time.perf_counter(), _sampler(req, self.cfg.vocab_size),
                   _TextStop(self.decode, req.prompt, list(req.stop)))
        if req.num_beams > 1:
            seq.beams = BeamSearch(req.prompt, req.num_beams, req.length_penalty, req.repetition_penalty,
                                   set(req.stop_token_ids), list(req.stop), self.decode, self.cfg.vocab_size)
        with self.cv:
            if not self.accepting or self.error is not None:
                raise EngineClosed("the server is shutting down" if self.error is None else
                                   f"the engine stopped: {self.error}")
            if len(self.waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self.waiting)} requests are waiting (the queue holds {self.max_queue}); "
                                 f"retry later")
            self.waiting.append(seq)
            self.cv.notify()
        return h

    def status(self) -> dict:
        with self.cv:
            used = sum(s.length * (len(s.beams.live) if s.beams and s.beams.live[0].tokens else 1)
                       for s in self.running)
            rows = self.max_batch - len(self.free_rows)
            return {"running": len(self.running), "waiting": len(self.waiting), "kv_tokens_used": used,
                    "kv_tokens_total": self.max_batch * self.max_seq_len, "rows_used": rows,
                    "rows_total": self.max_batch}

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop admitting; let running and queued requests finish for up to ``timeout`` s, cancel the rest."""
        with self.cv:
            self.accepting = False
            self.cv.notify()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.cv:
                if not self.running and not self.waiting:
                    break
            time.sleep(0.02)
        with self.cv:
            for s in list(self.waiting) + self.running:
                s.handle.cancel()
            self.stopping = True
            self.cv.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=max(5.0, timeout))

    def step(self) -> bool:
        """Admit what fits and run one step on the calling thread (generate() drives the engine this way, without
        a thread; errors propagate to the caller). False when nothing is running or waiting."""
        with self.cv:
            self._admit()
            if not self.running:
                return False
        self._step()
        return True

    # -- engine thread ---------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self.cv:
                    self._admit()
                    while not self.running and not self.stopping:
                        self.cv.wait(timeout=0.5)
                        self._admit()
                    if self.stopping and not self.running:
                        break
                self._step()
        except BaseException as e:   # the model failed: every request gets the error, new ones are refused
            with self.cv:
                self.error = e
                for s in list(self.waiting) + self.running:
                    self._finish(s, "error", error=str(e))
                self.waiting.clear()
                self.running = []
        finally:
            with self.cv:
                for s in list(self.waiting):
                    self._finish(s, "cancelled")
                self.waiting.clear()

    def _admit(self) -> None:
        """Under the lock: drop cancelled waiting requests; FCFS into free rows."""
        for s in [s for s in self.waiting if s.handle.cancelled.is_set()]:
            self.waiting.remove(s)
            self._finish(s, "cancelled")
        while self.waiting and len(self.free_rows) >= self.waiting[0].req.num_beams:   # FCFS: the head waits
            s = self.waiting.popleft()
            if s.req.max_tokens == 0 and not s.req.prompt_logprobs:
                self._finish(s, "length")
                continue
            s.row = self.free_rows.pop()
            s.spare = [self.free_rows.pop() for _ in range(s.req.num_beams - 1)]
            if s.req.prompt_logprobs:
                s.prompt_lp, s.prompt_top = [None], [None]
            self.running.append(s)

    def _finish(self, s: _Seq, reason: str, error: str | None = None, flush: bool = True) -> None:
        """End a sequence (under the lock): withheld text out (unless a stop string ended it), its row freed."""
        tail = s.text.flush() if flush and reason in ("stop", "length") else ""
        if tail:
            s.handle.put(TokenEvent(-1, tail))
        f = Finished(reason, len(s.req.prompt), len(s.out), s.text.text, list(s.out), error, s.prompt_lp, s.prompt_top,
                     s.first_token_s)
        if s.row >= 0:
            self.free_rows.append(s.row)
            s.row = -1
        if s.beams is not None:                            # every row the request held
            self.free_rows += [b.row for b in s.beams.live if b.row >= 0] + s.spare
            s.spare = []
            for b in s.beams.live:
                b.row = -1
        s.handle.put(f)
        self.observer.on_finish(f)

    def _step(self) -> None:
        with self.cv:
            for s in [s for s in self.running if s.handle.cancelled.is_set()]:
                self.running.remove(s)
                self._finish(s, "cancelled")
            running = list(self.running)
        if not running:
            return
        # decoding sequences first (one token each), then prompt chunks in FCFS order within the token budget
        budget = self.step_tokens
        plan: list[tuple[_Seq, list[int], int, int, int]] = []      # (seq, tokens, first slot, row, beam)
        for s in running:
            if s.done == len(s.req.prompt):
                if s.beams is not None:                    # one token per live beam, each on its own row
                    for k, b in enumerate(s.beams.live):
                        plan.append((s, [b.tokens[-1]], s.done + len(b.tokens) - 1, b.row, k))
                    budget -= len(s.beams.live)
                else:
                    plan.append((s, [s.out[-1]], s.length, s.row, 0))
                    budget -= 1
        for s in running:
            P = len(s.req.prompt)
            n = min(P - s.done, self.prefill_chunk)
            if s.done < P and n <= budget:
                plan.append((s, s.req.prompt[s.done:s.done + n], s.done, s.row, 0))
                budget -= n
        # logits wanted: each segment's last token when it ends the prompt or decodes; every prompt token for
        # prompt log-probabilities
        segments, rows, owners, t = [], [], [], 0
        for s, toks, start, row, k in plan:
            segments.append((row, start, toks))
            n = len(toks)
            ends_prompt = start + n >= len(s.req.prompt)
            if s.prompt_lp is not None and start < len(s.req.prompt):
                for j in range(n):
                    rows.append(t + j)
                    owners.append((s, "prompt", start + j))
            elif ends_prompt:
                rows.append(t + n - 1)
                owners.append((s, "next", k))
            t += n
        nexts: dict[tuple[int, int], torch.Tensor] = {}

        def consume(r0: int, r1: int, logits: torch.Tensor) -> None:
            for j in range(r0, r1):
                s, kind, p = owners[j]
                row = logits[0, j - r0]
                if kind == "prompt" and p + 1 < len(s.req.prompt):   # position p predicts prompt token p + 1
                    lps = row.log_softmax(-1)
                    s.prompt_lp.append(float(lps[s.req.prompt[p + 1]]))
                    s.prompt_top.append(_top(lps, s.req.logprobs or 0))
                else:                                      # the last prompt position or a decode token: the next one
                    nexts[(id(s), 0 if kind == "prompt" else p)] = row.clone()

        t0 = time.perf_counter()
        # a pass whose every sequence was cancelled stops at the next block (a streamed pass takes seconds); one
        # with a live sequence runs on, and the cancelled ones leave after it
        everyone_gone = lambda: all(s.handle.cancelled.is_set() for s, *_ in plan)
        if not self.ex.forward_ragged(segments, self.cache, rows, consume, self.pad_to, abort=everyone_gone):
            return                                         # the next step drops them
        dt = time.perf_counter() - t0
        self.step_ends.append(time.perf_counter())
        n_prompt = sum(len(toks) for s, toks, start, *_ in plan if start < len(s.req.prompt))
        self.observer.on_step(len(plan), n_prompt, len(plan) - sum(1 for s, toks, start, *_ in plan
                                                                   if start < len(s.req.prompt)), dt)
        now = time.perf_counter()
        with self.cv:
            for s, toks, start, _, k in plan:
                if s.beams is not None:
                    if k == 0 and self._beam_step(s, toks, start, nexts, now):
                        self.running.remove(s)
                    continue
                if start < len(s.req.prompt):
                    s.done = start + len(toks)
                    if s.done < len(s.req.prompt):
                        continue                           # more prompt next step
                    if s.req.max_tokens == 0:              # scoring only
                        self.running.remove(s)
                        self._finish(s, "length")
                        continue
                logits = nexts.get((id(s), 0))
                if logits is None:
                    continue
                try:
                    done = self._sample(s, logits, now)
                except Exception as e:   # one request's sampling fails alone (the model is fine)
                    self._finish(s, "error", error=f"sampling failed: {e}")
                    done = True
                if done:
                    self.running.remove(s)

    def _beam_step(self, s: _Seq, toks: list[int], start: int, nexts: dict, now: float) -> bool:
        """After a pass, a beam-search request (under the lock): its next generation, rows placed (a beam that is
        not the first to continue its source gets a row with the source's slots copied in); True when it ended."""
        bs, P = s.beams, len(s.req.prompt)
        if start < P:
            s.done = start + len(toks)
            if s.done < P:
                return False                               # more prompt next step
        logits = [nexts.get((id(s), k)) for k in range(len(bs.live))]
        if any(x is None for x in logits):
            return False
        try:
            old = [s.row] if not bs.live[0].tokens else [b.row for b in bs.live]
            src = bs.advance(torch.stack(logits))
            copies = bs.place(src, old, s.spare)
            s.row = -1                                     # the beams hold the rows now
            if copies:
                end = s.done + len(bs.live[0].tokens) - 1  # the sources' slots: prompt and all but the new token
                self.cache.copy_rows([a for a, _ in copies], [b for _, b in copies], end)
        except Exception as e:
            self._finish(s, "error", error=f"beam search failed: {e}")
            return True
        if s.first_token_s is None:
            s.first_token_s = now - s.submitted
            self.observer.on_first_token(s.first_token_s)
        gen = len(bs.live[0].tokens) if bs.live else s.req.max_tokens
        if not bs.done and gen < s.req.max_tokens and s.done + gen < self.max_seq_len:
            return False
        _, best, cut = bs.best()
        for tok in best:                                   # the best hypothesis, as the request's tokens
            s.out.append(tok)
            if tok in s.req.stop_token_ids:
                break
            text, stopped = s.text.push(tok)
            s.handle.put(TokenEvent(tok, text))
            if stopped:
                break
        ended = cut is not None or (best and best[-1] in s.req.stop_token_ids)
        self._finish(s, "stop" if ended else "length", flush=cut is None)
        return True

    def _sample(self, s: _Seq, logits: torch.Tensor, now: float) -> bool:
        """Choose the sequence's next token, emit it; True when the sequence is done (and finished)."""
        req = s.req
        raw = logits
        if s.counts and (req.presence_penalty or req.frequency_penalty):
            ids = torch.tensor(list(s.counts), dtype=torch.long)
            c = torch.tensor(list(s.counts.values()), dtype=torch.float32)
            logits = logits.clone()
            logits[ids] -= c * req.frequency_penalty + req.presence_penalty
        tok = int(s.sampler.choose(logits[None])[0])
        s.counts[tok] = s.counts.get(tok, 0) + 1
        s.out.append(tok)
        if s.first_token_s is None:
            s.first_token_s = now - s.submitted
            self.observer.on_first_token(s.first_token_s)
        if tok in req.stop_token_ids:
            self._finish(s, "stop")
            return True
        lp = top = None
        if req.logprobs is not None:
            lps = raw.log_softmax(-1)
            lp, top = float(lps[tok]), _top(lps, req.logprobs)
        text, stopped = s.text.push(tok)
        s.handle.put(TokenEvent(tok, text, lp, top))
        if stopped:
            self._finish(s, "stop", flush=False)
            return True
        if len(s.out) >= req.max_tokens or s.done + len(s.out) >= self.max_seq_len:
            self._finish(s, "length")
            return True
        return False
