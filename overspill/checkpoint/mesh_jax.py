"""GPT-J-6B's original checkpoint: mesh-transformer-jax's "slim" tensor-parallel npz shards.

Layout (mesh_transformer/checkpoint.py write_ckpt, slim_model.py; read the same way by
to_hf_weights.py and FasterTransformer's gptj_ckpt_convert.py)::

    step_383500/
      shard_0/ 0.npz 1.npz ... 15.npz      one directory per tensor-parallel rank (S = 8 for 6B)
      ...
      shard_7/ 0.npz ... 15.npz

The model state {"params": haiku params, "step": n} is flattened in jax's order (dict keys
sorted, so layer_0, layer_1, layer_10, ... layer_19, layer_2, ...), each leaf indexed at this
rank, and the leaves dealt out in order over the 16 files (np.savez: arr_0, arr_1, ...). Per
rank, with d = d_model, F = 4d, V = n_vocab; haiku linears are [in, out], torch's [out, in]::

    embedding_shard/~/linear      b [d]       w [V/S, d]   vocab rows      wte = cat(w) + sum_s(b)
    layer_i/~/linear   (q)        w [d, d/S]  column split (heads)         q_proj = cat(w, out).T
    layer_i/~/linear_1 (v)        w [d, d/S]     "       (creation order q, v, k)
    layer_i/~/linear_2 (k)        w [d, d/S]     "
    layer_i/~/linear_3 (o)        w [d/S, d]  row split                    out_proj = cat(w, in).T
    layer_i/~/linear_4 (fc_in)    b [F/S]     w [d, F/S]  column split
    layer_i/~/linear_5 (fc_out)   b [d]       w [F/S, d]  row split; each rank adds its b before the
                                                          psum, so the model's bias is sum_s(b)
    layer_i/~/replicated_layer_norm  offset [d]  scale [d]  the model uses rank 0's (all_gather()[0])
    projection_shard/~/linear     b [V/S]     w [d, V/S]  column split     lm_head
    projection_shard/~/replicated_layer_norm                                ln_f (rank 0's)
    step                          [] int

The one layer norm feeds attention and MLP in parallel (GPT-J's shared norm); rotary is
GPT-J's interleaved form on the first pe_rotary_dims of each head, so q and k keep the Hugging
Face GPT-J layout and the gptj family's transforms apply unchanged. bfloat16 arrays are saved
as numpy void 'V2' (numpy has no bfloat16): reinterpreted here, bit for bit.

The arrays do not give the head count or rotary width: they come from ``--config`` (a
mesh-transformer-jax JSON such as configs/6B_roto_256.json, or a Hugging Face GPT-J
config.json), a config.json inside the checkpoint directory, or, for exactly GPT-J-6B's shapes,
that model's published settings.
"""
from __future__ import annotations

import os
import re
import struct
import zipfile

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from .original import OriginalCheckpoint, cat_into, read_config_file, summed

# GPT-J-6B (configs/6B_roto_256.json, and EleutherAI/gpt-j-6B's config.json on the Hugging Face hub)
GPTJ_6B = {"d_model": 4096, "layers": 28, "n_vocab": 50400, "n_heads": 16, "pe_rotary_dims": 64, "seq": 2048,
           "eos": 50256}
_LAYER = ("q", "v", "k", "o", "fc_in.b", "fc_in.w", "fc_out.b", "fc_out.w", "ln.offset", "ln.scale")
_HEAD = ("lm.b", "lm.w", "ln_f.offset", "ln_f.scale")
_DESCR = {"q": "linear/w", "v": "linear_1/w", "k": "linear_2/w", "o": "linear_3/w", "fc_in.b": "linear_4/b",
          "fc_in.w": "linear_4/w", "fc_out.b": "linear_5/b", "fc_out.w": "linear_5/w",
          "ln.offset": "replicated_layer_norm/offset", "ln.scale": "replicated_layer_norm/scale",
          "lm.b": "linear/b", "lm.w": "linear/w", "ln_f.offset": "replicated_layer_norm/offset",
          "ln_f.scale": "replicated_layer_norm/scale", "wte.b": "linear/b", "wte.w": "linear/w"}


