"""The bundled English text for accuracy work: committed snapshots, checked by hash.

`prose.txt` (the demo's text, ~24K SmolLM2 tokens) and `prose2.txt` (more topics of the same
source, Python 3.12's `pydoc_data.topics`, none repeated; ~27K tokens) are committed rather
than read from the interpreter because the topics differ between Python versions: every
machine must score the same tokens. Framework-free (no jax, no torch).
"""

from __future__ import annotations

import hashlib
import importlib.resources

# sha256 of each file's UTF-8 text; prose.txt's is also kvarn_jax.demo.PROSE_SHA256.
FILES = {
    "prose.txt": "d6437b8a9b745279e159c0556fe553f3ca82d5289d80e3fb28cb4bf73c80383e",
    "prose2.txt": "9c371f747d02ab1ae52aebbff7f701f14c63e1f36223f75eb0619a1ed5874714",
}


def read(name: str) -> str:
    """One bundled file, verified against its recorded hash."""
    if name not in FILES:
        raise KeyError(f"unknown bundled text {name!r}; have {sorted(FILES)}")
    text = importlib.resources.files("kvarn").joinpath(f"data/{name}").read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest != FILES[name]:
        raise RuntimeError(f"kvarn/data/{name} is corrupt: sha256 {digest}, expected "
                           f"{FILES[name]}; restore it from the repository")
    return text


def text() -> str:
    """All bundled text, in a fixed order (about 51K SmolLM2 tokens)."""
    return "\n".join(read(name) for name in FILES)


def sha256() -> str:
    """Hash of `text()`, recorded next to results so a reader knows what was scored."""
    return hashlib.sha256(text().encode()).hexdigest()
