"""LoRA adapters (Hu et al. 2021, eq. 3: h = W0 x + B A x * alpha / r) over overspill's frozen linears.

The trainable pairs are kept per Hugging Face module, as PEFT keeps them (``lora_A`` [r, in], ``lora_B`` [out, r]),
so an adapter is a PEFT adapter in memory and on disk. overspill runs fused linears (q|k|v, gate|up, with GPT-J's
and GPT-NeoX's row layouts changed at load); ``families.adapters`` says which canonical rows each module's outputs
are, and ``LoraLinear`` adds each pair's product into exactly those rows. The base weight is never touched: any
format (dense, packed, int8/int4/nf4, streamed from disk) works, and autograd reaches the pairs through the base's
input gradient.

Optionally the adapted modules' biases (PEFT's ``bias="lora_only"``), every bias of the model (``bias="all"``: the
linears without pairs and the norms too) and the norm modules (PEFT's ``modules_to_save``) train too: each is a
trainable copy of the base's vector, a linear's bias added as its difference from the base's, a norm's used in the
base's place; saved under PEFT's keys (``<module>.base_layer.bias`` for an adapted module, ``<module>.bias``,
``<norm>.weight``).

    adapter = LoraAdapter(cfg, LoraSettings(r=8, targets=("qkv", "out", "up", "down")))
    overspill.load(path, linear_hook=adapter.hook)     # or build(..., linear_hook=adapter.hook)
    adapter.save(dir)                                  # adapter_config.json + adapter_model.safetensors
    LoraAdapter.load(dir, cfg)                         # PEFT's own files too
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..checkpoint.hf import read_json
from ..config import ModelConfig
from ..errors import OverspillError
from ..families import FAMILIES
from ..families.adapters import ModuleMap, NormMap, module_maps, norm_maps
from ..model.linear import Linear, refill_

CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
CANONICAL = ("qkv", "out", "up", "down", "lm")
DEFAULT_TARGETS = ("qkv", "out", "up", "down")
BIAS_MODES = ("none", "lora_only", "all")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS   # canonical names (qkv,out,up,down,lm) or Hugging Face module names
    rslora: bool = False                          # scale alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r
    bias: str = "none"                            # "lora_only": the adapted modules' biases train too; "all": every
    #                                               bias of the model (PEFT's names)
    norms: tuple[str, ...] = ()                   # norm modules that train ("all", or names as PEFT's modules_to_save)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def check(self) -> "LoraSettings":
        if not (isinstance(self.r, int) and self.r >= 1):
            raise OverspillError(f"lora r must be an integer >= 1, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise OverspillError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise OverspillError("lora targets: none given (expected e.g. qkv,out,up,down or q_proj,v_proj)")
        if self.bias not in BIAS_MODES:
            raise OverspillError(f"lora bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        return self


@dataclass
class Slot:
    """One adapted module of one layer: a LoRA pair, or (bias "all", a module without pairs) its bias alone."""
    path: str             # the Hugging Face module path, e.g. transformer.h.3.attn.q_proj
    unit: str             # block.3 | head
    map: ModuleMap
    A: torch.nn.Parameter | None = field(repr=False)   # None: a trained bias only
    B: torch.nn.Parameter | None = field(repr=False)
    bias: torch.nn.Parameter | None = field(default=None, repr=False)   # the module's bias as trained (full value)
    bias_base: torch.Tensor | None = field(default=None, repr=False)    # the base's, seen at the first hook
    bias_ready: bool = False                                              # ``bias`` holds a value
    order: torch.Tensor | None = field(default=None, repr=False)  # its rows, permuted within a block: argsort(cols)


@dataclass
class NormSlot:
    """One trained norm module: a copy of its weight (and bias), used in place of the base's; with bias "all", a norm
    not in modules_to_save trains its bias alone (``weight`` None: the base's)."""
    path: str             # transformer.h.3.ln_1
    unit: str             # block.3 | head
    map: NormMap
    weight: torch.nn.Parameter | None = field(repr=False)
    bias: torch.nn.Parameter | None = field(default=None, repr=False)
    ready: bool = False   # holds a value (a saved one, or the base's copied at the first hook)


def _concrete(maps: list[ModuleMap], n_layers: int) -> list[tuple[str, str, ModuleMap]]:
    out = []
    for m in maps:
        if m.unit == "head":
            out.append((m.path(), "head", m))
        else:
            out += [(m.path(i), f"block.{i}", m) for i in range(n_layers)]
    return out


def resolve_targets(cfg: ModelConfig, targets) -> list[tuple[str, str, ModuleMap]]:
    """The (module path, unit, map) a target spec selects. ``targets``: canonical linear names (qkv, out, up, down,
    lm), module names as PEFT's ``target_modules`` lists them (a module matches a name it equals or ends with after a
    dot: q_proj, attn.c_proj, query_key_value), or a regular expression string (PEFT's other form: full match)."""
    every = _concrete(module_maps(FAMILIES[cfg.family], cfg), cfg.n_layers)
    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise OverspillError(f"lora target_modules: bad regular expression {targets!r} ({e})") from None
        hit = [s for s in every if rx.fullmatch(s[0])]
        if not hit:
            raise OverspillError(f"lora target_modules {targets!r} matches no module of this {cfg.family} model")
        return hit
    chosen: dict[str, tuple[str, str, ModuleMap]] = {}
    for t in targets:
        hit = [s for s in every if s[2].linear == t] if t in CANONICAL else \
            [s for s in every if s[0] == t or s[0].endswith("." + t)]
        if not hit:
            names = sorted({m.name for _, _, m in every})
            raise OverspillError(f"lora target {t!r} matches no module of this {cfg.family} model (expected "
                                 f"{', '.join(CANONICAL)} or module names: {', '.join(names)})")
        chosen.update({s[0]: s for s in hit})
    return [s for s in every if s[0] in chosen]


def _linear_has_bias(cfg: ModelConfig, linear: str) -> bool:
    return {"qkv": cfg.qkv_bias, "out": cfg.out_bias, "up": cfg.mlp_bias, "down": cfg.mlp_bias,
            "lm": cfg.lm_head_bias}[linear]


def resolve_norms(cfg: ModelConfig, names) -> list[tuple[str, str, NormMap]]:
    """(module path, unit, map) of the norm modules ``names`` selects: "all", or names as PEFT's modules_to_save
    lists them (a module matches a name its path ends with, as PEFT matches them: "norm" is every Llama norm,
    "model.norm" the final one)."""
    every = []
    for m in norm_maps(FAMILIES[cfg.family], cfg):
        every += [(m.path(), "head", m)] if m.unit == "head" else \
            [(m.path(i), f"block.{i}", m) for i in range(cfg.n_layers)]
    if not names:
        return []
    if "all" in names:
        return every
    chosen = set()
    for n in names:
        hit = [p for p, _, _ in every if p.endswith(n)]
        if not hit:
            options = sorted({m.module.rsplit(".", 1)[-1] for _, _, m in every})
            raise OverspillError(f"norm module {n!r} matches no norm of this {cfg.family} model (expected all or "
                                 f"{', '.join(options)})")
        chosen.update(hit)
    return [e for e in every if e[0] in chosen]


DROP_BITS = 15   # random bits per dropout decision (drop_probability)


def drop_probability(p: float) -> float:
    """The probability ``dropout`` drops an element with: p rounded to a multiple of 2^-15 (0.05 -> 0.04998779)."""
    return round(p * (1 << DROP_BITS)) / (1 << DROP_BITS)


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The keep decisions (bools shaped as ``x``) of dropout(x, p)."""
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()   # 63 random bits each
    lanes = draws.view(torch.int16)[:n].view(x.shape)                 # 4 lanes of 16 bits each (15 in the top one)
    return torch.bitwise_and(lanes, (1 << DROP_BITS) - 1) >= round(drop_probability(p) * (1 << DROP_BITS))


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout (Srivastava et al. 2014) of ``x``: each element zeroed with probability drop_probability(p),
    the rest scaled by 1 / (1 - that), the decisions drawn from torch's generator for x's device (so a recomputed
    forward replays them from the saved generator state). Four decisions per 64-bit draw, 15 random bits each:
    ~5x less generator time than torch's dropout, which draws one number per element (bernoulli_: 17% of a 1.2B LoRA
    step on the CPU)."""
    return (x * dropout_mask(x, p)).mul_(1.0 / (1.0 - drop_probability(p)))


class _Pair(torch.autograd.Function):
    """One LoRA pair's term d = B (A drop(h)) * s, with h = x in the pair's dtype (``keep``: the dropout mask, None
    without dropout; ``ks`` its scale 1 / (1 - p)). The scales are linear, so both go onto the [T, r] middle product
    (d = B ((A (h * keep)) * ks * s)): of the elementwise ops over [T, in] and [T, out] autograd's graph of the
    plain expression runs, only the mask's remains, forward and backward (5 fewer per pair; the same math, rounded
    within float32's last bits). Autograd would keep drop(h) (float32 for PEFT's float32 pairs: [T, in] per pair,
    three for a fused q|k|v); this keeps x as it came (bf16 in a bf16 model, shared by the pairs of one linear), the
    mask as bools and the [T, r] product, and recomputes h * keep in the backward."""

    @staticmethod
    def forward(ctx, h, A, B, x, keep, ks, s):
        u = F.linear(h if keep is None else h * keep, A).mul_(ks * s)
        ctx.save_for_backward(x, keep, u, A, B)
        ctx.scale, ctx.dtype = ks * s, h.dtype
        return F.linear(u, B)

    @staticmethod
    def backward(ctx, gd):
        x, keep, u, A, B = ctx.saved_tensors
        gh = gA = gB = None
        if ctx.needs_input_grad[2]:
            gB = gd.reshape(-1, gd.shape[-1]).t().mm(u.reshape(-1, u.shape[-1]))
        gu = gd.matmul(B).mul_(ctx.scale)                 # dL/d(A (h * keep)): [T, r]
        if ctx.needs_input_grad[1]:
            hk = x.to(ctx.dtype, copy=True)
            if keep is not None:
                hk.mul_(keep)
            gA = gu.reshape(-1, gu.shape[-1]).t().mm(hk.reshape(-1, hk.shape[-1]))
        if ctx.needs_input_grad[0]:
            gh = gu.matmul(A)
            if keep is not None:
                gh.mul_(keep)
        return gh, gA, gB, None, None, None, None


class LoraLinear:
    """A base Linear plus the LoRA pairs that feed its output rows: y = base(x) + sum_m scatter_m(B_m A_m drop(x)) * s.
    Implements the Linear protocol; ``dequantize()`` is the merged weight."""

    __slots__ = ("base", "pairs", "adapter", "in_features", "out_features")

    def __init__(self, base: Linear, pairs: list[tuple[Slot, slice | None]], adapter: "LoraAdapter"):
        self.base, self.pairs, self.adapter = base, pairs, adapter
        self.in_features, self.out_features = base.in_features, base.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ad = self.adapter
        p, s = (ad.settings.dropout if ad.training else 0.0), ad.settings.scale
        xs: dict[torch.dtype, torch.Tensor] = {}            # x in the pairs' dtype, converted once for all of them
        blocks: list[tuple[slice, torch.Tensor]] = []
        for slot, rows in self.pairs:
            A, B, order = slot.A, slot.B, slot.order
            if order is not None:                           # rows permuted within their block: B's rows in its order
                order = order.to(y.device)
                B = None if B is None else B.index_select(0, order)
            d = None
            if A is not None:
                h = xs.get(A.dtype)
                if h is None:
                    h = xs[A.dtype] = x.to(A.dtype)
                keep = dropout_mask(h, p) if p else None      # its own mask per module, as PEFT draws them
                d = _Pair.apply(h, A, B, x.detach(), keep, 1.0 / (1.0 - drop_probability(p)), s)
            if slot.bias is not None and slot.bias_base is not None:
                db = slot.bias - slot.bias_base             # the trained bias, as its change from the base's
                if order is not None:
                    db = db.index_select(0, order)
                d = db.expand(*y.shape[:-1], -1) if d is None else d + db
            if d is None:
                continue
            d = d.to(y.dtype)
            if rows is not None:                            # a contiguous block of the fused output
                blocks.append((rows, d))
            else:
                y = y.index_add(-1, slot.map.cols.to(y.device), d)
        if not blocks:
            return y
        # one new output for all the blocks (a fused linear's q, k, v), not a copy of y per block (0.14 s of a 1B step)
        blocks.sort(key=lambda b: b[0].start)
        parts, at = [], 0
        for rows, d in blocks:
            if rows.start > at:
                parts.append(y[..., at:rows.start])
            parts.append(y[..., rows] + d)
            at = rows.stop
        if at < y.shape[-1]:
            parts.append(y[..., at:])
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]

    def refill_(self, new: "LoraLinear") -> None:
        refill_(self.base, new.base)

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + sum(t.numel() * t.element_size() for s, _ in self.pairs
                                      for t in (s.A, s.B, s.bias) if t is not None)

    def dequantize(self) -> torch.Tensor:
        w = self.base.dequantize().float().clone()
        for slot, _ in self.pairs:
            if slot.A is not None:
                w.index_add_(0, slot.map.cols.to(w.device), (slot.B.detach().float() @ slot.A.detach().float())
                             * self.adapter.settings.scale)
        return w


