"""kvarn_vllm: the vLLM plugin. `pip install kvarn[vllm]` next to a stock vLLM wheel, then
`--kv-cache-dtype kvarn_k4v2_g128`: the `vllm.general_plugins` entry point
(`kvarn_vllm.plugin:register`) adds the kvarn cache dtypes, the attention backend and its
automatic selection, and the page size of one KVarN record per (block, KV head).

Layout: `settings` (what the bridge derives from vLLM's configuration; no vLLM import),
`lifecycle` (the tail pool and the commit / release rules shared by a model's layers),
`backend` (the attention backend: metadata builder and impl), `plugin` (the entry point)
and one module of patches per vLLM version (`vllm_0_26`).
"""
