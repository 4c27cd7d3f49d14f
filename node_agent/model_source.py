"""Where an engine's model comes from: a local MLX folder, or a Hugging Face id downloaded once."""

from __future__ import annotations

from pathlib import Path

# The files mlx_lm.load reads: mlx_lm.utils.DEFAULT_ALLOW_PATTERNS (0.32.2), copied because
# importing mlx_lm here would start MLX in the agent (its native threads abort the agent at
# exit, seen in CI, and on a Mac it would hold a Metal device); a test keeps them equal.
HUB_ALLOW_PATTERNS = (
    "*.json",
    "model*.safetensors",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
)


def resolve_source(source: str) -> Path:
    """A local MLX model folder as is; a Hugging Face id downloaded (or found in the hub cache).

    Blocking: run it in a thread. Engines only ever load local folders.
    """
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=list(HUB_ALLOW_PATTERNS)))
