"""LoRA adapters (Hu et al. 2021, eq. 3: h = W0 x + B A x * alpha / r) over overspill's frozen linears.

The trainable pairs are kept per Hugging Face module, as PEFT keeps them (``lora_A`` [r, in], ``lora_B`` [out, r]),
so an adapter is a PEFT adapter in memory and on disk. overspill runs fused linears (q|k|v, gate|up, with GPT-J's
and GPT-NeoX's row layouts changed at load); ``families.adapters`` says which canonical rows each module's outputs
are, and ``LoraLinear`` adds each pair's product into exactly those rows. The base weight is never touched: any
format (dense, packed, int8/int4/nf4, streamed from disk) works, and autograd reaches the pairs through the base's
input gradient.

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
from ..families.adapters import ModuleMap, module_maps
from ..model.linear import Linear

CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
CANONICAL = ("qkv", "out", "up", "down", "lm")
DEFAULT_TARGETS = ("qkv", "out", "up", "down")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS   # canonical names (qkv,out,up,down,lm) or Hugging Face module names
    rslora: bool = False                          # scale alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r

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
        return self


@dataclass
class Slot:
    """One adapted module of one layer."""
    path: str             # the Hugging Face module path, e.g. transformer.h.3.attn.q_proj
    unit: str             # block.3 | head
    map: ModuleMap
    A: torch.nn.Parameter = field(repr=False)
    B: torch.nn.Parameter = field(repr=False)


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
        for slot, rows in self.pairs:
            A, B = slot.A, slot.B
            h = x.to(A.dtype)
            if p:
                h = F.dropout(h, p, True)                   # its own mask per module, as PEFT draws them
            d = (F.linear(F.linear(h, A), B) * s).to(y.dtype)
            if rows is not None:                            # a contiguous block of the fused output
                y = torch.cat([y[..., : rows.start], y[..., rows] + d, y[..., rows.stop:]], -1)
            else:
                y = y.index_add(-1, slot.map.cols.to(y.device), d)
        return y

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + sum(s.A.numel() * s.A.element_size() + s.B.numel() * s.B.element_size()
                                      for s, _ in self.pairs)

    def dequantize(self) -> torch.Tensor:
        w = self.base.dequantize().float().clone()
        for slot, _ in self.pairs:
            w.index_add_(0, slot.map.cols.to(w.device), (slot.B.detach().float() @ slot.A.detach().float())
                         * self.adapter.settings.scale)
        return w


def _rows(cols: torch.Tensor) -> slice | None:
    a = int(cols[0])
    return slice(a, a + cols.numel()) if torch.equal(cols, torch.arange(a, a + cols.numel())) else None


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
            self.slots.append(Slot(path, unit, m, torch.nn.Parameter(A), torch.nn.Parameter(B)))
        self._index()

    def _index(self, slots: list[Slot] | None = None) -> None:
        self.by_linear: dict[tuple[str, str], list[tuple[Slot, slice | None]]] = {}
        for s in self.slots if slots is None else slots:
            self.by_linear.setdefault((s.unit, s.map.linear), []).append((s, _rows(s.map.cols)))

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
            A, B, cols = s.A.detach(), s.B.detach(), s.map.cols
            if kind == "rows":
                held = torch.cat([torch.arange(a, b) for a, b in ranges])   # canonical row of each local row
                local = torch.full((max(int(held.max()), int(cols.max())) + 1,), -1, dtype=torch.long)
                local[held] = torch.arange(held.numel())
                keep = local[cols] >= 0
                if not bool(keep.any()):
                    continue                        # none of this module's rows live on this rank
                B, cols = B[keep], local[cols[keep]]
            elif kind == "cols":
                A = A[:, torch.cat([torch.arange(a, b) for a, b in ranges])]
            m = dataclasses.replace(s.map, out_features=B.shape[0], in_features=A.shape[1], cols=cols)
            derived.append(Slot(s.path, s.unit, m, torch.nn.Parameter(A.contiguous(), requires_grad=False),
                                torch.nn.Parameter(B.contiguous(), requires_grad=False)))
        self._index(derived)
        return self

    # -- running --------------------------------------------------------------------------------------------------
    def hook(self, unit: str, name: str, lin: Linear) -> Linear:
        """The loader's linear hook: the base linear, wrapped where this adapter has pairs for it."""
        pairs = self.by_linear.get((unit, name))
        return lin if not pairs else LoraLinear(lin, pairs, self)

    def train(self, mode: bool = True) -> "LoraAdapter":
        self.training = mode
        return self

    def eval(self) -> "LoraAdapter":
        return self.train(False)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for s in self.slots for p in (s.A, s.B)]

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def place(self, devices: dict[str, torch.device]) -> "LoraAdapter":
        """Move each unit's pairs to where that unit computes ({unit: device}); the Parameters keep their identity,
        so linears already hooked (resident units) see the move."""
        hooked = [s for pairs in self.by_linear.values() for s, _ in pairs]   # a tensor-parallel rank's own
        for s in {id(s): s for s in self.slots + hooked}.values():
            d = devices.get(s.unit)
            if d is not None and s.A.device != torch.device(d):
                s.A.data, s.B.data = s.A.data.to(d), s.B.data.to(d)
        return self

    # -- PEFT's files ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's keys: base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight [out, r]."""
        out = {}
        for s in self.slots:
            out[f"{PREFIX}{s.path}.lora_A.weight"] = s.A.detach().cpu().contiguous()
            out[f"{PREFIX}{s.path}.lora_B.weight"] = s.B.detach().cpu().contiguous()
        return out

    def peft_config(self) -> dict:
        st, fam = self.settings, FAMILIES[self.cfg.family]
        every = [m for m in module_maps(fam, self.cfg)]
        names = []
        for m in {s.map.module: s.map for s in self.slots}.values():
            # the shortest dotted suffix that names only this kind of module (GPT-2 has attn.c_proj and mlp.c_proj)
            parts = m.module.split(".")
            for k in range(1, len(parts) + 1):
                suf = ".".join(parts[-k:])
                if "{}" not in suf and sum(o.module == suf or o.module.endswith("." + suf) for o in every) == 1:
                    names.append(suf)
                    break
        layers = sorted({int(s.unit.split(".")[1]) for s in self.slots if s.unit != "head"})
        all_layers = layers == list(range(self.cfg.n_layers)) or not layers
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model,
                "r": st.r, "lora_alpha": st.alpha, "lora_dropout": st.dropout, "target_modules": sorted(names),
                "fan_in_fan_out": fam.conv1d, "bias": "none", "use_rslora": st.rslora, "use_dora": False,
                "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
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
                                rslora=bool(conf.get("use_rslora", False)))
        every = {p: (p, u, m) for p, u, m in _concrete(module_maps(FAMILIES[cfg.family], cfg), cfg.n_layers)}
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
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
            got = pairs[s.path]
            for ab, want in (("A", (settings.r, s.map.in_features)), ("B", (s.map.out_features, settings.r))):
                t = got.get(ab)
                if t is None:
                    raise OverspillError(f"{path}/{WEIGHTS_FILE}: {s.path} has no lora_{ab} weight")
                if tuple(t.shape) != want:
                    raise OverspillError(f"{path}/{WEIGHTS_FILE}: {s.path}.lora_{ab}.weight has shape "
                                         f"{list(t.shape)}, expected {list(want)} (r={settings.r})")
                getattr(s, ab).data.copy_(t.to(dtype))
        return ad


