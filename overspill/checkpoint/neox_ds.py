"""GPT-NeoX-20B's original checkpoint: DeepSpeed pipeline files, one per layer and tensor-parallel rank.

Layout of EleutherAI's "slim_weights" (GPT-NeoX tools/ckpts/merge20b.py and convert_neox_to_hf.py
read it the same way)::

    20B_checkpoints/
      latest                                   "global_step150000"
      configs/20B.yml                          the training config (PyYAML; '-' and '_' in keys are one)
      20B_tokenizer.json                       the yml's vocab-file: copied as tokenizer.json
      global_step150000/
        layer_00-model_00-model_states.pt      embedding: word_embeddings.weight [V/T, d], vocab rows
        layer_00-model_01-model_states.pt      (T = model-parallel-size = 2 ranks per layer)
        layer_02-model_0{0,1}-...  .. layer_{L+1}-...       the L transformer layers (1 and L+2 are
                                                            parameter-free pipeline functions)
        layer_{L+3}-model_0{0,1}-...           final norm: norm.weight, norm.bias
        layer_{L+4}-model_0{0,1}-...           final_linear.weight [V/T, d] (output_layer_parallelism
                                               "column"; [V, d/T] columns when "row")
        mp_rank_0X_model_states.pt             DeepSpeed's bookkeeping, not read

Merging the two ranks of a transformer layer (torch [out, in] weights)::

    attention.query_key_value.{weight,bias}   column parallel: cat rows. Rows are per head (nh, 3, hs),
    mlp.dense_h_to_4h.{weight,bias}           heads split over ranks, so the cat is HF's layout as is
    attention.dense.weight                    row parallel: cat columns
    mlp.dense_4h_to_h.weight
    attention.dense.bias, mlp.dense_4h_to_h.bias   with gpt_j_residual each rank adds its bias before the
                                              one all-reduce of attn + mlp: the model's bias is the sum.
                                              Otherwise it is added once after the reduce: the average
    input_layernorm.*, post_attention_layernorm.*  replicated: averaged (as merge20b.py does)
    attention.rotary_emb.inv_freq             a buffer, dropped

Files are read with torch.load(weights_only=True, mmap=True): tensors only, never pickled code,
and only one layer's files are open at a time.
"""
from __future__ import annotations

import glob
import json
import os
import re

import torch

from ..errors import CheckpointError, ConfigError
from .hf import _BinFile
from .original import OriginalCheckpoint, averaged, cat_into, read_config_file, summed

_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
_BLOCK = {"input_layernorm.weight": "norm", "input_layernorm.bias": "norm", "post_attention_layernorm.weight": "norm",
          "post_attention_layernorm.bias": "norm", "attention.query_key_value.weight": "rows",
          "attention.query_key_value.bias": "rows", "attention.dense.weight": "cols", "attention.dense.bias": "bias",
          "mlp.dense_h_to_4h.weight": "rows", "mlp.dense_h_to_4h.bias": "rows", "mlp.dense_4h_to_h.weight": "cols",
          "mlp.dense_4h_to_h.bias": "bias", "attention.rotary_emb.inv_freq": None}
_ACT = {"gelu": "gelu", "relu": "relu"}


def find(path: str) -> str | None:
    """The directory holding the layer files: ``path`` itself, the step named by its ``latest`` file, or its one
    ``global_step*`` directory; None when this is not the format."""
    def has_layers(d: str) -> bool:
        return os.path.isdir(d) and any(_FILE.fullmatch(f) for f in os.listdir(d))

    if has_layers(path):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        if has_layers(os.path.join(path, tag)):
            return os.path.join(path, tag)
        raise CheckpointError(f"{latest}: names '{tag}', but {os.path.join(path, tag)} holds no "
                              f"layer_XX-model_YY-model_states.pt files")
    steps = sorted(d for d in os.listdir(path) if has_layers(os.path.join(path, d)))
    if len(steps) > 1:
        raise CheckpointError(f"{path}: holds several GPT-NeoX checkpoints ({', '.join(steps)}) and no 'latest' "
                              f"file; pass one of them")
    return os.path.join(path, steps[0]) if steps else None


def open_checkpoint(path: str, config: str | None) -> "NeoXCheckpoint":
    return NeoXCheckpoint(path, config)


def config_files(path: str) -> list[str]:
    """The .yml files EleutherAI ships with the weights: configs/ next to the step directory or one level up."""
    parent = os.path.dirname(os.path.abspath(path))
    for d in (os.path.join(path, "configs"), os.path.join(parent, "configs"), path, parent):
        found = sorted(glob.glob(os.path.join(d, "*.yml")) + glob.glob(os.path.join(d, "*.yaml")))
        if found:
            return found
    return []