def find(path: str) -> str | None:
    """The step directory (holding shard_0/) at or directly under ``path``, or None when this is not the format."""
    if os.path.isdir(os.path.join(path, "shard_0")):
        return path
    steps = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d, "shard_0")))
    if len(steps) > 1:
        raise CheckpointError(f"{path}: holds several mesh-transformer-jax checkpoints ({', '.join(steps)}); "
                              f"pass one of them")
    return os.path.join(path, steps[0]) if steps else None


def open_checkpoint(path: str, config: str | None) -> "MeshJaxCheckpoint":
    return MeshJaxCheckpoint(path, config)


# -- npz members, memory-mapped ------------------------------------------------------------------

class _Array:
    """One array of an .npz file: its shape and dtype from the .npy header; ``load()`` maps the bytes (copy on
    write: nothing is read until used) when the member is stored uncompressed, as np.savez writes them."""

    def __init__(self, path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo):
        self.path, self.name = path, info.filename.removesuffix(".npy")
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, self.fortran, self.dtype = read(f)
            header_len = f.tell()
        self.offset = None
        if info.compress_type == zipfile.ZIP_STORED and not self.dtype.hasobject:
            with open(path, "rb") as raw:   # the local file header: 30 bytes, then name and extra field
                raw.seek(info.header_offset)
                head = raw.read(30)
                n_name, n_extra = struct.unpack("<HH", head[26:30])
            self.offset = info.header_offset + 30 + n_name + n_extra + header_len

    def load(self) -> torch.Tensor:
        if self.offset is not None and int(np.prod(self.shape)) > 0:
            a = np.memmap(self.path, dtype=self.dtype, mode="c", offset=self.offset, shape=self.shape,
                          order="F" if self.fortran else "C")
        else:
            with np.load(self.path, allow_pickle=False) as z:
                a = z[self.name]
        if a.dtype == np.dtype("V2"):          # bfloat16 as saved by jax: the raw 16 bits
            return torch.from_numpy(np.asarray(a).view(np.uint16)).view(torch.bfloat16)
        if a.dtype not in (np.float32, np.float16, np.float64, np.int32, np.int64, np.uint32):
            raise CheckpointError(f"{self.path}: array '{self.name}' has dtype {a.dtype}, not a float tensor")
        return torch.from_numpy(np.asarray(a))


def _list_npz(path: str) -> list[_Array]:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if i.filename.endswith(".npy")]
            by_index = {}
            for i in members:
                m = re.fullmatch(r"arr_(\d+)\.npy", i.filename)
                if not m:
                    raise CheckpointError(f"{path}: unexpected array '{i.filename}' (np.savez positional arrays "
                                          f"arr_0, arr_1, ... expected)")
                by_index[int(m.group(1))] = i
            if sorted(by_index) != list(range(len(by_index))):
                raise CheckpointError(f"{path}: arrays arr_0..arr_{len(by_index) - 1} expected, found "
                                      f"{sorted(by_index)}")
            return [_Array(path, zf, by_index[k]) for k in range(len(by_index))]
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None


# -- the checkpoint ------------------------------------------------------------------------------

def _leaf_names(n_layers: int) -> list[tuple[str, int | None]]:
    """(role, layer) of every leaf in jax's flattening order: module names sorted as strings."""
    out = [("wte.b", None), ("wte.w", None)]
    for i in sorted(range(n_layers), key=str):
        out += [(r, i) for r in _LAYER]
    return out + [(r, None) for r in _HEAD]


