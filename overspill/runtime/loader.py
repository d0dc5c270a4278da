"""Build an executor from a checkpoint, in five steps, each a function of its own:

    path ──open_source──► Source: an HF directory or a layer store, its dtype and weight scheme
         ──unit_costs───► what each unit holds and reads (bytes, from shapes only)
         ──make_plan────► Plan {unit: tier, device, home}          (placement/ plans from the costs)
         ──unit_devices─► where each unit computes, checked against this torch build
         ──wire─────────► resident units, host-held units, a streaming source for the rest ──► Executor

Weight formats (dense, blocked bf16, int8, int4, ...) are chosen here from the dtype and scheme; a ``LinearHook``
(LoRA, tests) is applied to every unit's linears on every tier: resident on the CPU or an accelerator, held in host
RAM, streamed from disk. Quantized units computing on an accelerator hold their stored tensors there (quantized on
the CPU first when the source is an HF directory) and run quant's portable path (dequantize one weight at a time).
"""
from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from ..config import ModelConfig
from ..errors import OverspillError
from ..io import ALIGN, DirectFile, read_pool, trim_heap
from ..kernels import bf16_native, panel_empty
from ..model.linear import BlockedLinear, BlockedOnDemand, DenseLinear, blocked_available, dense_linear, \
    dense_linear_copies
from ..model.weights import LinearHook, MakeLinear, Weights, bind, hook_linears, linear_names, linear_shapes, units
from .background import BackgroundLoad
from .executor import Executor
from .reserve import Reserve
from .rows import RowTable
from .sources import ResidentSource
from .streaming import HFUnitReader, HostUnitReader, MixedReader, StoreUnitReader, StreamingSource, dense_streamed
from .transfer import DeviceCopier, map_tensors, pack

