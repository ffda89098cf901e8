"""The byte-level BPE tokenizer stored in a GGUF file's metadata, built with `tokenizers`.

GGUF "gpt2"-model tokenizers carry the vocabulary (`tokenizer.ggml.tokens`, in GPT-2's
byte-to-unicode alphabet), the merges ("a b" strings) and the token types (3 = control,
4 = user-defined: matched whole, never split by BPE). The pre-tokenizer is chosen by
`tokenizer.ggml.pre`; SmolLM2's ("smollm") splits digits one by one before GPT-2's regex,
like its Hugging Face tokenizer.json.
"""

from __future__ import annotations

import functools
from pathlib import Path

from kvarn_jax.models import gguf as gguf_file

_CONTROL, _USER_DEFINED = 3, 4
# llama.cpp pre-tokenizer names whose rules are GPT-2's regex, optionally after
# splitting digits individually.
_DIGIT_SPLIT_PRES = ("smollm",)
_PLAIN_PRES = ("default", "gpt2", "gpt-2")


class Tokenizer:
    """encode/decode over ids; `apply_chat_template` if the GGUF has a template."""

    def __init__(self, path: str | Path | None = None):
        try:
            from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, \
                pre_tokenizers
        except ImportError as e:
            raise ImportError("the GGUF tokenizer needs `tokenizers`: pip install tokenizers") \
                from e

        def get(key, default=None):
            return gguf_file.field(path, key, default)

        kind = get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported; "
                             f"got {kind!r}")
        tokens: list[str] = get("tokenizer.ggml.tokens")
        types: list[int] = get("tokenizer.ggml.token_type", [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
        pre = get("tokenizer.ggml.pre", "default")

        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                         fuse_unk=False, byte_fallback=False)
        tok = HFTokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(
            get("tokenizer.ggml.add_space_prefix", False)), use_regex=True)
        if pre in _DIGIT_SPLIT_PRES:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in _PLAIN_PRES:
            tok.pre_tokenizer = byte_level
        else:
            raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported "
                             f"(supported: {', '.join(_DIGIT_SPLIT_PRES + _PLAIN_PRES)})")
        tok.decoder = decoders.ByteLevel()
        specials = [AddedToken(t, special=(ty == _CONTROL), normalized=False)
                    for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)]
        tok.add_tokens(specials)  # same ids: they are already in the vocabulary
        self._tok = tok
        self.vocab_size = len(tokens)
        self.bos_token_id = _opt_int(get("tokenizer.ggml.bos_token_id"))
        self.eos_token_id = _opt_int(get("tokenizer.ggml.eos_token_id"))
        self.add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
        self.chat_template: str | None = get("tokenizer.chat_template")

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool = True) -> str:
        """Render the GGUF's Jinja chat template (needs jinja2)."""
        if not self.chat_template:
            raise ValueError("this GGUF has no tokenizer.chat_template")
        try:
            import jinja2
        except ImportError as e:
            raise ImportError("chat templates need jinja2: pip install jinja2") from e
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.token(self.bos_token_id) if self.bos_token_id is not None else "",
            eos_token=self.token(self.eos_token_id) if self.eos_token_id is not None else "")


def _opt_int(x) -> int | None:
    return None if x is None else int(x)


@functools.lru_cache(maxsize=2)
def load(path: str | None = None) -> Tokenizer:
    """The tokenizer of a GGUF file (default: the SmolLM2 one), built once per process."""
    return Tokenizer(path)