class MeshJaxCheckpoint(OriginalCheckpoint):
    kind = "mesh-transformer-jax"

    def __init__(self, path: str, config: str | None = None):
        self.path = path
        present = [d for d in os.listdir(path) if re.fullmatch(r"shard_\d+", d)]
        listing = {d: self._files(os.path.join(path, d)) for d in present}
        files = max(listing.values(), key=len)   # a file missing from some rank's directory is named below
        for d in sorted(present, key=lambda d: int(d[6:])):
            missing = [f for f in files if f not in listing[d]]
            if missing:
                raise CheckpointError(f"{os.path.join(path, d, missing[0])}: missing shard file (other ranks have "
                                      f"{files[0]}..{files[-1]})")
        first = [a for f in files for a in _list_npz(os.path.join(path, "shard_0", f))]
        n = len(first)
        has_step = n > 0 and first[-1].shape in ((), (1,))
        L, rem = divmod(n - has_step - 6, 10)
        if rem or L < 1:
            raise CheckpointError(f"{os.path.join(path, 'shard_0')}: {n} arrays do not make a slim GPT-J checkpoint "
                                  f"(2 embedding + 10 per layer + 4 head arrays, then the step; a full training "
                                  f"checkpoint with optimizer state must be slimmed first with mesh-transformer-jax's "
                                  f"slim_model.py)")
        self.leaf = {key: k for k, key in enumerate(_leaf_names(L))}
        wte, q, fc = (first[self.leaf[r, i]].shape for r, i in (("wte.w", None), ("q", 0), ("fc_in.w", 0)))
        if len(wte) != 2 or len(q) != 2 or len(fc) != 2 or q[1] == 0 or q[0] % q[1]:
            raise CheckpointError(f"{first[0].path}: array shapes {list(wte)}, {list(q)}, {list(fc)} are not those "
                                  f"of a GPT-J slim checkpoint (2-D embedding and projections expected)")
        S = q[0] // q[1]                        # q_proj is [d, d] split S ways by columns
        for s in range(S):
            if not os.path.isdir(os.path.join(path, f"shard_{s}")):
                raise CheckpointError(f"{os.path.join(path, f'shard_{s}')}: missing shard directory (the arrays are "
                                      f"split {S} ways: expected shard_0..shard_{S - 1})")
        extra = sorted(set(d for d in os.listdir(path) if re.fullmatch(r"shard_\d+", d)) -
                       {f"shard_{s}" for s in range(S)})
        if extra:
            raise CheckpointError(f"{os.path.join(path, extra[0])}: unexpected shard directory (the arrays are split "
                                  f"{S} ways: expected shard_0..shard_{S - 1})")
        self.shards: list[list[_Array]] = [first]   # [rank][leaf]
        for s in range(1, S):
            d = os.path.join(path, f"shard_{s}")
            self.shards.append([a for f in files for a in _list_npz(os.path.join(d, f))])
            if len(self.shards[s]) != n:
                raise CheckpointError(f"{d}: {len(self.shards[s])} arrays, but shard_0 has {n}")
        self.S, self.L = S, L
        self.d, self.V, self.F = q[0], wte[0] * S, fc[1] * S
        self.stored = self.shards[0][self.leaf["q", 0]].load().dtype
        hf_config = self._hf_config(config)
        super().__init__(path, hf_config, config or os.path.join(path, "config.json"))
        self._check_shapes()

    @staticmethod
    def _files(d: str) -> list[str]:
        if not os.path.isdir(d):
            raise CheckpointError(f"{d}: missing shard directory")
        names = [f for f in os.listdir(d) if re.fullmatch(r"\d+\.npz", f)]
        names.sort(key=lambda f: int(f.split(".")[0]))
        if not names:
            raise CheckpointError(f"{d}: no .npz files (expected 0.npz, 1.npz, ...)")
        if names != [f"{k}.npz" for k in range(len(names))]:
            gap = next(k for k in range(len(names)) if f"{k}.npz" not in names)
            raise CheckpointError(f"{os.path.join(d, f'{gap}.npz')}: missing shard file (the files are numbered "
                                  f"0.npz..{names[-1]} without gaps)")
        return names

    # -- config --------------------------------------------------------------------------------
    def _hf_config(self, config: str | None) -> dict:
        shapes = {"n_embd": self.d, "n_layer": self.L, "vocab_size": self.V}
        src = config or next((p for p in [os.path.join(self.path, "config.json")] if os.path.isfile(p)), None)
        if src is None:
            if (self.d, self.L, self.V) != (GPTJ_6B["d_model"], GPTJ_6B["layers"], GPTJ_6B["n_vocab"]):
                raise ConfigError(f"{self.path}: the arrays give d_model {self.d}, {self.L} layers, vocab {self.V}, "
                                  f"but not the head count or rotary dims: pass --config (a mesh-transformer-jax "
                                  f"JSON config or a Hugging Face GPT-J config.json)")
            c = GPTJ_6B
            return self._gptj(c["n_heads"], c["pe_rotary_dims"], c["seq"], c["eos"])
        d = read_config_file(src)
        if "model_type" in d or "architectures" in d:       # a Hugging Face GPT-J config.json
            if d.get("model_type") != "gptj":
                raise ConfigError(f"{src}: model_type {d.get('model_type')!r}; a mesh-transformer-jax checkpoint is "
                                  f"GPT-J (model_type 'gptj')")
            for k, v in shapes.items():
                if d.get(k, v) != v:
                    raise ConfigError(f"{src}: {k} is {d[k]}, but the checkpoint's arrays give {v}")
            if d.get("n_inner") not in (None, self.F):
                raise ConfigError(f"{src}: n_inner is {d['n_inner']}, but the checkpoint's arrays give {self.F}")
            return {**d, **shapes, "architectures": ["GPTJForCausalLM"]}
        need = [k for k in ("n_heads",) if k not in d]
        if need:
            raise ConfigError(f"{src}: missing '{need[0]}' (expected a mesh-transformer-jax config with d_model, "
                              f"n_heads, layers, n_vocab, pe_rotary_dims, or a Hugging Face GPT-J config.json)")
        for k, v in {"d_model": self.d, "layers": self.L, "n_vocab": self.V, "cores_per_replica": self.S}.items():
            if d.get(k, v) != v:
                raise ConfigError(f"{src}: {k} is {d[k]}, but the checkpoint's arrays give {v}")
        if d.get("norm", "layernorm") != "layernorm" or d.get("pe", "rotary") != "rotary":
            raise ConfigError(f"{src}: norm {d.get('norm')!r} / pe {d.get('pe')!r} is not GPT-J's "
                              f"(layernorm, rotary): not supported")
        if self.d % d["n_heads"]:
            raise ConfigError(f"{src}: n_heads {d['n_heads']} does not divide d_model {self.d}")
        return self._gptj(int(d["n_heads"]), int(d.get("pe_rotary_dims", self.d // d["n_heads"])),
                          int(d.get("seq", 2048)), None)

    def _gptj(self, heads: int, rotary: int, seq: int, eos: int | None) -> dict:
        return {"architectures": ["GPTJForCausalLM"], "model_type": "gptj", "vocab_size": self.V, "n_positions": seq,
                "n_embd": self.d, "n_layer": self.L, "n_head": heads, "rotary_dim": rotary, "n_inner": None,
                "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False,
                "bos_token_id": eos, "eos_token_id": eos}

    def _piece_shape(self, role: str) -> tuple[int, ...]:
        d, F, V, S = self.d, self.F, self.V, self.S
        return {"wte.b": (d,), "wte.w": (V // S, d), "q": (d, d // S), "v": (d, d // S), "k": (d, d // S),
                "o": (d // S, d), "fc_in.b": (F // S,), "fc_in.w": (d, F // S), "fc_out.b": (d,),
                "fc_out.w": (F // S, d), "ln.offset": (d,), "ln.scale": (d,), "lm.b": (V // S,), "lm.w": (d, V // S),
                "ln_f.offset": (d,), "ln_f.scale": (d,)}[role]

    def _check_shapes(self) -> None:
        """Every rank's every array against the shape the config implies, before anything is converted."""
        if self.d % self.S or self.config.n_heads % self.S:
            raise CheckpointError(f"{self.path}: {self.S} shards do not split d_model {self.d} / "
                                  f"{self.config.n_heads} heads evenly")
        for (role, layer), k in self.leaf.items():
            want = self._piece_shape(role)
            for s, arrays in enumerate(self.shards):
                a = arrays[k]
                if tuple(a.shape) != want:
                    module = "embedding_shard" if role.startswith("wte") else \
                        "projection_shard" if layer is None else f"layer_{layer}"
                    raise CheckpointError(f"{a.path}: array {a.name} ({module}/~/{_DESCR[role]}) has shape "
                                          f"{list(a.shape)}, expected {list(want)} (d_model {self.d}, "
                                          f"{self.S} shards, vocab {self.V}, mlp {self.F})")

    # -- units ---------------------------------------------------------------------------------
    def _pieces(self, role: str, layer: int | None = None) -> list[torch.Tensor]:
        k = self.leaf[role, layer]
        return [arrays[k].load() for arrays in self.shards]

    def hf_shapes(self, unit: str) -> dict[str, tuple[int, ...]]:
        d, F, V = self.d, self.F, self.V
        if unit == "embed":
            return {"transformer.wte.weight": (V, d)}
        if unit == "head":
            return {"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,), "lm_head.weight": (V, d),
                    "lm_head.bias": (V,)}
        p = f"transformer.h.{unit.split('.')[1]}."
        return {p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "attn.q_proj.weight": (d, d),
                p + "attn.k_proj.weight": (d, d), p + "attn.v_proj.weight": (d, d), p + "attn.out_proj.weight": (d, d),
                p + "mlp.fc_in.weight": (F, d), p + "mlp.fc_in.bias": (F,), p + "mlp.fc_out.weight": (d, F),
                p + "mlp.fc_out.bias": (d,)}

    def hf_unit(self, unit: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        P = self._pieces
        rank0 = lambda role, i=None: self.shards[0][self.leaf[role, i]].load().to(dtype, copy=True)   # all_gather()[0]
        if unit == "embed":
            # the embedding is a one-hot matmul with a bias that every rank adds before the psum
            return {"transformer.wte.weight": cat_into(P("wte.w"), 0, dtype, add=summed(P("wte.b"), torch.float32))}
        if unit == "head":
            return {"transformer.ln_f.weight": rank0("ln_f.scale"), "transformer.ln_f.bias": rank0("ln_f.offset"),
                    "lm_head.weight": cat_into([w.t() for w in P("lm.w")], 0, dtype),
                    "lm_head.bias": cat_into(P("lm.b"), 0, dtype)}
        i = int(unit.split(".")[1])
        p = f"transformer.h.{i}."
        col = lambda role: cat_into([w.t() for w in P(role, i)], 0, dtype)   # [in, out/S] -> rows of [out, in]
        row = lambda role: cat_into([w.t() for w in P(role, i)], 1, dtype)   # [in/S, out] -> columns of [out, in]
        return {p + "ln_1.weight": rank0("ln.scale", i), p + "ln_1.bias": rank0("ln.offset", i),
                p + "attn.q_proj.weight": col("q"), p + "attn.k_proj.weight": col("k"),
                p + "attn.v_proj.weight": col("v"), p + "attn.out_proj.weight": row("o"),
                p + "mlp.fc_in.weight": col("fc_in.w"), p + "mlp.fc_in.bias": cat_into(P("fc_in.b", i), 0, dtype),
                p + "mlp.fc_out.weight": row("fc_out.w"), p + "mlp.fc_out.bias": summed(P("fc_out.b", i), dtype)}

    def extra_files(self) -> dict[str, str]:
        for d in (self.path, os.path.dirname(os.path.abspath(self.path))):
            if os.path.isfile(os.path.join(d, "tokenizer.json")):
                return {"tokenizer.json": os.path.join(d, "tokenizer.json")}
        return {}