__all__ = ["Reserve", "Source", "Built", "DTYPES", "resolve_dtype", "open_source", "unit_weight_bytes",
           "unit_matmul_params", "make_plan", "plan_for", "build"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, ckpt) -> torch.dtype:
    """"auto" (bfloat16 for 16-bit checkpoints, else float32) or a dtype name -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        stored = ckpt.stored_dtype()
        return torch.bfloat16 if stored in (torch.bfloat16, torch.float16) else torch.float32
    if dtype not in DTYPES:
        raise OverspillError(f"unknown dtype '{dtype}' (expected auto, float32, bfloat16 or float16)")
    return DTYPES[dtype]


# -- 1. open ---------------------------------------------------------------------------------------------------------

class Source(NamedTuple):
    ckpt: object             # checkpoint.hf.HFCheckpoint | checkpoint.store.LayerStore
    is_store: bool
    dtype: torch.dtype
    quantize: str | None     # the block linears' scheme (a store's own, when it is a store)


def open_source(path: str, dtype, quantize: str | None, tp: tuple[int, int] | None = None) -> Source:
    """The checkpoint at ``path`` with its dtype and scheme (a layer store's must match what was asked). ``tp``
    (rank, ranks): a tensor-parallel rank's view: a store written for that many ranks as its own shard files, an
    HF directory as the slices of each block that rank holds (checkpoint/hf.py)."""
    from ..checkpoint.hf import HFCheckpoint
    from ..checkpoint.store import LayerStore, is_layer_store

    if is_layer_store(path):
        store = LayerStore(path)
        world = tp[1] if tp else 1
        if store.tensor_parallel != world:
            n = store.tensor_parallel
            if n == 1:
                raise OverspillError(f"--tp {world}: {path} is a layer store of whole blocks; write one for "
                                     f"{world} ranks with `overspill convert SRC DST --tensor-parallel {world}`, or "
                                     f"run a Hugging Face directory")
            raise OverspillError(f"{path}: a layer store written for {n} tensor-parallel ranks; run it with "
                                 f"`torchrun --nproc-per-node {n} -m overspill.cli ... --tp {n}`" +
                                 (f" (not --tp {world})" if world > 1 else "") +
                                 ", or convert the model again for another count")
        if tp is not None and world > 1:
            store = LayerStore(path, shard=tp[0])
        if isinstance(dtype, str) and dtype not in ("auto", str(store.dtype).replace("torch.", "")):
            raise OverspillError(f"{path}: this layer store holds {store.dtype}; convert again for dtype {dtype}")
        if quantize and quantize != store.quantize:
            raise OverspillError(f"{path}: this layer store holds {store.quantize or 'unquantized'} weights; "
                                 f"convert again with --quantize {quantize}")
        return Source(store, True, store.dtype, store.quantize)
    _refuse_original(path)
    ckpt = HFCheckpoint(path, shard=tp)
    ckpt.check_shapes()   # before a background load starts: a misfit tensor is a load error, not a forward's
    return Source(ckpt, False, resolve_dtype(dtype, ckpt), quantize)


def _refuse_original(path: str) -> None:
    """An EleutherAI original checkpoint runs once converted: say so in one line, with what converting writes and
    the free space beside it (one copy on disk: the store)."""
    import shutil

    from ..checkpoint import mesh_jax, neox_ds
    from ..checkpoint.store import planned_store_bytes

    for fmt, kind in ((mesh_jax, "GPT-J mesh-transformer-jax"), (neox_ds, "GPT-NeoX DeepSpeed")):
        found = fmt.find(path) if os.path.isdir(path) else None
        if found is None:
            continue
        try:
            ck = fmt.open_checkpoint(found, None)
        except OverspillError as e:   # no config beside it: convert needs --config, and says so
            raise OverspillError(f"{path}: an original {kind} checkpoint; convert it first with `overspill "
                                 f"convert {path} STORE --config ...` ({e})") from None
        try:
            gib = {q: planned_store_bytes(ck, "bfloat16", q) / 2**30 for q in (None, "int8", "int4")}
        finally:
            ck.close()
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**30
        raise OverspillError(f"{path}: an original {kind} checkpoint; convert it once, then run the result: "
                             f"`overspill convert {path} STORE` writes a {gib[None]:.1f} GiB layer store (bfloat16; "
                             f"--quantize int8: {gib['int8']:.1f} GiB, int4: {gib['int4']:.1f} GiB), and "
                             f"{free:.1f} GiB is free there")


def _check_quantize_head(quantize: str | None, quantize_head: bool) -> None:
    if quantize_head and not quantize:
        raise OverspillError("--quantize-head / quantize_head=True needs a scheme: add --quantize int8|int4|int8-dynamic|nf4")


# -- 2. size ---------------------------------------------------------------------------------------------------------

def _es(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# raw canonical names (before fusing) of the tensors that become block matmul weights
_RAW_LINEAR_PARTS = {"q", "k", "v", "qkv", "qkv_neox", "gate", "up", "out", "down"}


def unit_weight_bytes(src, cfg: ModelConfig, unit: str, dtype: torch.dtype, quantize: str | None,
                      quantize_head: bool = False, shard: ModelConfig | None = None) -> int:
    """Bytes a unit's weights occupy, from shapes only (quantize_head: the LM head in the scheme too, and an untied
    token table in int8; with tied embeddings the head is a quantized copy beside the table). ``shard``: a block's
    linears are held at this (tensor-parallel rank's local) config's shapes; its norms and biases are counted whole."""
    if hasattr(src, "unit_bytes"):                 # a layer store knows exactly
        return src.unit_bytes(unit)
    from .. import quant

    if shard is not None and unit.startswith("block."):
        total = sum(math.prod(src.shape(name)) * _es(dtype) for name, canon in src.unit_names(unit).items()
                    if not (canon.endswith(".weight") and canon.split(".")[0] in _RAW_LINEAR_PARTS))
        return total + sum(quant.quantized_nbytes(quantize, n, k) if quantize else n * k * _es(dtype)
                           for n, k in linear_shapes(shard, unit).values())
    total = 0
    for name, canon in src.unit_names(unit).items():
        lin = canon.split(".")[0]
        if quantize and canon.endswith(".weight") and lin in _RAW_LINEAR_PARTS and unit.startswith("block."):
            continue                                  # counted from the fused canonical shape below
        total += math.prod(src.shape(name)) * _es(dtype)
    if quantize and unit.startswith("block."):
        total += sum(quant.quantized_nbytes(quantize, n, k) for n, k in linear_shapes(cfg, unit).values())
    if quantize and quantize_head and unit == "head":
        total -= sum(math.prod(src.shape(name)) * _es(dtype) for name, canon in src.unit_names(unit).items()
                     if canon == "lm.weight")
        total += quant.quantized_nbytes(quantize, *linear_shapes(cfg, "head")["lm"])
    if quantize and quantize_head and unit == "embed" and not cfg.tie_embeddings:   # the table in int8 (_build)
        total -= math.prod((cfg.vocab_size, cfg.hidden_size)) * _es(dtype)
        total += quant.table_nbytes(cfg.vocab_size, cfg.hidden_size)
    return total


def unit_matmul_params(cfg: ModelConfig, unit: str) -> int:
    """Weights a token multiplies by in this unit (2 flops each): the block linears, the LM head; 0 for the embedding."""
    return sum(n * k for n, k in linear_shapes(cfg, unit).values())


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
    # a shape that disagrees with config.json: the unit's normal read reports it
    return loc if loc is not None and loc[3] == (cfg.vocab_size, cfg.hidden_size) else None


# -- 3. plan ---------------------------------------------------------------------------------------------------------

def make_plan(src, cfg: ModelConfig, dt: torch.dtype, quantize: str | None, budgets: dict[str, int],
              reserve: Reserve, ring_slots: int = 2, quantize_head: bool = False,
              unit_range: tuple[int, int] | None = None, run_config: ModelConfig | None = None):
    """The placement for this source. Streaming straight from a Hugging Face directory holds one more unit than
    the ring: a fetch reads the unit's raw tensors and fuses them (qkv, gate/up) into new ones, while the other
    slot's unit stays alive, so the plan counts ring_slots + 1 staging slots there (a layer store reads into the
    preallocated slots, already fused). ``unit_range`` (first, end): plan only those units (a pipeline stage's);
    the plan's placements are theirs, in order. ``run_config``: a tensor-parallel rank's local config: it holds
    its blocks' shards and their KV heads (and reads its slices of them, HFCheckpoint.unit_read_bytes)."""
    from ..placement import UnitCost, plan_placement

    is_store = hasattr(src, "unit_bytes")   # a LayerStore, not an HFCheckpoint
    if not is_store:
        ring_slots += 1
    reserve = dataclasses.replace(reserve, quantize=quantize, quantize_head=bool(quantize and quantize_head))
    kv = reserve.kv_bytes_per_block(run_config or cfg, dt)
    costs = []
    for u in units(cfg)[slice(*unit_range) if unit_range else slice(None)]:
        w = unit_weight_bytes(src, cfg, u, dt, quantize, quantize_head, run_config)
        # what a streamed fetch reads and holds: an HF directory quantizing (or sharding) on the fly reads the
        # stored weights (a tensor-parallel rank's slices of them)
        read = src.unit_read_bytes(u, dt) if (quantize or run_config) and not is_store else w
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
    """-> (plan, source checkpoint): what ``overspill plan`` shows."""
    src = open_source(path, dtype, quantize)
    _check_quantize_head(src.quantize, quantize_head)
    qh = quantize_head and not src.is_store
    return make_plan(src.ckpt, src.ckpt.config, src.dtype, src.quantize, budgets, reserve, quantize_head=qh), src.ckpt


# -- 4. devices ------------------------------------------------------------------------------------------------------

def unit_devices(plan, stand_in: dict[str, str] | None = None) -> list[torch.device]:
    """Where each unit computes, checked against this torch build. ``stand_in`` maps a planned device to the one that
    runs it (e.g. {"cuda:0": "cpu"}): a plan made for devices this machine lacks runs its code paths on ones it has.
    Every weight format runs on every device (quantized ones off the CPU on quant's portable path)."""
    stand_in = stand_in or {}
    devs = [torch.device(stand_in.get(p.device, p.device)) for p in plan.placements]
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
    return devs


# -- 5. wire ---------------------------------------------------------------------------------------------------------

def _quantizer(scheme: str):
    from .. import quant

    if scheme not in quant.SCHEMES:
        raise OverspillError(f"unknown quantization scheme '{scheme}' (expected one of {', '.join(quant.SCHEMES)})")

    def run(name: str, weight: torch.Tensor, build, inplace: bool = False):
        try:
            return build(quant.quantize(weight, scheme, inplace))   # on the CPU, whatever the weight's device
        except ValueError as e:
            raise OverspillError(f"cannot quantize '{name}' {list(weight.shape)} as {scheme}: {e}") from None

    return quant, run


def linear_format(scheme: str | None, include_head: bool = False,
                  dtype: torch.dtype = torch.bfloat16, owned: bool = False) -> MakeLinear:
    """How the CPU builds a unit's linears: the fastest exact dense format, or ``scheme`` for the block matmuls
    (and the LM head with include_head), quantized at load time, with the options of a model computing in ``dtype``
    (quant.exact_options). A weight on an accelerator (a unit streamed from an HF directory to where it computes) is
    quantized on the CPU and its stored tensors go back to its device. ``owned``: the weights were read for this
    unit alone (a resident unit's), so a scheme that can quantizes into their own bytes (quant.quantize inplace)."""
    if scheme is None:
        return dense_linear_format
    quant, run = _quantizer(scheme)
    opts = quant.exact_options(scheme, dtype)

    def make(name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        if name == "lm" and not include_head:
            return dense_linear(weight, bias)
        dev = weight.device
        if dev.type != "cpu":
            return run(name, weight, lambda t: quant.make_linear(scheme, map_tensors(t, lambda x: x.to(dev)), bias))
        # the quantized tensors are ours: convert them to the kernels' layout in place (no second copy)
        return run(name, weight, lambda t: quant.make_linear(scheme, t, bias, repack="inplace", **opts), owned)

    return make


def movable_format(scheme: str | None, include_head: bool = False) -> MakeLinear:
    """How a unit that computes on an accelerator holds its linears before it moves there (runtime/transfer.py's
    tensor maps): dense ones as they are (F.linear there), ``scheme`` ones quantized on the CPU as quant.StoredLinear,
    whose tensors move with the unit and whose Linear is built where it is called."""
    if scheme is None:
        return dense_streamed
    quant, run = _quantizer(scheme)

    def make(name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        if name == "lm" and not include_head:
            return dense_streamed(name, weight, bias)
        return run(name, weight, lambda t: quant.stored_linear(scheme, t, bias))

    return make


def dense_linear_format(name: str, weight: torch.Tensor, bias: torch.Tensor | None):
    return dense_linear(weight, bias)


def streamed_format(name: str, weight: torch.Tensor, bias: torch.Tensor | None):
    """A streamed unit's dense weights, used where they landed (the bytes are this fetch's own: a fresh read, or a
    staging slot the next read overwrites). On the CPU a prefill's products block them for the kernel in place
    (model/linear.BlockedOnDemand; 20B shape, 32 tokens: 0.33 s a block, against 1.0-1.4 s through float32 slices
    of a plain weight) and decode reads them as they are. Elsewhere F.linear, as dense_streamed."""
    if blocked_available(weight) and weight.is_contiguous():
        return BlockedOnDemand(weight, bias)
    return DenseLinear(weight, bias)


def owned_dense_format(name: str, weight: torch.Tensor, bias: torch.Tensor | None):
    """dense_linear_format for weights just read for this unit alone: re-laid out in place (no second copy)."""
    return dense_linear(weight, bias, owned=True)


def trains_row_major(weight: torch.Tensor) -> bool:
    """Whether a training load keeps this dense weight row-major (DenseLinear) instead of the kernels' layout: a bf16
    weight on a CPU that multiplies bf16 natively. A training step's products run at 256+ rows, where oneDNN's bf16
    GEMM matches the blocked kernel's forward (1B shapes, 256 rows: 16-20 against 16-24 ms), and its input gradient
    g @ W needs the weight's rows: from the panels it costs a re-layout of every slice (2.3x oneDNN's time)."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and bf16_native()


def training_format(make: MakeLinear, quantized: bool = False, include_head: bool = False) -> MakeLinear:
    """``make`` for a training load: its dense bf16 weights row-major where trains_row_major says so, as they landed
    (resident or streamed: nothing is re-laid out or copied). ``quantized``: ``make`` quantizes the block linears
    (and the head with ``include_head``), which it still builds."""
    def train_make(name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        dense = not quantized or (name == "lm" and not include_head)
        if dense and trains_row_major(weight):
            return DenseLinear(weight, bias)
        return make(name, weight, bias)

    return train_make


class UnitBuilder:
    """Turns a unit's tensors into its weight object: read (for resident units) or handed over by a streaming reader,
    bound with the right linear format for where it computes, then the hook. One per load."""

    def __init__(self, src: Source, quantize_head: bool, hook: LinearHook | None, training: bool = False):
        self.ckpt, self.store = src.ckpt, src.ckpt if src.is_store else None
        self.cfg, self.dtype, self.scheme = src.ckpt.config, src.dtype, src.quantize
        self.quantize_head, self.hook = quantize_head, hook
        # an HF directory's unquantized units: the fetched tensors are this unit's own, so they are laid out in place
        self.cpu_format = dense_linear_format if src.is_store else \
            linear_format(src.quantize, quantize_head, src.dtype) if src.quantize else owned_dense_format
        # a resident unit's raw tensors were read for it alone: quantized into their own bytes
        self.resident_format = linear_format(src.quantize, quantize_head, src.dtype, owned=True) \
            if src.quantize and not src.is_store else self.cpu_format
        self.streamed_format = streamed_format
        self.training = training
        if training:   # a training load (finetune): dense bf16 weights stay row-major where oneDNN multiplies them
            hf_quantized = bool(src.quantize and not src.is_store)
            self.cpu_format = training_format(self.cpu_format, hf_quantized, quantize_head)
            self.resident_format = training_format(self.resident_format, hf_quantized, quantize_head)
            self.streamed_format = training_format(streamed_format)
        # an HF directory's units for an accelerator (resident there, or held in host RAM and copied per forward)
        self.device_format = movable_format(src.quantize, include_head=quantize_head) if not src.is_store else \
            dense_streamed

    def resident(self, unit: str, device: torch.device, shared: dict[int, Weights], raw=None) -> Weights:
        """A unit held where it computes. ``shared``: units already resident on that device (a tied head shares
        the embedding's table). ``raw``: what fetch(unit, ...) read for a CPU unit, when it was read ahead."""
        if device.type != "cpu":
            return self.on_device(unit, device, shared)
        raw = self.fetch(unit, 0 in shared) if raw is None else raw
        w = self._build(unit, raw, self.resident_format, shared)
        trim_heap()   # the unit's temporaries: freed, and now out of RSS too
        return hook_linears(unit, w, self.hook)

    def on_device(self, unit: str, device: torch.device, shared: dict[int, Weights]) -> Weights:
        """A unit resident on an accelerator, in the formats that run anywhere: dense weights for F.linear, quantized
        ones as their stored tensors on ``device`` (an HF directory's quantized on the CPU first) with quant's portable
        Linear. Written for any device: tests run it on the CPU."""
        if self.store is not None:   # straight from the read buffer to the device (no host clone)
            t = map_tensors(self.store.read_unit(unit), lambda x: x.to(device))
            w = self._bind_store(unit, t, dense_streamed, shared)   # quantized: built on the device's tensors
        else:
            w = map_tensors(self._read(unit, self.device_format, shared), lambda x: x.to(device))
        return hook_linears(unit, w, self.hook)

    def fetch(self, unit: str, table_shared: bool):
        """The I/O half of loading a CPU unit (safe on another thread): its stored tensors in fresh memory. A layer
        store's unit is one parallel O_DIRECT read into a buffer on huge pages (panel_empty: resident units are read
        every token); an HF directory's, its raw tensors (the large ones read in parallel with O_DIRECT).
        table_shared: a tied head that will share the resident embedding's table reads no LM weight."""
        if self.store is not None:
            return _read_store_unit(self.store, unit)
        skip = ("lm.weight",) if unit == "head" and self.cfg.tie_embeddings and table_shared else ()
        return self.ckpt.read_unit_raw(unit, self.dtype, *skip, alloc=panel_empty)

    def host(self, unit: str, shared: dict[int, Weights], pin: bool) -> tuple[Weights, torch.Tensor]:
        """A unit held in host RAM and computed on an accelerator: dense or quantized (quant.StoredLinear: the stored
        tensors), packed into one exactly-sized (pinned) buffer, copied over per forward; the Linears are built and
        the hook applied there, after the copy (``finish``)."""
        return pack(self._read(unit, self.device_format, shared, movable=True), pin)

    def reader(self):
        """The reader that streams this checkpoint's units from disk."""
        return StoreUnitReader(self.store) if self.store is not None else HFUnitReader(self.ckpt, self.dtype)

    def streamed(self, unit: str, t, shared: dict[int, Weights]) -> Weights:
        """A unit fetched from disk (its tensors in a staging slot, or an HF directory's raw tensors)."""
        if self.store is not None:
            w = self._bind_store(unit, t, self.streamed_format, shared)
        else:   # an HF directory's raw tensors: the family's transforms run here, on the compute thread
            w = bind(self.cfg, unit, self.ckpt.finish(unit, t),
                     self.cpu_format if self.scheme else self.streamed_format)
        return hook_linears(unit, w, self.hook)

    def finish(self, unit: str, w: Weights) -> Weights:
        """A host-held unit after its copy to the device."""
        return hook_linears(unit, w, self.hook)

    def _read(self, unit: str, make: MakeLinear, shared: dict[int, Weights], movable: bool = False) -> Weights:
        return self._build(unit, self.fetch(unit, 0 in shared), make, shared, movable)

    def _build(self, unit: str, raw, make: MakeLinear, shared: dict[int, Weights], movable: bool = False) -> Weights:
        """The compute half: the fetched tensors -> the unit's weight object in ``make``'s formats. movable: a layer
        store's quantized linears stay their stored tensors (quant.StoredLinear), to be copied to an accelerator."""
        cfg = self.cfg
        if self.store is not None:
            # Quantized linears keep views of the read buffer and convert their bytes to the kernels' layouts in
            # place: those bytes stay in use, nothing is copied. A dense matmul weight that the CPU re-lays out
            # (blocked / oneDNN-packed) goes into a copy, so no other view may keep the buffer alive after that:
            # 1-D tensors (norms, biases) get their own memory (dense stores: every tensor, as their linears all
            # copy). Where dense weights run in place (F.linear), the buffer is the unit's memory as it is.
            lins = {f"{n}.weight" for n in linear_names(unit)}
            relaid = any(k in lins and dense_linear_copies(v) and not (self.training and trains_row_major(v))
                         for k, v in raw.items())
            if relaid or self.store.quantize is not None:
                raw = {k: v.clone() if (self.store.quantize is None and relaid) or (".q." not in k and v.dim() <= 1)
                       else v for k, v in raw.items()}
            return self._bind_store(unit, raw, make, shared, movable)
        t = self.ckpt.finish(unit, raw)   # before bind: a tensor-parallel rank's slices, quantized as they are
        if unit == "embed" and self.quantize_head and not cfg.tie_embeddings:
            from .. import quant
            # the token table as the head is: quantized (int8 rows, looked up); a tied one is the head's dense table
            t["tok.weight"] = quant.quantize_table(t["tok.weight"])
        if unit == "head" and cfg.tie_embeddings and 0 in shared:
            bias = t.pop("lm.bias", None)
            # share, don't copy, the embedding; a quantized head is its own (smaller) copy
            # (quantized from the shared table, never into its bytes: the format that owns nothing)
            t["lm"] = self.cpu_format("lm", shared[0].tok, bias) if self.quantize_head else \
                DenseLinear(shared[0].tok, bias)
        return bind(cfg, unit, t, make)

    def _bind_store(self, unit: str, t: dict[str, torch.Tensor], make: MakeLinear, shared: dict[int, Weights],
                    movable: bool = False) -> Weights:
        from .. import quant
        from ..checkpoint.store import split_quantized

        store, cfg = self.store, self.cfg
        plain, q = split_quantized(t)
        if "tok" in q:   # a token table stored in int8 (convert --quantize-head): looked up, not multiplied
            plain["tok.weight"] = quant.Int8Table(**q.pop("tok"))
        # Convert to the kernels' layouts in place: streamed units' tensors live in the staging buffer, resident
        # units' in their own read buffer (_read). No second copy of a weight at any time, and streamed units run the
        # same kernels (so give the same logits) as resident ones. Tensors on an accelerator are used as they are
        # (quant's portable path); movable ones stay stored tensors until they are there.
        for lin, tensors in q.items():
            bias = plain.pop(f"{lin}.bias", None)
            plain[lin] = quant.stored_linear(store.quantize, tensors, bias) if movable else \
                quant.make_linear(store.quantize, tensors, bias, repack="inplace",
                                  **quant.exact_options(store.quantize, self.dtype))
        if unit == "head" and cfg.tie_embeddings and "lm.weight" not in plain and "lm" not in plain:
            # the embedding's table where it is resident on this unit's device, else this unit's own copy of it
            dev = next(iter(t.values())).device if t else torch.device("cpu")
            tok = shared[0].tok if 0 in shared else store.read_unit("embed")["tok.weight"].to(dev, copy=True)
            plain["lm"] = DenseLinear(tok, plain.pop("lm.bias", None))
        w = plain.get("lm.weight")
        if store.quantize and make is not dense_streamed and w is not None and blocked_available(w) \
                and w.is_contiguous() and not (self.training and trains_row_major(w)):
            # a dense head beside quantized blocks, in this unit's own read buffer: block it in place (the copy that
            # dense_linear makes would briefly double it: 0.4 GB for GPT-J-6B, over a 4 GiB budget)
            plain["lm"] = BlockedLinear.from_blocked_(w, plain.pop("lm.bias", None))
            del plain["lm.weight"]
        return bind(cfg, unit, plain, make)


def _read_store_unit(store, unit: str) -> dict[str, torch.Tensor]:
    """One parallel O_DIRECT read of a store unit's data section into its own buffer, then views of it."""
    d0, n = store.unit_span(unit)
    if n < 4 << 20:                                  # small: one buffered read into exactly its bytes
        return store.read_unit(unit, alloc=panel_empty)
    buf = panel_empty((-(-n // ALIGN) * ALIGN,), torch.uint8)   # whole blocks: O_DIRECT reads the last one whole
    f = DirectFile(store.unit_file(unit))
    try:
        f.read_into(buf, d0, n, read_pool())
    finally:
        f.close()
    return store.views(unit, buf[:n])


class _HeldLoader:
    """Loads the held (resident) units in execution order. On the CPU the next unit is read while this one is built
    (layout conversion), so a cold load runs at about the disk's speed; the unit read ahead is held beside the ones
    loaded so far, which is within budget where the staging ring (not filled before the load ends) is at least a
    unit, and always without a budget (``read_ahead``)."""

    def __init__(self, builder: UnitBuilder, names: list[str], held: list[int], devs: list[torch.device],
                 shared, read_ahead: bool):
        self.builder, self.names, self.held, self.devs, self.shared = builder, names, held, devs, shared
        cpu = torch.device("cpu")
        self.cpu_held = [i for i in held if devs[i] == cpu]
        self.read_ahead = read_ahead
        self.pending = None

    def _shares(self, i: int) -> bool:
        return 0 in self.held and self.devs[0] == self.devs[i]

    def one(self, i: int) -> Weights:
        """Unit i (the units must be asked for in the order of ``held``)."""
        try:
            return self._one(i)
        except BaseException:
            self.close()
            raise

    def _one(self, i: int) -> Weights:
        b, names, dev = self.builder, self.names, self.devs[i]
        raw = None
        if dev.type == "cpu" and self.read_ahead:
            raw = self.pending.result() if self.pending is not None else b.fetch(names[i], self._shares(i))
            k = self.cpu_held.index(i) + 1
            if k < len(self.cpu_held):
                if not hasattr(self, "pool"):
                    self.pool = ThreadPoolExecutor(1, thread_name_prefix="overspill-load")
                nxt = self.cpu_held[k]
                self.pending = self.pool.submit(b.fetch, names[nxt], self._shares(nxt))
            else:
                self.close()
        return b.resident(names[i], dev, self.shared(dev), raw)

    def run(self, into: dict[int, Weights]) -> None:
        try:
            for i in self.held:
                into[i] = self.one(i)
        finally:
            self.close()

    def close(self) -> None:
        """Stop reading ahead and drop what was read ahead (idempotent)."""
        self.pending = None
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(cancel_futures=True)
            del self.pool


class _StreamedUnits:
    """make_weights for the streaming source: host-held units (already bound, copied to the device) get the hook;
    disk units are bound from their fetched tensors."""

    def __init__(self, builder: UnitBuilder, host: set[str], shared: dict[int, Weights]):
        self.builder, self.host, self.shared = builder, host, shared

    def __call__(self, unit: str, t) -> Weights:
        if unit in self.host:
            return self.builder.finish(unit, t)
        return self.builder.streamed(unit, t, self.shared)


@dataclasses.dataclass
class Built:
    config: ModelConfig
    executor: Executor
    plan: object | None          # placement.Plan under budgets, else None
    checkpoint: object           # HFCheckpoint | LayerStore (generation_config, tokenizer files)


def build(path: str, dtype: torch.dtype | str, quantize: str | None, max_memory: dict[str, int] | None,
          reserve: Reserve, *, quantize_head: bool = False, linear_hook: LinearHook | None = None,
          stand_in: dict[str, str] | None = None, ring_slots: int = 2, kv_cache: str | None = None,
          background: bool = False, unit_range: tuple[int, int] | None = None,
          run_config: ModelConfig | None = None, tp: tuple[int, int] | None = None) -> Built:
    """A runnable executor for ``path``. quantize_head applies to on-the-fly quantization; a layer store holds its
    head as it was converted. ``unit_range`` (first, end): load and plan only those units (a pipeline stage, see
    overspill/parallel); the others are never read. ``tp`` (rank, ranks): read this tensor-parallel rank's share of
    each block (open_source), which the executor runs at ``run_config``, its local config (the plan sizes blocks
    and KV cache by it).

    With accelerator budgets, units resident on an accelerator are loaded there; units the plan streams to one
    (from host RAM, tier "stream" home "cpu", or from disk) are copied there for every forward by the streaming
    reader (runtime/transfer.py), through pinned host buffers; activations, not weights, cross devices."""
    src = open_source(path, dtype, quantize, tp)
    _check_quantize_head(src.quantize, quantize_head)
    quantize_head = bool(src.quantize and quantize_head and not src.is_store)
    cfg, names = src.ckpt.config, units(src.ckpt.config)
    reserve = dataclasses.replace(reserve, quantize=src.quantize, quantize_head=quantize_head, kv_format=kv_cache)
    plan = None
    streamed: list[int] = []
    first, end = unit_range or (0, len(names))
    devs = [torch.device("cpu")] * len(names)
    homes = ["cpu"] * len(names)
    if max_memory is not None:
        plan = make_plan(src.ckpt, cfg, src.dtype, src.quantize, max_memory, reserve, ring_slots, quantize_head,
                         unit_range, run_config)
        streamed = [first + i for i, p in enumerate(plan.placements) if p.tier == "stream"]
        devs[first:end] = unit_devices(plan, stand_in)
        homes[first:end] = [p.home for p in plan.placements]
    executor = _wire(src, UnitBuilder(src, quantize_head, linear_hook, reserve.training), names, streamed, devs, homes,
                     plan, ring_slots, reserve if max_memory is not None else None, kv_cache, background,
                     (first, end), run_config)
    return Built(cfg, executor, plan, src.ckpt)


def _wire(src: Source, builder: UnitBuilder, names: list[str], streamed: list[int], devs: list[torch.device],
          homes: list[str], plan, ring_slots: int, reserve: Reserve | None, kv_cache: str | None,
          background: bool = False, unit_range: tuple[int, int] | None = None,
          run_config: ModelConfig | None = None) -> Executor:
    """Load the resident units (now, or with ``background`` on a thread while the first forward runs), pack the
    host-held ones, and put the rest behind a streaming source."""
    cfg, cpu = src.ckpt.config, torch.device("cpu")
    pin = any(d.type == "cuda" for d in devs)
    rows = None
    loc = embed_rows(src.ckpt, cfg) if 0 in streamed and homes[0] == "disk" else None
    if loc is not None:   # the token table stays on disk: each forward reads its ids' rows (runtime/rows.py)
        rows = RowTable(*loc, src.dtype)
        streamed = [i for i in streamed if i != 0]
    resident: dict[int, Weights] = {}
    on = lambda d: {k: w for k, w in resident.items() if devs[k] == d}   # units sharing a device
    held = [i for i in range(*(unit_range or (0, len(names))))
            if i not in streamed and not (i == 0 and rows is not None)]
    # Background: all on the CPU, the load returns now and the resident units are read and built on a thread while
    # the first forward runs (runtime/background.py): each is computed as soon as it is in, overlapping the reads
    # of the next ones. A tied head then shares the live dict of held units (the embedding is in before the head).
    background = background and all(d == cpu for d in devs)
    shared = (lambda d: resident) if background else on
    load_held = _HeldLoader(builder, names, held, devs, shared,
                            read_ahead=bool(streamed) or reserve is None)
    if not background:
        load_held.run(resident)
    host, host_bufs = {}, []
    for i in streamed:
        if homes[i] == "cpu":
            host[names[i]], buf = builder.host(names[i], on(cpu), pin)
            host_bufs.append(buf)
    if streamed:
        reader = builder.reader()
        if host:
            host_reader = HostUnitReader(host)
            reader = MixedReader({names[i]: host_reader if names[i] in host else reader for i in streamed})
        # streamed units computing on an accelerator are copied there by the reader thread
        copier = DeviceCopier(devs[streamed[0]]) if plan.compute_device not in (None, "cpu") else None
        make = _StreamedUnits(builder, set(host), shared(devs[streamed[0]]))
        loading = (lambda then: BackgroundLoad(held, load_held.one, resident, then, load_held.close)) if background else None
        source = StreamingSource(cfg, resident, streamed, names, reader, make, ring_slots, pin=pin, copier=copier,
                                 pinned=host_bufs, loading=loading)
    else:
        close = src.ckpt.close if not src.is_store else None   # a streaming source keeps reading from it
        loading = BackgroundLoad(held, load_held.one, resident, close, load_held.close) if background else None
        source = ResidentSource([resident.get(i) for i in range(len(names))], loading)
        if close is not None and not background:
            close()
    return Executor(run_config or cfg, source, src.dtype, unit_devices=[str(d) for d in devs], reserve=reserve,
                    kv_format=kv_cache, rows=rows)
