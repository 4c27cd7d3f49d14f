"""One process of tests/node_agent/engine/test_layer_split.py: run a model greedily through
mlx-lm's BatchGenerator as the engine does (sequences of several lengths prefilled in slices, one
joining a running batch, one starting from a finished sequence's trimmed KV cache) and print, on
every rank, every sequence's tokens and their log-probabilities as one JSON line.

    python -m tests.node_agent.engine.split_probe MODEL_DIR [SPLIT]

With SPLIT (layers per rank, "3,1") it is one rank of a group from MLX's own environment
(MLX_RANK, MLX_HOSTFILE), its layers split as the engine splits them (group.load_shard);
without, the whole model in one process.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator, generation_stream
from mlx_lm.models.cache import trim_prompt_cache

PROMPTS = (
    [5, 9, 33, 7],
    [(i * 37) % 1000 + 1 for i in range(45)],
)  # ids below 1000: every vocab here
LATE = [(i * 11) % 1000 + 3 for i in range(20)]  # joins the batch after a few steps
PREFILL_STEP = 16  # slices of the longer prompt: the sends a prefill evaluates through caches
MAX_TOKENS = 10
KEPT = 30  # tokens of the long sequence's KV a last sequence starts from


def run(model: Any) -> dict[str, Any]:
    gen = BatchGenerator(
        model, completion_batch_size=4, prefill_batch_size=4, prefill_step_size=PREFILL_STEP
    )
    out: dict[int, list[int]] = {}
    logprobs: dict[int, list[float]] = {}
    caches: dict[int, list[Any]] = {}
    uids = list(gen.insert(list(PROMPTS), max_tokens=[MAX_TOKENS] * len(PROMPTS)))
    steps = 0
    pending = set(uids)
    while pending:
        if steps == 3:
            late = gen.insert([LATE], max_tokens=[MAX_TOKENS])
            uids += late
            pending |= set(late)
        for r in gen.next_generated():
            out.setdefault(r.uid, []).append(int(r.token))
            logprobs.setdefault(r.uid, []).append(float(r.logprobs[r.token]))
            if r.finish_reason is not None:
                pending.discard(r.uid)
                caches[r.uid] = r.prompt_cache
        steps += 1
    # The long prompt's KV, trimmed to its first KEPT tokens, starts a sequence that shares them.
    kv = copy.deepcopy(caches[uids[1]])
    trim_prompt_cache(kv, kv[0].offset - KEPT)
    tail = [3, 4, 5, 6]
    last = gen.insert([tail], [MAX_TOKENS], caches=[kv], all_tokens=[list(PROMPTS[1][:KEPT])])
    uids += last
    while last[0] not in caches:
        for r in gen.next_generated():
            out.setdefault(r.uid, []).append(int(r.token))
            logprobs.setdefault(r.uid, []).append(float(r.logprobs[r.token]))
            if r.finish_reason is not None:
                caches[r.uid] = r.prompt_cache
    # mlx-lm computes a step ahead: a rank must finish that step's sends and receives with the
    # others before it exits.
    mx.synchronize(generation_stream)
    return {
        "parameters": sum(v.size for _, v in tree_flatten(model.parameters())),
        "tokens": [out[u] for u in uids],
        "logprobs": [logprobs[u] for u in uids],
        "offsets": [caches[u][0].offset for u in uids],
    }


def main() -> None:
    model_dir = Path(sys.argv[1])
    if len(sys.argv) > 2:
        from node_agent.engine.group import load_shard, splits_by_mlx_lm

        group = mx.distributed.init(backend="ring", strict=True)
        model, _ = load_shard(model_dir, group, tuple(int(n) for n in sys.argv[2].split(",")))
        result = run(model)
        result["split_by"] = "mlx-lm" if splits_by_mlx_lm(model) else "mlxfleet"
    else:
        import mlx_lm

        model = mlx_lm.load(str(model_dir))[0]
        result = run(model)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