class _Hook:
    """The loader's hook for an adapter (model/weights.hook_linears): ``hook(unit, name, linear)`` wraps a linear,
    ``hook.norms(unit, weights)`` puts trained norms in place."""

    __slots__ = ("adapter",)

    def __init__(self, adapter: "LoraAdapter"):
        self.adapter = adapter

    def __call__(self, unit: str, name: str, lin: Linear) -> Linear:
        return self.adapter.wrap(unit, name, lin)

    def norms(self, unit: str, w):
        return self.adapter.norms_of(unit, w)


def _rows(cols: torch.Tensor) -> tuple[slice | None, torch.Tensor | None]:
    """Where a module's rows sit in the fused output: (the block, None) when in order; (the block, argsort(cols))
    when they fill a block permuted (GPT-J's and GPT-NeoX's q and k, whose rotary rows are re-ordered at load): the
    pair's B rows gathered in that order make its product the block's, with no scatter of [T, out]; else (None,
    None)."""
    a, n = int(cols.min()), cols.numel()
    block = torch.arange(a, a + n)
    if torch.equal(cols, block):
        return slice(a, a + n), None
    if torch.equal(cols.sort().values, block):
        return slice(a, a + n), torch.argsort(cols)
    return None, None


class LoraAdapter:
    """LoRA pairs for the modules ``settings.targets`` selects. New pairs start as PEFT's do (A Kaiming-uniform with
    a = sqrt(5), B zero: the adapted model starts equal to the base). ``hook`` is the loader's linear hook."""

    def __init__(self, cfg: ModelConfig, settings: LoraSettings, *, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None, base_model: str | None = None,
                 _slots: list[tuple[str, str, ModuleMap]] | None = None):
        self.cfg, self.settings, self.base_model = cfg, settings.check(), base_model
        self.training = False
        self.slots: list[Slot] = []
        for path, unit, m in (_slots if _slots is not None else resolve_targets(cfg, settings.targets)):
            A = torch.empty(settings.r, m.in_features, dtype=dtype)
            # kaiming_uniform_(a=sqrt(5)) as nn.Linear and PEFT initialise lora_A: U(-1/sqrt(in), 1/sqrt(in))
            bound = 1.0 / math.sqrt(m.in_features)
            A.uniform_(-bound, bound, generator=generator)
            B = torch.zeros(m.out_features, settings.r, dtype=dtype)
            bias = torch.nn.Parameter(torch.zeros(m.out_features, dtype=dtype)) \
                if settings.bias != "none" and _linear_has_bias(cfg, m.linear) else None
            self.slots.append(Slot(path, unit, m, torch.nn.Parameter(A), torch.nn.Parameter(B), bias))
        self.norms: list[NormSlot] = []
        for path, unit, m in resolve_norms(cfg, settings.norms):
            b = torch.nn.Parameter(torch.zeros(m.size, dtype=dtype)) if m.has_bias else None
            self.norms.append(NormSlot(path, unit, m, torch.nn.Parameter(torch.zeros(m.size, dtype=dtype)), b))
        if settings.bias == "all":   # PEFT's: every bias trains, of the modules without pairs and the norms too
            have = {s.path for s in self.slots} | {n.path for n in self.norms}
            for path, unit, m in _concrete(module_maps(FAMILIES[cfg.family], cfg), cfg.n_layers):
                if path not in have and _linear_has_bias(cfg, m.linear):
                    self.slots.append(Slot(path, unit, m, None, None,
                                           torch.nn.Parameter(torch.zeros(m.out_features, dtype=dtype))))
            for path, unit, m in resolve_norms(cfg, ("all",)):
                if path not in have and m.has_bias:
                    self.norms.append(NormSlot(path, unit, m, None, torch.nn.Parameter(torch.zeros(m.size,
                                                                                                   dtype=dtype))))
        self._index()
        self.hook = _Hook(self)

    def _index(self, slots: list[Slot] | None = None) -> None:
        self.by_linear: dict[tuple[str, str], list[tuple[Slot, slice | None]]] = {}
        for s in self.slots if slots is None else slots:
            rows, s.order = _rows(s.map.cols)
            self.by_linear.setdefault((s.unit, s.map.linear), []).append((s, rows))
        self.by_unit: dict[str, list[NormSlot]] = {}
        for n in self.norms:
            self.by_unit.setdefault(n.unit, []).append(n)

    def shard_(self, rank: int, world: int) -> "LoraAdapter":
        """Hook tensor-parallel rank ``rank``'s shards of the block linears (model/shard.py) from now on, for
        inference: a column-parallel linear (qkv, up) gets the B rows of the canonical rows the rank holds, placed
        at their local rows; a row-parallel one (out, down) the A columns of its input slice, its partial product
        summed across ranks by the same all-reduce as the base's. The head is whole on every rank. ``slots`` and the
        saved files stay the whole adapter."""
        from ..model.shard import linear_parts

        if world == 1:
            return self
        parts = linear_parts(self.cfg, rank, world)
        derived = []
        for s in self.slots:
            kind, ranges = parts.get(s.map.linear, ("whole", []))
            cols = s.map.cols
            A = s.A.detach() if s.A is not None else None
            B = s.B.detach() if s.B is not None else None
            if kind == "rows":
                held = torch.cat([torch.arange(a, b) for a, b in ranges])   # canonical row of each local row
                local = torch.full((max(int(held.max()), int(cols.max())) + 1,), -1, dtype=torch.long)
                local[held] = torch.arange(held.numel())
                keep = local[cols] >= 0
                if not bool(keep.any()):
                    continue                        # none of this module's rows live on this rank
                B, cols = (B[keep] if B is not None else None), local[cols[keep]]
                bias = None if s.bias is None else s.bias.detach()[keep]
            elif kind == "cols":
                if A is not None:
                    A = A[:, torch.cat([torch.arange(a, b) for a, b in ranges])]
                bias = s.bias.detach() if s.bias is not None and rank == 0 else None   # added once, as the base's
                if A is None and bias is None:
                    continue                        # a bias alone, which rank 0 adds
            else:
                bias = None if s.bias is None else s.bias.detach()
            m = dataclasses.replace(s.map, out_features=cols.numel(),
                                    in_features=A.shape[1] if A is not None else s.map.in_features, cols=cols)
            frozen = lambda t: None if t is None else torch.nn.Parameter(t.contiguous(), requires_grad=False)
            derived.append(Slot(s.path, s.unit, m, frozen(A), frozen(B), frozen(bias), bias_ready=s.bias_ready))
        self._index(derived)
        return self

    # -- running --------------------------------------------------------------------------------------------------
    def wrap(self, unit: str, name: str, lin: Linear) -> Linear:
        """The base linear, wrapped where this adapter has pairs for it. A trained bias learns the base's at the
        first sight of the linear: its starting value (a new adapter) and what its difference is taken from."""
        pairs = self.by_linear.get((unit, name))
        if not pairs:
            return lin
        for slot, _ in pairs:
            if slot.bias is not None and slot.bias_base is None:
                base = getattr(lin, "bias", None)
                if base is None:
                    raise OverspillError(f"{slot.path}: the adapter trains its bias but the base module has none")
                b = base.detach().to(slot.bias.device, torch.float32)[slot.map.cols.to(base.device)]
                slot.bias_base = b.to(slot.bias.dtype).clone()
                if not slot.bias_ready:
                    slot.bias.data.copy_(slot.bias_base)
                    slot.bias_ready = True
        return LoraLinear(lin, pairs, self)

    def norms_of(self, unit: str, w):
        """A unit's weights with its trained norms in the base's place: the Parameters themselves while training
        (resident units hold them, so every step sees the update), a copy in the base's dtype otherwise. A new
        slot starts as the base's vector, copied at the first sight of the unit."""
        slots = self.by_unit.get(unit)
        if not slots:
            return w
        repl = {}
        for n in slots:
            wb = getattr(w, n.map.norm)
            if not n.ready:
                for p, base in ((n.weight, wb[0]), (n.bias, wb[1])):
                    if p is not None:
                        p.data.copy_(base.detach().to(p.device, p.dtype))
                n.ready = True
            if self.training:
                repl[n.map.norm] = tuple(b if p is None else p for p, b in ((n.weight, wb[0]), (n.bias, wb[1])))
            else:
                repl[n.map.norm] = tuple(b if p is None else p.detach().to(b.device, b.dtype)
                                         for p, b in ((n.weight, wb[0]), (n.bias, wb[1])))
        return dataclasses.replace(w, **repl)

    def train(self, mode: bool = True) -> "LoraAdapter":
        self.training = mode
        return self

    def eval(self) -> "LoraAdapter":
        return self.train(False)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for s in self.slots for p in (s.A, s.B, s.bias) if p is not None] + \
            [p for n in self.norms for p in (n.weight, n.bias) if p is not None]

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def place(self, devices: dict[str, torch.device]) -> "LoraAdapter":
        """Move each unit's pairs to where that unit computes ({unit: device}); the Parameters keep their identity,
        so linears already hooked (resident units) see the move."""
        hooked = [s for pairs in self.by_linear.values() for s, _ in pairs]   # a tensor-parallel rank's own
        for s in {id(s): s for s in self.slots + hooked}.values():
            d = devices.get(s.unit)
            if d is not None:
                for p in (s.A, s.B, s.bias):
                    if p is not None and p.device != torch.device(d):
                        p.data = p.data.to(d)
                if s.bias_base is not None:
                    s.bias_base = s.bias_base.to(d)
        for n in self.norms:
            d = devices.get(n.unit)
            if d is not None:
                for p in (n.weight, n.bias):
                    if p is not None and p.device != torch.device(d):
                        p.data = p.data.to(d)
        return self

    # -- PEFT's files ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's keys: base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r]."""
        out = {}
        for s in self.slots:
            if s.A is not None:
                out[f"{PREFIX}{s.path}.lora_A.weight"] = s.A.detach().cpu().contiguous()
                out[f"{PREFIX}{s.path}.lora_B.weight"] = s.B.detach().cpu().contiguous()
            if s.bias is not None and s.bias_ready:
                out[_bias_key(s)] = s.bias.detach().cpu().contiguous()
        for n in self.norms:
            if n.ready:
                for what, p in (("weight", n.weight), ("bias", n.bias)):
                    if p is not None:
                        out[f"{PREFIX}{n.path}.{what}"] = p.detach().cpu().contiguous()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Values saved by ``state_dict`` (a trainer checkpoint) into this adapter's tensors, in place."""
        for s in self.slots:
            for ab in ("A", "B"):
                if getattr(s, ab) is not None and f"{PREFIX}{s.path}.lora_{ab}.weight" in tensors:
                    getattr(s, ab).data.copy_(tensors[f"{PREFIX}{s.path}.lora_{ab}.weight"])
            if s.bias is not None and _bias_key(s) in tensors:
                s.bias.data.copy_(tensors[_bias_key(s)])
                s.bias_ready = True
        for n in self.norms:
            first = f"{PREFIX}{n.path}.{'weight' if n.weight is not None else 'bias'}"
            if first in tensors:   # a norm's tensors are saved together
                for what, p in (("weight", n.weight), ("bias", n.bias)):
                    if p is not None:
                        p.data.copy_(tensors[f"{PREFIX}{n.path}.{what}"])
                n.ready = True

    def peft_config(self) -> dict:
        st, fam = self.settings, FAMILIES[self.cfg.family]
        every = [m for m in module_maps(fam, self.cfg)]
        pairs = [s for s in self.slots if s.A is not None]
        names = _short_names([m.module for m in {s.map.module: s.map for s in pairs}.values()],
                             [o.module for o in every])
        norms = _short_names(sorted({n.map.module for n in self.norms if n.weight is not None}),
                             [o.module for o in norm_maps(fam, self.cfg)], dotted=False)
        layers = sorted({int(s.unit.split(".")[1]) for s in pairs if s.unit != "head"})
        all_layers = layers == list(range(self.cfg.n_layers)) or not layers
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model,
                "r": st.r, "lora_alpha": st.alpha, "lora_dropout": st.dropout, "target_modules": sorted(names),
                "fan_in_fan_out": fam.conv1d, "bias": "all" if st.bias == "all" else
                "lora_only" if any(s.bias is not None for s in self.slots) else "none", "use_rslora": st.rslora, "use_dora": False,
                "modules_to_save": sorted(norms) or None, "init_lora_weights": True, "inference_mode": True,
                "layers_to_transform": None if all_layers else layers, "rank_pattern": {}, "alpha_pattern": {}}

    def save(self, path: str) -> str:
        """Write the adapter into directory ``path`` as PEFT does (adapter_config.json + adapter_model.safetensors).
        Each file is written beside its final name, synced and renamed over it, so a crash leaves the previous
        file or the new one, never half of one; other files in the directory (a trainer's checkpoint) stay."""
        from safetensors.torch import save_file

        path = os.path.abspath(path)
        if os.path.lexists(path) and not os.path.isdir(path):
            raise OverspillError(f"{path}: exists and is not a directory; expected an adapter directory")
        if os.path.isfile(os.path.join(path, "config.json")):
            raise OverspillError(f"{path}: holds a model (config.json); write the adapter to a directory of its own")
        os.makedirs(path, exist_ok=True)
        tmp = os.path.join(path, f".{WEIGHTS_FILE}.tmp-{os.getpid()}")
        save_file(self.state_dict(), tmp, metadata={"format": "pt"})
        _publish_file(tmp, os.path.join(path, WEIGHTS_FILE))
        tmp = os.path.join(path, f".{CONFIG_FILE}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(self.peft_config(), f, indent=2)
        _publish_file(tmp, os.path.join(path, CONFIG_FILE))
        return path

    @classmethod
    def load(cls, path: str, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> "LoraAdapter":
        """An adapter directory written by PEFT's ``save_pretrained`` or by ``save``, for a model with ``cfg``."""
        conf = read_config(path)
        tensors = read_weights(path)
        settings = LoraSettings(r=int(conf["r"]), alpha=float(conf.get("lora_alpha", 8)),
                                dropout=float(conf.get("lora_dropout") or 0.0), targets=("?",),
                                rslora=bool(conf.get("use_rslora", False)), bias=conf.get("bias") or "none",
                                norms=tuple(conf.get("modules_to_save") or ()))
        every = {p: (p, u, m) for p, u, m in _concrete(module_maps(FAMILIES[cfg.family], cfg), cfg.n_layers)}
        try:
            norm_paths = {p for p, _, _ in resolve_norms(cfg, settings.norms)}
        except OverspillError as e:
            raise OverspillError(f"{path}/{CONFIG_FILE}: modules_to_save: {e} (overspill trains norm modules only)"
                                 ) from None
        # bias "all": every module's and norm's bias, under its own name
        biased = set(every) | {p for p, _, _ in resolve_norms(cfg, ("all",))} if settings.bias == "all" else set()
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        extra: dict[str, torch.Tensor] = {}    # trained biases and norms, under PEFT's keys
        for key, t in tensors.items():
            short = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if biased and (".original_module." in short or ".modules_to_save." in short):
                continue   # with bias "all" PEFT also saves a norm to save's frozen original and a second copy
            if short.endswith(".base_layer.bias") or short.rpartition(".")[0] in norm_paths or \
                    (short.endswith(".bias") and short[:-len(".bias")] in biased):
                extra[f"{PREFIX}{short}"] = t
                continue
            if ".lora_" not in key and key.endswith(".weight") and t.dim() == 2 and \
                    max(t.shape) == cfg.vocab_size:
                continue   # a tied model's embedding / LM head, which PEFT saves beside the pairs as it was (not LoRA)
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if m is None or m.group(1) not in every:
                what = m.group(1) if m else key
                raise OverspillError(f"{path}/{WEIGHTS_FILE}: tensor {key!r} names module {what!r}, which this "
                                     f"{cfg.family} model does not have (expected keys like "
                                     f"{PREFIX}{next(iter(every))}.lora_A.weight)")
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        if not pairs:
            raise OverspillError(f"{path}/{WEIGHTS_FILE}: no lora_A / lora_B tensors")
        slots = [every[p] for p in every if p in pairs]
        settings.targets = tuple(p for p, _, _ in slots)
        ad = cls(cfg, settings, dtype=dtype, base_model=conf.get("base_model_name_or_path"), _slots=slots)
        for s in ad.slots:
            if s.A is None:
                continue                        # a trained bias alone (bias "all")
            got = pairs[s.path]
            for ab, want in (("A", (settings.r, s.map.in_features)), ("B", (s.map.out_features, settings.r))):
                t = got.get(ab)
                if t is None:
                    raise OverspillError(f"{path}/{WEIGHTS_FILE}: {s.path} has no lora_{ab} weight")
                if tuple(t.shape) != want:
                    raise OverspillError(f"{path}/{WEIGHTS_FILE}: {s.path}.lora_{ab}.weight has shape "
                                         f"{list(t.shape)}, expected {list(want)} (r={settings.r})")
                getattr(s, ab).data.copy_(t.to(dtype))
        for k in extra:
            if k.endswith(".base_layer.bias") and k[len(PREFIX):-len(".base_layer.bias")] not in pairs:
                raise OverspillError(f"{path}/{WEIGHTS_FILE}: {k} is the bias of an adapted module, but the module "
                                     f"has no LoRA pairs")
        want = {_bias_key(s): (s.map.out_features,) for s in ad.slots if s.bias is not None}
        want.update({f"{PREFIX}{n.path}.{w}": (n.map.size,) for n in ad.norms
                     for w, p in (("weight", n.weight), ("bias", n.bias)) if p is not None})
        for k, shape in want.items():
            t = extra.get(k)
            if t is None:
                raise OverspillError(f"{path}/{WEIGHTS_FILE}: no {k} (its {CONFIG_FILE} trains it)")
            if tuple(t.shape) != shape:
                raise OverspillError(f"{path}/{WEIGHTS_FILE}: {k} has shape {list(t.shape)}, expected {list(shape)}")
        ad.load_state_dict({k: v.to(dtype) for k, v in extra.items()})
        return ad


def _bias_key(s: Slot) -> str:
    """PEFT's key of a trained linear bias: under the LoRA layer's base_layer where the module has a pair."""
    return f"{PREFIX}{s.path}.base_layer.bias" if s.A is not None else f"{PREFIX}{s.path}.bias"


def _short_names(modules: list[str], every: list[str], dotted: bool = True) -> list[str]:
    """For each module template, the shortest dotted suffix that names only it among ``every`` (GPT-2 has
    attn.c_proj and mlp.c_proj): what PEFT's target_modules list (matched after a dot), or with ``dotted=False``
    its modules_to_save (matched as plain suffixes: "norm" would also name input_layernorm)."""
    names = []
    for module in modules:
        parts = module.split(".")
        for k in range(1, len(parts) + 1):
            suf = ".".join(parts[-k:])
            hits = sum(o == suf or o.endswith("." + suf) if dotted else o.endswith(suf) for o in every)
            if "{}" not in suf and hits == 1:
                names.append(suf)
                break
    return names


def _publish_file(tmp: str, dst: str) -> None:
    os.chmod(tmp, 0o644)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dst)


def read_config(path: str) -> dict:
    """adapter_config.json, checked for what overspill runs: LoRA without DoRA; trained biases (of the adapted modules
    or all) and trained norm modules (checked against the model by ``LoraAdapter.load``)."""
    if not os.path.isdir(path):
        raise OverspillError(f"{path}: no such adapter directory")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise OverspillError(f"{path}: missing {CONFIG_FILE} (expected a PEFT LoRA adapter directory)")
    conf = read_json(file, "adapter config")
    if conf.get("peft_type") != "LORA":
        raise OverspillError(f"{file}: peft_type is {conf.get('peft_type')!r}; overspill loads LoRA adapters "
                             f"(peft_type LORA)")
    bad = [k for k, ok in (("use_dora", not conf.get("use_dora")),
                           ("bias", conf.get("bias", "none") in BIAS_MODES + (None,)),
                           ("rank_pattern", not conf.get("rank_pattern")),
                           ("alpha_pattern", not conf.get("alpha_pattern"))) if not ok]
    if bad:
        raise OverspillError(f"{file}: {', '.join(f'{k}={conf.get(k)!r}' for k in bad)} is not supported (overspill "
                             f"loads LoRA with bias 'none', 'lora_only' or 'all', norm modules to save, no DoRA, one r "
                             f"and alpha)")
    if not isinstance(conf.get("r"), int) or conf["r"] < 1:
        raise OverspillError(f"{file}: r must be an integer >= 1, got {conf.get('r')!r}")
    return conf


def read_weights(path: str) -> dict[str, torch.Tensor]:
    st, bn = os.path.join(path, WEIGHTS_FILE), os.path.join(path, WEIGHTS_BIN)
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file
            return load_file(st)
        if os.path.isfile(bn):   # an older PEFT's pickle: tensors only, never code
            return torch.load(bn, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OverspillError(f"{st if os.path.isfile(st) else bn}: cannot read adapter weights "
                             f"({str(e).splitlines()[0][:200]})") from None
    raise OverspillError(f"{path}: missing {WEIGHTS_FILE} (or {WEIGHTS_BIN})")
