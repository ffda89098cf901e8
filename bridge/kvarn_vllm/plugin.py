"""The `vllm.general_plugins` entry point. vLLM calls it in every process it starts (API
server, engine core, workers) before configurations are validated; it must be
idempotent and must not initialize CUDA."""

from __future__ import annotations

import logging

log = logging.getLogger("kvarn_vllm")
SUPPORTED = ("0.26.",)  # vLLM releases whose patches module exists


def register() -> None:
    import vllm

    version = vllm.__version__
    if not version.startswith(SUPPORTED):
        log.warning("kvarn_vllm supports vLLM %s; found %s: kvarn kv-cache dtypes are not "
                    "registered", ", ".join(v + "x" for v in SUPPORTED), version)
        return
    from kvarn_vllm import vllm_0_26

    vllm_0_26.apply()
