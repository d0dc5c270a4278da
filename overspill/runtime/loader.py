"""Build an executor from a checkpoint (HF directory or layer store), a dtype, a quantization
scheme and memory budgets: size every unit, plan placement, load resident units, stream the rest."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import OverspillError
from ..model.kv_cache import KVCache
from ..model.linear import BlockedLinear, DenseLinear, blocked_available
from ..model.weights import EmbedWeights, MakeLinear, bind, default_make_linear, units
from .executor import Executor
from .io import trim_heap
from .rows import RowTable
from .sources import ResidentSource
from .streaming import HFUnitReader, HostUnitReader, MixedReader, StoreUnitReader, StreamingSource, dense_streamed
from .transfer import DeviceCopier, map_tensors, pack


@dataclass
class Reserve:
    """What the runtime must hold besides weights, for the largest request it will accept.

    A forward over B sequences of T tokens runs each block over micro-batches of max(1, micro_tokens // T)
    sequences (FlexGen's block schedule: the block's weights serve every micro-batch before the next block), so
    a large prompt batch needs activations for about micro_tokens tokens, not B x T."""
    max_batch: int = 1
    max_seq_len: int = 1024
    micro_tokens: int = 1024
    kv_format: str | None = None      # None: the compute dtype; "int8": model/kv_cache.QuantKV

    def kv_bytes_per_block(self, cfg: ModelConfig, dtype: torch.dtype) -> int:
        return KVCache.nbytes_for(cfg, self.max_batch, self.max_seq_len, dtype, self.kv_format) // cfg.n_layers

    def micro_batch(self, T: int) -> int:
        """Sequences per micro-batch for a forward over T new tokens."""
        return max(1, self.micro_tokens // max(1, T))

    def activation_bytes(self, cfg: ModelConfig, dtype: torch.dtype) -> int:
        """Peak transient tensors of one block over the largest micro-batch (rows x T tokens, T up to max_seq_len):
        residual, norm output, qkv, attention output and scores, MLP hidden (x2 for a gated MLP), plus the whole
        batch's hidden state and fp32 last-token logits."""
        L = self.max_seq_len
        tok = max(min(self.max_batch * L, self.micro_tokens), L)     # rows * T over every T <= L
        es = torch.empty((), dtype=dtype).element_size()
        per_tok = (3 * cfg.hidden_size + cfg.q_size + 2 * cfg.kv_size + 2 * cfg.intermediate_size * (2 if cfg.gated_mlp else 1)) * es
        scores = tok * cfg.n_heads * L * 4 if L > 1 else 0
        batch_x = 2 * self.max_batch * L * cfg.hidden_size * es       # the batch's hidden state, in and out
        logits = self.max_batch * cfg.vocab_size * 4 * 2
        # an int8 cache is read back dequantized: one micro-batch's keys and values over all L slots
        kv_read = 2 * min(self.max_batch, self.micro_tokens) * L * cfg.kv_size * es if self.kv_format else 0
        return tok * per_tok + scores + batch_x + logits + kv_read


def _es(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# raw canonical names (before fusing) of the tensors that become block matmul weights
_RAW_LINEAR_PARTS = {"q", "k", "v", "qkv", "qkv_neox", "gate", "up", "out", "down"}


def unit_weight_bytes(src, cfg: ModelConfig, unit: str, dtype: torch.dtype, quantize: str | None,
                      quantize_head: bool = False) -> int:
    """Bytes a unit's weights occupy, from shapes only (quantize_head: the LM head in the scheme too; with tied
    embeddings that is a quantized copy beside the embedding table)."""
    if hasattr(src, "unit_bytes"):                 # a layer store knows exactly
        return src.unit_bytes(unit)
    from .. import quant

    total = 0
    for name, canon in src.unit_names(unit).items():
        shape = src.shape(name)
        n = math.prod(shape)
        lin = canon.split(".")[0]
        if quantize and canon.endswith(".weight") and lin in _RAW_LINEAR_PARTS and unit.startswith("block."):
            continue                                  # counted from the fused canonical shape below
        total += n * _es(dtype)
    if quantize and unit.startswith("block."):
        C, F = cfg.hidden_size, cfg.intermediate_size
        shapes = {"qkv": (cfg.q_size + 2 * cfg.kv_size, C), "out": (C, cfg.q_size),
                  "up": ((2 if cfg.gated_mlp else 1) * F, C), "down": (C, F)}
        total += sum(quant.quantized_nbytes(quantize, n, k) for n, k in shapes.values())
    if quantize and quantize_head and unit == "head":
        total -= sum(math.prod(src.shape(name)) * _es(dtype) for name, canon in src.unit_names(unit).items()
                     if canon == "lm.weight")
        total += quant.quantized_nbytes(quantize, cfg.vocab_size, cfg.hidden_size)
    return total


def unit_matmul_params(cfg: ModelConfig, unit: str) -> int:
    """Weights a token multiplies by in this unit (2 flops each): the block linears, the LM head; 0 for the embedding."""
    C, F = cfg.hidden_size, cfg.intermediate_size
    if unit.startswith("block."):
        return (cfg.q_size + 2 * cfg.kv_size) * C + C * cfg.q_size + (3 if cfg.gated_mlp else 2) * F * C
    return cfg.vocab_size * C if unit == "head" else 0


def _check_quantize_head(quantize: str | None, quantize_head: bool) -> None:
    if quantize_head and not quantize:
        raise OverspillError("--quantize-head / quantize_head=True needs a scheme: add --quantize int8|int4|int8-dynamic|nf4")


def open_source(path: str, dtype, quantize: str | None):
    """-> (source: LayerStore | HFCheckpoint, is_store, dtype, quantize) with dtype/scheme checked against a store."""
    from ..checkpoint.hf import HFCheckpoint
    from ..checkpoint.store import LayerStore, is_layer_store

    if is_layer_store(path):
        store = LayerStore(path)
        if isinstance(dtype, str) and dtype not in ("auto", str(store.dtype).replace("torch.", "")):
            raise OverspillError(f"{path}: this layer store holds {store.dtype}; convert again for dtype {dtype}")
        if quantize and quantize != store.quantize:
            raise OverspillError(f"{path}: this layer store holds {store.quantize or 'unquantized'} weights; "
                                 f"convert again with --quantize {quantize}")
        return store, True, store.dtype, store.quantize
    from ..api import resolve_dtype

    ckpt = HFCheckpoint(path)
    return ckpt, False, resolve_dtype(dtype, ckpt), quantize


def embed_rows(src, cfg: ModelConfig):
    """(file, offset, stored dtype, [V, C]) of the token table when a streamed embedding can read just the rows it
    needs (runtime/rows.py): an untied table, alone in its unit, at a fixed place in a file; else None."""
    if cfg.tie_embeddings:
        return None
    is_store = hasattr(src, "unit_bytes")
    names = src.tensor_names("embed") if is_store else list(src.unit_names("embed").values())
    if names != ["tok.weight"]:
        return None
    loc = src.tensor_location("embed", "tok.weight")
    from ..checkpoint.hf import canonical_shapes
    # a shape that disagrees with config.json: the unit's normal read reports it
    return loc if loc is not None and loc[3] == canonical_shapes(cfg, "embed")["tok.weight"] else None


def make_plan(src, cfg: ModelConfig, dt: torch.dtype, quantize: str | None, budgets: dict[str, int],
              reserve: Reserve, ring_slots: int = 2, quantize_head: bool = False):
    """The placement for this source. Streaming straight from a Hugging Face directory holds one more unit than
    the ring: a fetch reads the unit's raw tensors and fuses them (qkv, gate/up) into new ones, while the other
    slot's unit stays alive, so the plan counts ring_slots + 1 staging slots there (a layer store reads into the
    preallocated slots, already fused)."""
    from ..placement import UnitCost, plan_placement

    is_store = hasattr(src, "unit_bytes")   # a LayerStore, not an HFCheckpoint
    if not is_store:
        ring_slots += 1

    kv = reserve.kv_bytes_per_block(cfg, dt)
    costs = []
    for u in units(cfg):
        w = unit_weight_bytes(src, cfg, u, dt, quantize, quantize_head)
        # what a streamed fetch reads and holds: an HF directory quantizing on the fly reads the stored weights
        read = unit_weight_bytes(src, cfg, u, dt, None) if quantize and not is_store else w
        # CPU-only plans stream the table from disk by rows; with accelerators it may be held in host RAM and copied
        # whole (the loader reads rows only for a table whose home is disk), so it is counted whole there
        rows = embed_rows(src, cfg) if u == "embed" and set(budgets) <= {"cpu", "disk"} else None
        if rows is not None:   # streamed, it reads a decode step's rows, not the table
            read = reserve.max_batch * rows[3][1] * rows[2].itemsize
        if u == "head" and cfg.tie_embeddings and is_store and \
                not any(n == "lm.weight" or n.startswith("lm.q.") for n in src.tensor_names(u)):
            # a tied store's head multiplies by the embedding table: resident or streamed beside a streamed
            # embedding, it reads and holds its own copy (over-counted by the table when the embedding is resident)
            table = src.unit_bytes("embed")
            w, read = w + table, read + table
        costs.append(UnitCost(u, w, kv if u.startswith("block.") else 0, read, params=unit_matmul_params(cfg, u)))
    return plan_placement(costs, budgets, activation_bytes=reserve.activation_bytes(cfg, dt), ring_slots=ring_slots)


def plan_for(path: str, dtype, quantize: str | None, budgets: dict[str, int], reserve: Reserve,
             quantize_head: bool = False):
    src, is_store, dt, quantize = open_source(path, dtype, quantize)
    _check_quantize_head(quantize, quantize_head)
    return make_plan(src, src.config, dt, quantize, budgets, reserve, quantize_head=quantize_head and not is_store), src


# Planned device -> the device that stands in for it, e.g. {"cuda:0": "cpu"}: runs a GPU plan's code paths
# (accelerator-resident units, host->device copies, activations between devices) on a machine without one. Tests.
DEVICE_ALIAS: dict[str, str] = {}


def _unit_devices(plan, quantize: str | None) -> list[torch.device]:
    """Where each unit computes (after DEVICE_ALIAS), checked against this torch build."""
    devs = [torch.device(DEVICE_ALIAS.get(p.device, p.device)) for p in plan.placements]
    accel = sorted({str(d) for d in devs if d.type != "cpu"})
    if accel:
        cuda = [d for d in devs if d.type == "cuda"]
        if cuda and not torch.cuda.is_available():
            raise OverspillError(f"the memory plan places units on {', '.join(accel)} but this torch "
                                 f"({torch.__version__}) sees no CUDA device; drop the cuda budgets or install a CUDA "
                                 f"build of torch")
        n = torch.cuda.device_count() if cuda else 0
        missing = sorted({str(d) for d in cuda if (d.index or 0) >= n})
        if missing:
            raise OverspillError(f"the memory plan places units on {', '.join(missing)} but this machine has {n} CUDA "
                                 f"device(s) (cuda:0..cuda:{n - 1}); fix the --max-memory budgets")
        if quantize:
            raise OverspillError(f"quantized weights ({quantize}) run on the CPU kernels only; the plan places units "
                                 f"on {', '.join(accel)}: drop --quantize or the accelerator budgets")
    return devs


def build(path: str, dtype: torch.dtype | str, quantize: str | None, max_memory: dict[str, int] | None,
          reserve: Reserve, make_linear: MakeLinear | None = None, ring_slots: int = 2, quantize_head: bool = False):
    """-> (config, executor, plan or None, source object (HFCheckpoint | LayerStore)).
    quantize_head applies to on-the-fly quantization; a layer store holds its head as it was converted.

    With accelerator budgets, units resident on an accelerator are loaded there; units the plan streams to one
    (from host RAM, tier "stream" home "cpu", or from disk) are copied there for every forward by the streaming
    reader (runtime/transfer.py), through pinned host buffers; activations, not weights, cross devices."""
    src, is_store, dt, quantize = open_source(path, dtype, quantize)
    _check_quantize_head(quantize, quantize_head)
    quantize_head = bool(quantize and quantize_head and not is_store)
    store = src if is_store else None
    cfg = src.config
    names = units(cfg)
    plan = None
    streamed: list[int] = []
    devs = [torch.device("cpu")] * len(names)
    homes = ["cpu"] * len(names)
    if max_memory is not None:
        plan = make_plan(src, cfg, dt, quantize, max_memory, reserve, ring_slots, quantize_head)
        streamed = [i for i, p in enumerate(plan.placements) if p.tier == "stream"]
        devs = _unit_devices(plan, quantize)
        homes = [p.home for p in plan.placements]
    if quantize and make_linear is None:
        from ..api import quantized_make_linear
        make_linear = quantized_make_linear(quantize, include_head=quantize_head)
    make_linear = make_linear or default_make_linear
    cpu = torch.device("cpu")
    pin = any(d.type == "cuda" for d in devs)

    resident = {}
    rows = embed_rows(src, cfg) if 0 in streamed and homes[0] == "disk" else None
    if rows is not None:   # the token table stays on disk: each forward reads its ids' rows (runtime/rows.py)
        resident[0] = EmbedWeights(RowTable(*rows, dt))
        streamed.remove(0)
    # a tied head shares the embedding table only on the embedding's own device (elsewhere it reads its own copy)
    on = lambda d: {k: w for k, w in resident.items() if devs[k] == d}
    for i, u in enumerate(names):
        if i in streamed or i in resident:
            continue
        if devs[i] == cpu:
            resident[i] = _load_unit(src, store, cfg, u, dt, make_linear, on(cpu), quantize_head)
            trim_heap()   # the unit's temporaries: freed, and now out of RSS too
        elif store is not None:   # straight from the read buffer to the device (no host clone)
            t = map_tensors(store.read_unit(u), lambda x: x.to(devs[i]))
            resident[i] = _bind_store_unit(store, cfg, u, t, dense_streamed, on(devs[i]))
        else:
            resident[i] = map_tensors(_load_unit(src, store, cfg, u, dt, dense_streamed, on(devs[i]), quantize_head),
                                      lambda x: x.to(devs[i]))
    # units held in host RAM and computed on an accelerator (tier "stream", home "cpu"): dense, each packed into one
    # exactly-sized pinned buffer (the reader's copies from it are asynchronous)
    host, host_bufs = {}, []
    for i in streamed:
        if homes[i] == "cpu":
            host[names[i]], buf = pack(_load_unit(src, store, cfg, names[i], dt, dense_streamed, on(cpu), quantize_head), pin)
            host_bufs.append(buf)
    if streamed:
        stream_dev = devs[streamed[0]]
        if store is not None:
            reader = StoreUnitReader(store)
            disk_make = lambda unit, t: _bind_store_unit(store, cfg, unit, t, dense_streamed, on(stream_dev))
        else:
            reader = HFUnitReader(src, dt)
            qmake = make_linear if quantize else dense_streamed
            disk_make = lambda unit, t: bind(cfg, unit, src.finish(unit, t), qmake)
        if host:
            host_reader = HostUnitReader(host)
            reader = MixedReader({names[i]: host_reader if names[i] in host else reader for i in streamed})
        make_w = lambda unit, t: t if unit in host else disk_make(unit, t)
        # streamed units computing on an accelerator are copied there by the reader thread
        copier = DeviceCopier(stream_dev) if plan.compute_device not in (None, "cpu") else None
        source = StreamingSource(cfg, resident, streamed, names, reader, make_w, ring_slots, pin=pin, copier=copier)
        source.pinned = host_bufs
    else:
        source = ResidentSource([resident[i] for i in range(len(names))])
    if store is None and not streamed:
        src.close()   # a streaming source keeps reading from it
    return cfg, Executor(cfg, source, dt, unit_devices=[str(d) for d in devs]), plan, src


def _load_unit(src, store, cfg, unit, dt, make_linear, resident, quantize_head=False):
    if store is not None:
        # A fresh read buffer per unit. Quantized linears keep views of it and convert their bytes to the kernels'
        # layouts in place (repack="inplace" below): those bytes stay in use, nothing is copied. A dense matmul weight
        # is re-laid out into a copy, so no other view may keep the buffer alive after that: 1-D tensors (norms,
        # biases) get their own memory (dense stores: every tensor, as their linears all copy).
        t = store.read_unit(unit)
        t = {k: v.clone() if store.quantize is None or (".q." not in k and v.dim() <= 1) else v for k, v in t.items()}
        return _bind_store_unit(store, cfg, unit, t, make_linear, resident)
    if unit == "head" and cfg.tie_embeddings and 0 in resident:
        t = src.read_unit_except(unit, dt, "lm.weight")
        bias = t.pop("lm.bias", None)
        # share, don't copy, the embedding; a quantized head is its own (smaller) copy
        t["lm"] = make_linear("lm", resident[0].tok, bias) if quantize_head else DenseLinear(resident[0].tok, bias)
        return bind(cfg, unit, t, make_linear)
    return bind(cfg, unit, src.read_unit(unit, dt), make_linear)


def _bind_store_unit(store, cfg, unit, t, make_linear, resident):
    from .. import quant
    from ..checkpoint.store import split_quantized

    plain, q = split_quantized(t)
    # Convert to the kernels' layouts in place: streamed units' tensors live in the staging buffer, resident units'
    # in their own read buffer (_load_unit). No second copy of a weight at any time, and streamed units run the same
    # kernels (so give the same logits) as resident ones.
    for lin, tensors in q.items():
        plain[lin] = quant.make_linear(store.quantize, tensors, plain.pop(f"{lin}.bias", None), repack="inplace")
    if unit == "head" and cfg.tie_embeddings and "lm.weight" not in plain and "lm" not in plain:
        # the embedding's table where it is resident on this unit's device, else this unit's own copy of it
        dev = next(iter(t.values())).device if t else torch.device("cpu")
        tok = resident[0].tok if 0 in resident else store.read_unit("embed")["tok.weight"].to(dev, copy=True)
        plain["lm"] = DenseLinear(tok, plain.pop("lm.bias", None))
    w = plain.get("lm.weight")
    if store.quantize and make_linear is not dense_streamed and w is not None and blocked_available(w) and w.is_contiguous():
        # a dense head beside quantized blocks, in this unit's own read buffer: block it in place (the copy that
        # dense_linear makes would briefly double it: 0.4 GB for GPT-J-6B, over a 4 GiB budget)
        plain["lm"] = BlockedLinear.from_blocked_(w, plain.pop("lm.bias", None))
        del plain["lm.weight"]
    return bind(cfg, unit, plain, make_linear)