def load_neox_config(files: list[str]) -> dict:
    """NeoX merges its config files into one set of settings; keys with '-' and '_' are the same key."""
    out: dict = {}
    where: dict = {}
    for f in files:
        for k, v in read_config_file(f).items():
            key = str(k).replace("-", "_")
            if key in out and out[key] != v:
                raise ConfigError(f"{f}: '{k}' is {v!r}, but {where[key]} sets it to {out[key]!r}")
            out[key], where[key] = v, f
    return out


class NeoXCheckpoint(OriginalCheckpoint):
    kind = "gpt-neox"

    def __init__(self, path: str, config: str | None = None):
        self.path = path
        files = {}
        for f in os.listdir(path):
            m = _FILE.fullmatch(f)
            if m:
                files[int(m.group(1)), int(m.group(2))] = f
        T = 1 + max(r for _, r in files)      # ranks seen in any layer: a missing file is named, not miscounted
        for r in range(T):
            if (0, r) not in files:
                raise CheckpointError(f"{os.path.join(path, self._name(0, r))}: missing shard (other layers have "
                                      f"tensor-parallel ranks model_00..model_{T - 1:02d})")
        self.T = T
        cfg_files = [config] if config else config_files(path)
        if not cfg_files:
            raise ConfigError(f"{path}: no GPT-NeoX config found (looked for configs/*.yml next to the weights and "
                              f"one level up); pass --config with the model's .yml (e.g. 20B.yml) or a Hugging Face "
                              f"config.json")
        self.neox = load_neox_config(cfg_files)
        self.cfg_source = ", ".join(cfg_files)
        self.tp_config = self.neox.get("model_parallel_size")
        if self.tp_config is not None and int(self.tp_config) > T:
            raise CheckpointError(f"{os.path.join(path, self._name(0, T))}: missing shard ({self.cfg_source} says "
                                  f"model-parallel-size {self.tp_config}; the layer files hold {T} rank(s))")
        if self.tp_config is not None and int(self.tp_config) < T:
            raise CheckpointError(f"{path}: the layer files hold {T} tensor-parallel ranks, but {self.cfg_source} "
                                  f"says model-parallel-size {self.tp_config}")
        self.embed = self._open(0)
        for f in self.embed:
            if "word_embeddings.weight" not in f.names() or f.sd["word_embeddings.weight"].dim() != 2:
                raise CheckpointError(f"{f.path}: no 2-D tensor 'word_embeddings.weight' (layer_00 of a GPT-NeoX "
                                      f"pipeline checkpoint holds the embedding)")
        rows = [f.shape("word_embeddings.weight") for f in self.embed]
        self.V, self.d = sum(r[0] for r in rows), rows[0][1]
        self.stored = self.embed[0].sd["word_embeddings.weight"].dtype
        hf_config = self._hf_config(cfg_files[0] if config and not config.endswith((".yml", ".yaml")) else None)
        L = hf_config["num_hidden_layers"]
        self.layer_of = {"embed": 0, "head.norm": L + 3, "head.lm": L + 4,
                         **{f"block.{i}": i + 2 for i in range(L)}}
        want = {(layer, r) for layer in self.layer_of.values() for r in range(T)}
        for key in sorted(want - set(files)):
            raise CheckpointError(f"{os.path.join(path, self._name(*key))}: missing shard (a {L}-layer model with "
                                  f"{T} tensor-parallel ranks has layer_00, layer_02..layer_{L + 1:02d}, "
                                  f"layer_{L + 3:02d}, layer_{L + 4:02d}, each model_00..model_{T - 1:02d})")
        for key in sorted(set(files) - want):
            raise CheckpointError(f"{os.path.join(path, files[key])}: unexpected layer file for a {L}-layer model "
                                  f"with {T} tensor-parallel ranks (config: {self.cfg_source})")
        super().__init__(path, hf_config, self.cfg_source)
        self._check_all()

    @staticmethod
    def _name(layer: int, rank: int) -> str:
        return f"layer_{layer:02d}-model_{rank:02d}-model_states.pt"

    def _open(self, layer: int) -> list[_BinFile]:
        return [_BinFile(os.path.join(self.path, self._name(layer, r))) for r in range(self.T)]

    # -- config --------------------------------------------------------------------------------
    def _hf_config(self, hf_json: str | None) -> dict:
        tok = self._tokenizer()
        if hf_json is not None:                        # a Hugging Face config.json given with --config
            d = read_config_file(hf_json)
            if d.get("model_type") != "gpt_neox":
                raise ConfigError(f"{hf_json}: model_type {d.get('model_type')!r}; a GPT-NeoX DeepSpeed checkpoint "
                                  f"needs a .yml or a GPT-NeoX config.json (model_type 'gpt_neox')")
            for k, v in {"hidden_size": self.d, "vocab_size": self.V}.items():
                if d.get(k, v) != v:
                    raise ConfigError(f"{hf_json}: {k} is {d[k]}, but the checkpoint's embedding gives {v}")
            if not isinstance(d.get("num_hidden_layers"), int):
                raise ConfigError(f"{hf_json}: missing field 'num_hidden_layers' (required for gpt_neox)")
            return {**d, "architectures": ["GPTNeoXForCausalLM"], "vocab_size": self.V}
        c, src = self.neox, self.cfg_source

        def need(key: str, kind=int):
            if c.get(key) is None:
                raise ConfigError(f"{src}: missing '{key.replace('_', '-')}' (needed to read a GPT-NeoX checkpoint)")
            return number(key, kind)

        def number(key: str, kind, default=None):
            v = c.get(key, default)
            try:
                if isinstance(v, bool) or (kind is int and float(v) != int(v)):
                    raise ValueError
                return kind(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{src}: {key.replace('_', '-')} {v!r} is not a number") from None

        def refuse(key: str, ok, what: str) -> None:
            try:
                good = c.get(key) is None or ok(c[key])
            except (TypeError, ValueError):
                good = False
            if not good:
                raise ConfigError(f"{src}: {key.replace('_', '-')} {c[key]!r} is not supported ({what})")

        refuse("pos_emb", lambda v: v == "rotary", "rotary position embeddings only")
        refuse("norm", lambda v: v == "layernorm", "layernorm only")
        refuse("gpt_j_tied", lambda v: not v, "one shared norm per layer has no Hugging Face GPT-NeoX form")
        refuse("mlp_type", lambda v: v == "regular", "the regular GELU MLP only")
        refuse("activation", lambda v: v in _ACT, f"activations {', '.join(_ACT)}")
        refuse("output_layer_parallelism", lambda v: v in ("column", "row"), "column or row")
        refuse("attention_config", lambda v: all(t == ["global"] or t == "global" for t, _ in v),
               "global attention only")
        refuse("num_kv_heads", lambda v: v == c.get("num_attention_heads"), "one key/value head per query head")
        refuse("use_bias_in_attn_linear", bool, "this format has attention biases")
        refuse("use_bias_in_norms", bool, "this format has layer norm biases")
        if not c.get("no_weight_tying", False):
            raise ConfigError(f"{src}: tied input/output embeddings (no-weight-tying false) are not supported for "
                              f"this format")
        d, H, L = need("hidden_size"), need("num_attention_heads"), need("num_layers")
        if d != self.d:
            raise ConfigError(f"{src}: hidden-size is {d}, but the checkpoint's embedding gives {self.d}")
        if d % H or H % self.T:
            raise ConfigError(f"{src}: {H} attention heads do not split hidden-size {d} / {self.T} ranks evenly")
        act = _ACT[c.get("activation", "gelu")]
        if act == "gelu" and c.get("bias_gelu_fusion", False):
            act = "gelu_fast"        # NeoX's fused bias-GELU kernel is the tanh approximation
        pct, base = number("rotary_pct", float, 1.0), number("rotary_emb_base", float, 10000)
        positions = number("max_position_embeddings", int) if c.get("max_position_embeddings") else need("seq_length")
        ff = number("intermediate_size", int) if c.get("intermediate_size") else 4 * d
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": self.V,
                "hidden_size": d, "num_hidden_layers": L, "num_attention_heads": H,
                "intermediate_size": ff, "max_position_embeddings": positions,
                "rotary_pct": pct, "rotary_emb_base": base,
                "rope_parameters": {"rope_type": "default", "rope_theta": base, "partial_rotary_factor": pct},
                "use_parallel_residual": bool(c.get("gpt_j_residual", False)),
                "layer_norm_eps": number("layernorm_epsilon", float, 1e-5), "hidden_act": act,
                "attention_bias": True, "tie_word_embeddings": False, "bos_token_id": tok[1], "eos_token_id": tok[1]}

    def _tokenizer(self) -> tuple[str | None, int | None]:
        """(path of the model's tokenizers JSON, id of <|endoftext|>) when it ships alongside the weights."""
        vocab = self.neox.get("vocab_file")
        names = [os.path.basename(vocab)] if isinstance(vocab, str) and vocab.endswith(".json") else []
        parent = os.path.dirname(os.path.abspath(self.path))
        for d in (self.path, parent, os.path.dirname(parent)):
            for n in names + ["tokenizer.json"]:
                p = os.path.join(d, n)
                if os.path.isfile(p):
                    try:
                        with open(p) as f:
                            added = json.load(f).get("added_tokens") or []
                    except (OSError, ValueError, AttributeError):
                        return None, None
                    eos = next((t.get("id") for t in added if t.get("content") == "<|endoftext|>"), None)
                    return p, eos
        return None, None

    def extra_files(self) -> dict[str, str]:
        p, _ = self._tokenizer()
        return {"tokenizer.json": p} if p else {}

    # -- units ---------------------------------------------------------------------------------
    def hf_shapes(self, unit: str) -> dict[str, tuple[int, ...]]:
        d, F, V = self.config.hidden_size, self.config.intermediate_size, self.V
        if unit == "embed":
            return {"gpt_neox.embed_in.weight": (V, d)}
        if unit == "head":
            return {"gpt_neox.final_layer_norm.weight": (d,), "gpt_neox.final_layer_norm.bias": (d,),
                    "embed_out.weight": (V, d)}
        p = f"gpt_neox.layers.{unit.split('.')[1]}."
        return {p + "input_layernorm.weight": (d,), p + "input_layernorm.bias": (d,),
                p + "post_attention_layernorm.weight": (d,), p + "post_attention_layernorm.bias": (d,),
                p + "attention.query_key_value.weight": (3 * d, d), p + "attention.query_key_value.bias": (3 * d,),
                p + "attention.dense.weight": (d, d), p + "attention.dense.bias": (d,),
                p + "mlp.dense_h_to_4h.weight": (F, d), p + "mlp.dense_h_to_4h.bias": (F,),
                p + "mlp.dense_4h_to_h.weight": (d, F), p + "mlp.dense_4h_to_h.bias": (d,)}

    def _specs(self, unit: str) -> list[tuple[int, dict[str, str | None], dict[str, tuple[int, ...]], str]]:
        """[(pipeline layer, {key: merge kind}, {key: merged shape}, HF name prefix)] of one unit."""
        d, V = self.d, self.V
        if unit == "embed":
            return [(0, {"word_embeddings.weight": "rows"}, {"word_embeddings.weight": (V, d)}, "")]
        if unit == "head":
            lm = "cols" if self.neox.get("output_layer_parallelism") == "row" else "rows"
            return [(self.layer_of["head.norm"], {"norm.weight": "norm", "norm.bias": "norm"},
                     {"norm.weight": (d,), "norm.bias": (d,)}, ""),
                    (self.layer_of["head.lm"], {"final_linear.weight": lm}, {"final_linear.weight": (V, d)}, "")]
        p = f"gpt_neox.layers.{unit.split('.')[1]}."
        return [(self.layer_of[unit], _BLOCK, {k.removeprefix(p): s for k, s in self.hf_shapes(unit).items()}, p)]

    def _read(self, layer: int, kinds: dict[str, str | None], full: dict[str, tuple[int, ...]]):
        """{key: [rank pieces]} of one pipeline layer, every key and piece shape checked against the config."""
        files = self.embed if layer == 0 else self._open(layer)
        T, out = self.T, {}
        for f in files:
            keys = set(f.names())
            for k in sorted(keys - set(kinds)):
                raise CheckpointError(f"{f.path}: unexpected tensor '{k}' (expected {', '.join(sorted(kinds))})")
            for k in sorted(set(kinds) - keys):
                raise CheckpointError(f"{f.path}: missing tensor '{k}'")
            for k, kind in kinds.items():
                if kind is None:
                    continue
                t = f.sd[k]
                shape = list(full[k])
                if kind == "rows":
                    shape[0] //= T
                elif kind == "cols":
                    shape[1] //= T
                if list(t.shape) != shape:
                    raise CheckpointError(f"{f.path}: tensor '{k}' has shape {list(t.shape)}, expected {shape} "
                                          f"(hidden {self.d}, mlp {self.config.intermediate_size}, vocab {self.V}, "
                                          f"{T} tensor-parallel ranks; config: {self.cfg_source})")
                out.setdefault(k, []).append(t)
        return out

    def _check_all(self) -> None:
        """Open every layer file once (mmap: no tensor data is read) to check names and shapes before converting."""
        for unit in self._names:
            for layer, kinds, full, _ in self._specs(unit):
                self._read(layer, kinds, full)

    def hf_unit(self, unit: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out = {}
        bias = summed if self.config.parallel_residual else averaged
        for layer, kinds, full, prefix in self._specs(unit):
            for k, ps in self._read(layer, kinds, full).items():
                kind = kinds[k]
                out[prefix + k] = (cat_into(ps, 0, dtype) if kind == "rows" else cat_into(ps, 1, dtype)
                                   if kind == "cols" else averaged(ps, dtype) if kind == "norm" else bias(ps, dtype))
        rename = {"word_embeddings.weight": "gpt_neox.embed_in.weight", "final_linear.weight": "embed_out.weight",
                  "norm.weight": "gpt_neox.final_layer_norm.weight", "norm.bias": "gpt_neox.final_layer_norm.bias"}
        return {rename.get(k, k): v for k, v in out.items()}

    def close(self) -> None:
        for f in self.embed:
            f.close()