def _publish_file(tmp: str, dst: str) -> None:
    os.chmod(tmp, 0o644)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dst)


def read_config(path: str) -> dict:
    """adapter_config.json, checked for what overspill runs: LoRA without DoRA, trained-bias or saved modules."""
    if not os.path.isdir(path):
        raise OverspillError(f"{path}: no such adapter directory")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise OverspillError(f"{path}: missing {CONFIG_FILE} (expected a PEFT LoRA adapter directory)")
    conf = read_json(file, "adapter config")
    if conf.get("peft_type") != "LORA":
        raise OverspillError(f"{file}: peft_type is {conf.get('peft_type')!r}; overspill loads LoRA adapters "
                             f"(peft_type LORA)")
    bad = [k for k, ok in (("use_dora", not conf.get("use_dora")), ("bias", conf.get("bias", "none") == "none"),
                           ("modules_to_save", not conf.get("modules_to_save")),
                           ("rank_pattern", not conf.get("rank_pattern")),
                           ("alpha_pattern", not conf.get("alpha_pattern"))) if not ok]
    if bad:
        raise OverspillError(f"{file}: {', '.join(f'{k}={conf.get(k)!r}' for k in bad)} is not supported (overspill "
                             f"loads plain LoRA: bias 'none', no DoRA, no modules_to_save, one r and alpha)")
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
