"""Engine speed on an NVIDIA GPU with MLX's CUDA backend (issue 15, items 5 and 6): our engine,
mlx_lm.server and raw mlx-lm in one run, on random-weight 4-bit models of real shapes.

NVIDIA, MLX CUDA backend (mlx-cuda-13): not a Mac. What it measures:

- the copy bandwidth of the device (one large array read and written, timed), and per shape the
  decode limit at batch 1: bandwidth ÷ the bytes one decode step reads (every weight, less the
  input embedding table when it is not tied to the output head);
- raw mlx-lm at batch 1: `generate_step` and `BatchGenerator` decode tok/s (greedy, after a
  warm-up), and `BatchGenerator`'s prefill of the long prompt in 512- and 2048-token slices (ours
  uses 2048 on a GPU and 512 on a CPU, node_agent/engine/batched.py; mlx_lm.server 2048);
- our model thread (node_agent/engine/generator.py's ModelThread) in this process, no HTTP, at
  batch 1; with --profile, cProfile of its loop over one request (profile-SHAPE.txt);
- our engine (`python -m node_agent.engine`) and mlx_lm.server, each a process, requests
  interleaved: batch-1 streamed decode (first to last token), 16 concurrent streams' aggregate
  tok/s, cold TTFT of a ~7,200-token prompt never seen before, and TTFT of the same prefix with a
  new question each turn (median). With --long, the same at ~28.7K tokens on the 7B shape.

Models (built on the machine into WORK/models/SHAPE, reused when there): Qwen2.5-1.5B and -7B
shapes (and `tiny`, for a CPU), mlx-lm's own qwen2 Model, bf16 normal(0, 0.02) weights quantized
to 4 bits, group 64, as mlx_lm.convert does; the demo model's tokenizer (node_agent/engine/
demo_model.py). Its vocabulary is smaller than the model's, so the output head's rows of every id
the tokenizer lacks, of special tokens (EOS, the tool-call markers) and of tokens that decode to
no visible text are zero: greedy decoding then always draws a visible in-vocabulary token, never
ends early and streams text at every token, on both servers. The matrices keep their real shapes
and cost. Our engine also gets `ignore_eos` (vLLM's extension); tokens counted from `usage`.

On the device, from the repository root (models and logs under --work, results under --out):

    PYTHONUNBUFFERED=1 python3 -m benchmarks.accelerator --out $OUT --work /tmp/acc --quick \
        [--profile] [--long]

On a CPU, the tiny shape and a shorter prompt:

    python -m benchmarks.accelerator --out /tmp/acc --shapes tiny --quick

Writes OUT/accelerator.json (rewritten after every phase, so a run cut short keeps what it had),
OUT/accelerator.md (the tables) and OUT/logs.txt (the servers' log tails).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from benchmarks import harness
from benchmarks.fleet import MLX_LM_MODEL, MODEL, Engine, MlxLm, start_engine, start_mlx_lm

# The shapes (Hugging Face config.json fields); the common ones below.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {  # for a CPU: the whole run in a few minutes on 2 cores
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 512,
        # Above the tokenizer's 1,536 ids (as the real shapes are), far below their 152K: MLX's
        # CPU 4-bit matmul makes a 152K-row head take ~0.25 s a token on 2 cores.
        "vocab_size": 2048,
        "tie_word_embeddings": True,
    },
    "1.5b": {  # Qwen2.5-1.5B
        "hidden_size": 1536,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "intermediate_size": 8960,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "7b": {  # Qwen2.5-7B
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
}
COMMON_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}
SHAPE_KEY = "mlxfleet_accelerator_shape"  # in config.json: which shape a model dir holds
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GROUP_SIZE, BITS = 64, 4
WEIGHT_STD = 0.02
SEED = 15

CONTEXT = 32768  # our engine's --context-length: room for the --long prompt
SMALL_PREFILL_STEP, MLX_LM_PREFILL_STEP = 512, 2048  # ours: batched.prefill_step_size()
TTFT_MAX_TOKENS = 8
REQUEST_TIMEOUT_S = 600.0
MODEL_LOAD_TIMEOUT_S = 300.0
STARTED = time.monotonic()


@dataclass(frozen=True)
class Plan:
    """How much of each measurement; `--quick` and the tiny shape shrink it."""

    decode_tokens: int = 256  # batch-1 decode, per request
    stream_tokens: int = 128  # per stream, in the concurrent run
    streams: int = 16
    prompt_tokens: int = 7200  # the long prompt (cold and repeated TTFT)
    long_tokens: int = 0  # --long: the 7B shape's long case; 0: not run
    reps: int = 3  # batch-1 decode and cold TTFT repetitions
    turns: int = 5  # repeated-prefix turns after the priming one
    stream_rounds: int = 2
    copy_gib: float = 4.0
    copy_reps: int = 10


def plan_for(shape: str, args: argparse.Namespace) -> Plan:
    plan = Plan()
    if args.quick:
        plan = replace(plan, reps=1, turns=3, stream_rounds=1)
    if shape == "tiny":
        plan = replace(plan, decode_tokens=64, stream_tokens=32, prompt_tokens=1000)
    if args.prompt_tokens:
        plan = replace(plan, prompt_tokens=args.prompt_tokens)
    if args.long and shape == "7b":
        plan = replace(plan, long_tokens=args.long_tokens)
    return plan


def log(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def import_paths() -> None:
    """`mlxfleet` lives in protos/ (installed editable here, a plain copy on the device): put
    the repo and protos/ on this process's path and on the servers' PYTHONPATH."""
    paths = [str(harness.REPO), str(harness.REPO / "protos")]
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    old = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in paths]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + old)


# --- the machine -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import mlx.core as mx

    gpus = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        gpus = done.stdout.strip()
    return {
        "gpus": gpus or None,
        "host": harness.machine(),
        "mlx_device": str(mx.default_device()),
        "versions": harness.versions("mlx", "mlx-lm", "mlx-cuda-13", "mlx-cpu", "transformers"),
        "python": platform.python_version(),
        "mlx": mx.__version__,
    }


def copy_bandwidth(gib: float, reps: int) -> dict[str, Any]:
    """Bytes read + written per second by an elementwise pass (`a + 1`) over `gib` GiB of
    float32, the median of `reps` after one warm-up: the device's copy bandwidth."""
    import mlx.core as mx

    n = int(gib * 2**30) // 4
    a = mx.full((n,), 1.0, dtype=mx.float32)
    mx.eval(a)
    seconds = []
    for _ in range(reps + 1):
        mx.synchronize()
        start = time.perf_counter()
        b = a + 1.0
        mx.eval(b)
        mx.synchronize()
        seconds.append(time.perf_counter() - start)
        del b
    del a
    gc.collect()
    mx.clear_cache()
    moved = 2 * n * 4
    median = statistics.median(seconds[1:])
    return {"bytes_moved": moved, "median_s": median, "bytes_per_s": moved / median}


# --- the models ------------------------------------------------------------------------------


def model_config(shape: str) -> dict[str, Any]:
    return {**COMMON_CONFIG, **SHAPES[shape], SHAPE_KEY: shape}


def visible_tokens(tokenizer_json: Path, vocab_size: int) -> list[bool]:
    """Per model id: whether greedy decoding may draw it. In the tokenizer, not special, and it
    decodes to visible text on its own (no lone space, no partial UTF-8 byte)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    special = set(tok.get_added_tokens_decoder())
    keep = [False] * vocab_size
    for i in range(min(tok.get_vocab_size(), vocab_size)):
        text = tok.decode([i], skip_special_tokens=False)
        keep[i] = i not in special and bool(text.strip()) and "\ufffd" not in text
    return keep


def build_model(shape: str, path: Path) -> Path:
    """A random-weight 4-bit model of `shape` in `path` (reused when one is there)."""
    config = model_config(shape)
    existing = harness.read_json(path / "config.json")
    same = existing and all(existing.get(k) == v for k, v in config.items())
    if same and any(path.glob("*.safetensors")):
        log(f"{shape}: reusing the model in {path}")
        return path
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.models import qwen2
    from mlx_lm.utils import quantize_model, save_config, save_model

    from node_agent.engine.demo_model import write_demo_model

    started = time.monotonic()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo_model(Path(tmp) / "demo")
        for name in TOKENIZER_FILES:
            shutil.copy(demo / name, path / name)
        config["eos_token_id"] = json.loads((demo / "config.json").read_text())["eos_token_id"]
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    vocab = config["vocab_size"]
    keep = mx.array(visible_tokens(path / "tokenizer.json", vocab), dtype=mx.bfloat16)[:, None]
    head = "model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"

    def init(name: str, p: mx.array) -> mx.array:
        if name.endswith("norm.weight"):
            return mx.ones(p.shape, dtype=mx.bfloat16)
        if name.endswith(".bias"):
            return mx.zeros(p.shape, dtype=mx.bfloat16)
        w = mx.random.normal(p.shape, dtype=mx.bfloat16) * WEIGHT_STD
        return w * keep if name == head else w

    mx.random.seed(SEED)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.update(tree_map_with_path(init, model.parameters()))
    model, config = quantize_model(model, config, GROUP_SIZE, BITS)
    for layer in model.model.layers:  # one layer's bf16 weights at a time
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    save_model(path, model, donate_model=True)
    save_config(config, path / "config.json")
    del model
    gc.collect()
    mx.clear_cache()
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    log(f"{shape}: built {size / 2**30:.2f} GiB in {time.monotonic() - started:.1f} s -> {path}")
    return path


# --- prompts ---------------------------------------------------------------------------------


def chat_text(system: str | None, question: str) -> str:
    """The demo chat template's rendering (ChatML, no tools), for counting and raw runs."""
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return f"{head}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def phrases(seed: int, n: int) -> str:
    """A long system prompt, as benchmarks/prefix_cache.py's; each seed gives another."""
    return " ".join(f"rule{seed}-{i % 97} keep it short" for i in range(n))


class Prompts:
    """Prompts of a given size in the servers' own tokens (mlx-lm's tokenizer loading: the
    demo tokenizer under Qwen2's pre-tokenizer, one token per digit)."""

    def __init__(self, model_path: Path) -> None:
        from mlx_lm.utils import load_tokenizer

        self._tok = load_tokenizer(model_path)

    def ids(self, system: str | None, question: str) -> list[int]:
        return list(self._tok.encode(chat_text(system, question), add_special_tokens=False))

    def system(self, seed: int, tokens: int) -> str:
        """A system prompt making a chat of about `tokens` tokens with a short question."""
        n = max(1, tokens * 100 // len(self.ids(phrases(seed, 100), "question 0")))
        for _ in range(3):  # the per-phrase cost varies a little with the seed's digits
            have = len(self.ids(phrases(seed, n), "question 0"))
            n = max(1, n + round((tokens - have) * n / have))
        return phrases(seed, n)


# --- raw mlx-lm and our model thread, in this process ----------------------------------------


def weight_bytes(model: Any, tied: bool) -> dict[str, int]:
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    total = sum(v.nbytes for _, v in params)
    embed = sum(v.nbytes for k, v in params if k.startswith("model.embed_tokens."))
    # An untied input table is read one row per token; tied, the head reads all of it.
    return {"total": total, "per_decode_step": total if tied else total - embed}


def rate(times: list[float], counts: list[int]) -> float:
    """Tokens per second after the first arrival: tokens after it ÷ time from it to the last."""
    return (sum(counts) - counts[0]) / (times[-1] - times[0])


def generate_step_rate(model: Any, ids: list[int], n: int) -> float:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    times = [time.perf_counter() for _ in generate_step(mx.array(ids), model, max_tokens=n)]
    return rate(times, [1] * len(times))


def batch_generator_rate(model: Any, ids: list[int], n: int) -> float:
    """BatchGenerator at batch 1 (no stop tokens: it runs to n), decode only."""
    from mlx_lm.generate import BatchGenerator

    bg = BatchGenerator(model, completion_batch_size=1, prefill_batch_size=1)
    try:
        bg.insert([ids], max_tokens=[n])
        times: list[float] = []
        while len(times) < n:
            responses = bg.next_generated()
            if not responses:
                raise RuntimeError("BatchGenerator stopped before max_tokens")
            times += [time.perf_counter()] * len(responses)
            if any(r.finish_reason is not None for r in responses):
                break
        return rate(times, [1] * len(times))
    finally:
        bg.close()


def batch_generator_prefill_s(model: Any, ids: list[int], step: int) -> float:
    """Seconds from insert to the first token of one prompt, prefilled `step` tokens a slice."""
    from mlx_lm.generate import BatchGenerator

    bg = BatchGenerator(
        model, completion_batch_size=1, prefill_batch_size=1, prefill_step_size=step
    )
    try:
        start = time.perf_counter()
        bg.insert([ids], max_tokens=[1])
        while not bg.next_generated():
            pass
        return time.perf_counter() - start
    finally:
        bg.close()


def raw_mlx_lm(model: Any, prompts: Prompts, plan: Plan) -> dict[str, Any]:
    short = prompts.ids(None, "Tell me a long story about a robot who learns to paint.")
    long = prompts.ids(prompts.system(7, plan.prompt_tokens), "question 0")
    out: dict[str, Any] = {"short_prompt_tokens": len(short), "long_prompt_tokens": len(long)}
    generate_step_rate(model, short, plan.decode_tokens)  # warm-up: kernels, every KV length
    batch_generator_rate(model, short, plan.decode_tokens)
    out["generate_step_tok_s"] = [
        generate_step_rate(model, short, plan.decode_tokens) for _ in range(plan.reps)
    ]
    log(f"  generate_step b1: {fmt(out['generate_step_tok_s'])} tok/s")
    out["batch_generator_b1_tok_s"] = [
        batch_generator_rate(model, short, plan.decode_tokens) for _ in range(plan.reps)
    ]
    log(f"  BatchGenerator b1: {fmt(out['batch_generator_b1_tok_s'])} tok/s")
    for step in (SMALL_PREFILL_STEP, MLX_LM_PREFILL_STEP):
        batch_generator_prefill_s(model, long, step)  # warm-up at this slice size
        runs = [batch_generator_prefill_s(model, long, step) for _ in range(plan.reps)]
        out[f"batch_generator_prefill_s_step{step}"] = runs
        log(f"  BatchGenerator prefill {len(long)} tokens, {step}-token slices: {fmt(runs)} s")
    return out


def greedy(n: int) -> Any:
    from mlxfleet.openai.protocol import SamplingParams

    return SamplingParams(
        max_tokens=n, temperature=0.0, top_p=1.0, seed=None, stop=(), ignore_eos=True
    )


class JobTimes:
    """A Job's sink: when each event came (on the model thread) and how many tokens it held."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.counts: list[int] = []
        self.done = threading.Event()
        self.error: str | None = None

    def __call__(self, event: Any) -> None:
        if event.token_ids:
            self.times.append(time.perf_counter())
            self.counts.append(len(event.token_ids))
        if event.finish_reason is not None:
            self.error = event.error
            self.done.set()

    def rate(self) -> float:
        if self.error:
            raise RuntimeError(f"model thread: {self.error}")
        return rate(self.times, self.counts)


def model_thread(path: Path, prompts: Prompts, plan: Plan, profile: Path | None) -> dict:
    """Our ModelThread, in this process, at batch 1: what the engine does minus HTTP."""
    from node_agent.engine.generator import Job, ModelThread

    ids = prompts.ids(None, "Tell me a long story about a robot who learns to paint.")
    thread = ModelThread(path, prefix_cache_bytes=4 << 30)
    thread.start()
    thread.loaded.result(MODEL_LOAD_TIMEOUT_S)
    out: dict[str, Any] = {}
    try:
        runs = []
        for i in range(plan.reps + 1):  # the first: warm-up
            sink = JobTimes()
            thread.submit(Job(i, ids, plan.decode_tokens, greedy(plan.decode_tokens), sink))
            if not sink.done.wait(REQUEST_TIMEOUT_S):
                raise RuntimeError("the model thread did not finish a request")
            runs.append(sink.rate())
        out["model_thread_b1_tok_s"] = runs[1:]
        log(f"  our ModelThread b1 (no HTTP): {fmt(runs[1:])} tok/s")
        # TTFT of a long prompt, cold and then repeated with new questions, with no HTTP and no
        # tokenizing: what of the served repeat TTFT the model thread itself takes.
        system = prompts.system(300, plan.prompt_tokens)
        firsts = []
        for i in range(plan.turns + 1):
            sink = JobTimes()
            ids_i = prompts.ids(system, f"question {i}")
            start = time.perf_counter()
            thread.submit(Job(100 + i, ids_i, 1, greedy(1), sink))
            if not sink.done.wait(REQUEST_TIMEOUT_S):
                raise RuntimeError("the model thread did not finish a request")
            firsts.append(sink.times[0] - start)
        out["model_thread_cold_ttft_s"], out["model_thread_repeat_ttft_s"] = firsts[0], firsts[1:]
        log(f"  our ModelThread TTFT: cold {firsts[0]:.3g} s, repeated {fmt(firsts[1:])} s")
    finally:
        thread.stop(30)
    if profile is not None:
        out["profile"] = profile_model_thread(path, ids, plan.decode_tokens, profile)
    return out


def profile_model_thread(path: Path, ids: list[int], n: int, dest: Path) -> str:
    """cProfile of ModelThread's loop (the body of ModelThread._run) over one request of `n`
    tokens, run on this thread so the profiler sees it; written to `dest`."""
    from node_agent.engine.generator import Job, ModelThread

    thread = ModelThread(path, prefix_cache_bytes=4 << 30)
    # ModelThread's own steps (private), driven here as its _run drives them.
    thread._load()
    thread.loaded.set_result(None)
    profiler = cProfile.Profile()
    for i, profiled in enumerate((False, True)):  # a warm-up request, then the profiled one
        sink = JobTimes()
        thread.submit(Job(i, ids, n, greedy(n), sink))
        if profiled:
            profiler.enable()
        while not sink.done.is_set():
            thread._take_inbox(0.0)
            thread._admit()
            if thread._running:
                thread._step()
        profiler.disable()
    text = io.StringIO()
    text.write(f"ModelThread loop, one request, {n} tokens, {sink.rate():.1f} tok/s profiled\n")
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(40)
    dest.write_text(text.getvalue())
    del thread
    gc.collect()
    log(f"  profile -> {dest}")
    return str(dest)


# --- the servers -----------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    url: str
    secret: str | None
    model: str
    extra: dict[str, Any] = field(default_factory=dict)  # body fields only this one takes


@dataclass
class Stream:
    """One streamed chat: seconds from the request to the first and last token, and usage."""

    ttft_s: float
    end_s: float  # since the request, at the last token (or the finishing chunk)
    started: float  # perf_counter at the request
    tokens: int
    prompt_tokens: int
    cached_tokens: int

    def decode_tok_s(self) -> float:
        return (self.tokens - 1) / (self.end_s - self.ttft_s)


def stream_chat(
    client: httpx.Client, server: Server, system: str | None, question: str, max_tokens: int
) -> Stream:
    messages = [{"role": "user", "content": question}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    body = {
        "model": server.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **server.extra,
    }
    headers = {"Authorization": f"Bearer {server.secret}"} if server.secret else {}
    start = time.perf_counter()
    first = last = 0.0
    tokens = prompt = cached = 0
    with client.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=headers
    ) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            for choice in event.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    first = first or now
                    last = now
                elif choice.get("finish_reason") and first:
                    last = now
            if usage := event.get("usage"):
                tokens = usage.get("completion_tokens", 0)
                prompt = usage.get("prompt_tokens", 0)
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    end = time.perf_counter()
    first, last = first or end, last or end
    return Stream(first - start, last - start, start, tokens, prompt, cached)


SHORT_QUESTION = "Tell me a long story about a robot who learns to paint."


def decode_b1(client: httpx.Client, server: Server, n: int) -> float:
    s = stream_chat(client, server, None, SHORT_QUESTION, n)
    if s.tokens < n:
        log(f"  note: {server.name} stopped at {s.tokens} of {n} tokens")
    return s.decode_tok_s()


def streams_at_once(
    client: httpx.Client, server: Server, n: int, max_tokens: int, seed: int
) -> dict:
    """`n` streams at once, each its own short prompt: aggregate tok/s over the wall time."""
    with ThreadPoolExecutor(n) as pool:
        start = time.perf_counter()
        streams = list(
            pool.map(
                lambda i: stream_chat(
                    client, server, None, f"Stream {seed}-{i}: {SHORT_QUESTION}", max_tokens
                ),
                range(n),
            )
        )
    wall = max(s.started + s.end_s for s in streams) - start
    total = sum(s.tokens for s in streams)
    return {
        "aggregate_tok_s": total / wall,
        "tokens": total,
        "wall_s": wall,
        "fewest_tokens": min(s.tokens for s in streams),
        "median_ttft_s": statistics.median(s.ttft_s for s in streams),
    }


def ttft(client: httpx.Client, server: Server, system: str, question: str) -> dict[str, Any]:
    s = stream_chat(client, server, system, question, TTFT_MAX_TOKENS)
    return {"ttft_s": s.ttft_s, "prompt_tokens": s.prompt_tokens, "cached_tokens": s.cached_tokens}


def measure_servers(
    servers: list[Server], prompts: Prompts, plan: Plan, save: Callable[[], None]
) -> dict[str, dict[str, Any]]:
    """Every server measurement, the servers taking turns request by request."""
    res: dict[str, dict[str, Any]] = {s.name: {} for s in servers}

    def each(key: str, measure: Callable[[Server], Any]) -> None:
        for server in servers:
            res[server.name].setdefault(key, []).append(measure(server))

    limits = httpx.Limits(max_connections=4 * plan.streams, max_keepalive_connections=plan.streams)
    with httpx.Client(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        warm = prompts.system(900, max(256, plan.prompt_tokens // 4))
        for server in servers:  # warm-up: decode, batched decode and prefill kernels
            decode_b1(client, server, plan.decode_tokens)
            streams_at_once(client, server, plan.streams, 4, 900)
            ttft(client, server, warm, "warm up")
        log("  servers warmed up")
        for _ in range(plan.reps):
            each("b1_tok_s", lambda s: decode_b1(client, s, plan.decode_tokens))
        log("  b1 decode: " + table_line(res, "b1_tok_s", "tok/s"))
        for rep in range(plan.reps):  # the floor: a prompt too short to prefill for long
            each("short", lambda s, rep=rep: ttft(client, s, None, f"Short question {rep}?"))
        log("  short-prompt TTFT: " + table_line(res, "short", "s", "ttft_s"))
        save()
        for r in range(plan.stream_rounds):
            each(
                "streams",
                lambda s, r=r: streams_at_once(client, s, plan.streams, plan.stream_tokens, r),
            )
        log(
            f"  {plan.streams} streams aggregate: "
            + ", ".join(
                f"{n} {fmt([x['aggregate_tok_s'] for x in v['streams']])} tok/s"
                for n, v in res.items()
            )
        )
        save()
        for rep in range(plan.reps):
            system = prompts.system(100 + rep, plan.prompt_tokens)
            each("cold", lambda s, system=system: ttft(client, s, system, "question 0"))
        system = prompts.system(1, plan.prompt_tokens)
        each("cold", lambda s: ttft(client, s, system, "question 0"))  # primes the repeats
        for turn in range(1, plan.turns + 1):
            each("repeat", lambda s, turn=turn: ttft(client, s, system, f"question {turn}"))
        log("  cold TTFT: " + table_line(res, "cold", "s", "ttft_s"))
        log("  repeat TTFT: " + table_line(res, "repeat", "s", "ttft_s"))
        save()
        if plan.long_tokens:
            system = prompts.system(2, plan.long_tokens)
            each("long_cold", lambda s: ttft(client, s, system, "question 0"))
            for turn in range(1, 3):
                each("long_repeat", lambda s, turn=turn: ttft(client, s, system, f"q {turn}"))
            log("  long cold TTFT: " + table_line(res, "long_cold", "s", "ttft_s"))
            log("  long repeat TTFT: " + table_line(res, "long_repeat", "s", "ttft_s"))
            save()
    return res


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.3g}" + (
        f" (runs {', '.join(f'{v:.3g}' for v in values)})" if len(values) > 1 else ""
    )


def table_line(res: dict, key: str, unit: str, field_name: str | None = None) -> str:
    parts = []
    for name, r in res.items():
        values = [x[field_name] if field_name else x for x in r.get(key, [])]
        parts.append(f"{name} {fmt(values)} {unit}" if values else f"{name} -")
    return ", ".join(parts)


# --- one shape -------------------------------------------------------------------------------


def run_shape(
    shape: str, args: argparse.Namespace, work: Path, out: Path, res: dict, save: Callable
) -> None:
    import mlx.core as mx
    import mlx_lm

    plan = plan_for(shape, args)
    res["plan"] = asdict(plan)
    res["config"] = {k: v for k, v in model_config(shape).items() if k != SHAPE_KEY}
    path = build_model(shape, work / "models" / shape)
    prompts = Prompts(path)
    slots = str(max(plan.streams, 4))
    ours = start_engine(
        path, work / "logs" / f"ours-{shape}.log",
        "--context-length", str(CONTEXT), "--max-concurrency", slots, "--max-batch-size", slots,
        "--prefix-cache-mib", str(args.prefix_cache_mib),
    )  # fmt: skip
    theirs = start_mlx_lm(path, work / "logs" / f"mlx_lm-{shape}.log")
    res["servers"] = {
        "ours": f"python -m node_agent.engine, --max-concurrency {slots}, --prefix-cache-mib "
        f"{args.prefix_cache_mib}, prefill slices {our_prefill_step()}",
        "mlx_lm.server": f"defaults (prefill slices {MLX_LM_PREFILL_STEP})",
    }
    with harness.stopping([ours.proc, theirs.proc]):
        log(f"{shape}: servers starting; loading the model in this process")
        model = mlx_lm.load(str(path))[0]
        res["weight_bytes"] = weight_bytes(model, res["config"]["tie_word_embeddings"])
        wait_ready(ours, theirs)
        log(f"{shape}: servers ready; raw mlx-lm")
        res["raw"] = raw_mlx_lm(model, prompts, plan)
        save()
        del model
        gc.collect()
        mx.clear_cache()
        over = time.monotonic() - STARTED > args.budget_s
        profile = out / f"profile-{shape}.txt" if args.profile and not over else None
        res["model_thread"] = model_thread(path, prompts, plan, profile)
        gc.collect()
        mx.clear_cache()
        save()
        servers = [
            Server("ours", ours.url, ours.secret, MODEL, {"ignore_eos": True}),
            Server("mlx_lm.server", theirs.url, None, MLX_LM_MODEL),
        ]
        log(f"{shape}: servers")
        if plan.long_tokens and time.monotonic() - STARTED > args.budget_s:
            log(f"{shape}: over --budget-s, the long case is skipped")
            plan = replace(plan, long_tokens=0)
        res["http"] = measure_servers(servers, prompts, plan, save)
    res["summary"] = summarize(res)
    save()


def our_prefill_step() -> int:
    from node_agent.engine.batched import prefill_step_size

    return prefill_step_size()


def wait_ready(ours: Engine, theirs: MlxLm) -> None:
    ours.listening()
    harness.wait_for(ours.healthy, MODEL_LOAD_TIMEOUT_S, "our engine to be healthy", 0.5)
    harness.wait_for(theirs.answers, MODEL_LOAD_TIMEOUT_S, "mlx_lm.server to answer", 0.5)


# --- results ---------------------------------------------------------------------------------


def med(values: list[Any], key: str | None = None) -> float | None:
    picked = [v[key] if key else v for v in values or []]
    return statistics.median(picked) if picked else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(res: dict) -> dict[str, Any]:
    """The medians and the issue's ratios for one shape."""
    raw, http = res.get("raw", {}), res.get("http", {})
    ours, theirs = http.get("ours", {}), http.get("mlx_lm.server", {})
    bw = res.get("bandwidth_bytes_per_s")
    per_step = res.get("weight_bytes", {}).get("per_decode_step")
    s: dict[str, Any] = {
        "bandwidth_limit_tok_s": bw / per_step if bw and per_step else None,
        "generate_step_tok_s": med(raw.get("generate_step_tok_s")),
        "batch_generator_b1_tok_s": med(raw.get("batch_generator_b1_tok_s")),
        "model_thread_b1_tok_s": med(res.get("model_thread", {}).get("model_thread_b1_tok_s")),
        "ours_b1_tok_s": med(ours.get("b1_tok_s")),
        "mlx_lm_server_b1_tok_s": med(theirs.get("b1_tok_s")),
        "ours_streams_tok_s": med(ours.get("streams"), "aggregate_tok_s"),
        "mlx_lm_server_streams_tok_s": med(theirs.get("streams"), "aggregate_tok_s"),
        "ours_cold_ttft_s": med(ours.get("cold"), "ttft_s"),
        "mlx_lm_server_cold_ttft_s": med(theirs.get("cold"), "ttft_s"),
        "ours_repeat_ttft_s": med(ours.get("repeat"), "ttft_s"),
        "ours_short_ttft_s": med(ours.get("short"), "ttft_s"),
        "mlx_lm_server_short_ttft_s": med(theirs.get("short"), "ttft_s"),
        "model_thread_cold_ttft_s": res.get("model_thread", {}).get("model_thread_cold_ttft_s"),
        "model_thread_repeat_ttft_s": med(
            res.get("model_thread", {}).get("model_thread_repeat_ttft_s")
        ),
        "mlx_lm_server_repeat_ttft_s": med(theirs.get("repeat"), "ttft_s"),
        "prompt_tokens": med(ours.get("cold"), "prompt_tokens"),
        "ours_repeat_cached_tokens": med(ours.get("repeat"), "cached_tokens"),
        "prefill_s_step512": med(raw.get(f"batch_generator_prefill_s_step{SMALL_PREFILL_STEP}")),
        "prefill_s_step2048": med(raw.get(f"batch_generator_prefill_s_step{MLX_LM_PREFILL_STEP}")),
        "ours_long_cold_ttft_s": med(ours.get("long_cold"), "ttft_s"),
        "mlx_lm_server_long_cold_ttft_s": med(theirs.get("long_cold"), "ttft_s"),
        "ours_long_repeat_ttft_s": med(ours.get("long_repeat"), "ttft_s"),
        "mlx_lm_server_long_repeat_ttft_s": med(theirs.get("long_repeat"), "ttft_s"),
        "long_prompt_tokens": med(ours.get("long_cold"), "prompt_tokens"),
    }
    s["ratios"] = {
        name: check(ratio(s[a], s[b]), target, higher) for name, a, b, target, higher in RATIOS
    }
    return s


# The ratios, then some that explain them: (name, numerator, denominator, target,
# whether higher is better); no target: for reading only.
RATIOS = (
    ("ours b1 / BatchGenerator b1", "ours_b1_tok_s", "batch_generator_b1_tok_s", 0.9, True),
    ("ours b1 / mlx_lm.server b1", "ours_b1_tok_s", "mlx_lm_server_b1_tok_s", 1.0, True),
    (
        "ours cold TTFT / mlx_lm.server cold TTFT",
        "ours_cold_ttft_s",
        "mlx_lm_server_cold_ttft_s",
        1.0,
        False,
    ),
    ("ours repeat TTFT / ours cold TTFT", "ours_repeat_ttft_s", "ours_cold_ttft_s", 0.1, False),
    (
        "ours repeat TTFT / mlx_lm.server repeat TTFT",
        "ours_repeat_ttft_s",
        "mlx_lm_server_repeat_ttft_s",
        1.0,
        False,
    ),
    (
        "ours streams / mlx_lm.server streams",
        "ours_streams_tok_s",
        "mlx_lm_server_streams_tok_s",
        None,
        True,
    ),
    (
        "ModelThread b1 / BatchGenerator b1",
        "model_thread_b1_tok_s",
        "batch_generator_b1_tok_s",
        None,
        True,
    ),
    ("generate_step / bandwidth limit", "generate_step_tok_s", "bandwidth_limit_tok_s", None, True),
    ("ours repeat TTFT / ours short TTFT", "ours_repeat_ttft_s", "ours_short_ttft_s", None, False),
)


def check(value: float | None, target: float | None, higher: bool) -> dict[str, Any]:
    if target is None:
        return {"value": value, "target": None, "passes": None}
    passes = None if value is None else (value >= target if higher else value <= target)
    return {"value": value, "target": f"{'>=' if higher else '<='} {target}", "passes": passes}


def num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


ROWS = (  # (label, summary key, significant digits)
    ("decode limit at batch 1: bandwidth ÷ bytes per step (tok/s)", "bandwidth_limit_tok_s", 4),
    ("raw `generate_step`, batch 1 (tok/s)", "generate_step_tok_s", 4),
    ("raw `BatchGenerator`, batch 1 (tok/s)", "batch_generator_b1_tok_s", 4),
    ("our ModelThread in-process, no HTTP, batch 1 (tok/s)", "model_thread_b1_tok_s", 4),
    ("ours over HTTP, batch 1 (tok/s)", "ours_b1_tok_s", 4),
    ("mlx_lm.server, batch 1 (tok/s)", "mlx_lm_server_b1_tok_s", 4),
    ("ours, concurrent streams, aggregate (tok/s)", "ours_streams_tok_s", 4),
    ("mlx_lm.server, concurrent streams, aggregate (tok/s)", "mlx_lm_server_streams_tok_s", 4),
    ("long prompt (tokens)", "prompt_tokens", 5),
    ("ours cold TTFT (s)", "ours_cold_ttft_s", 3),
    ("mlx_lm.server cold TTFT (s)", "mlx_lm_server_cold_ttft_s", 3),
    ("ours repeated-prefix TTFT, median (s)", "ours_repeat_ttft_s", 3),
    ("mlx_lm.server repeated-prefix TTFT, median (s)", "mlx_lm_server_repeat_ttft_s", 3),
    ("ours `cached_tokens` on repeats, median", "ours_repeat_cached_tokens", 5),
    ("ours short-prompt TTFT, median (s): the floor", "ours_short_ttft_s", 3),
    ("mlx_lm.server short-prompt TTFT, median (s)", "mlx_lm_server_short_ttft_s", 3),
    ("our ModelThread in-process, cold TTFT (s)", "model_thread_cold_ttft_s", 3),
    ("our ModelThread in-process, repeated TTFT, median (s)", "model_thread_repeat_ttft_s", 3),
    ("raw `BatchGenerator` prefill, 512-token slices (s)", "prefill_s_step512", 3),
    ("raw `BatchGenerator` prefill, 2048-token slices (s)", "prefill_s_step2048", 3),
    ("--long prompt (tokens)", "long_prompt_tokens", 5),
    ("--long: ours cold TTFT (s)", "ours_long_cold_ttft_s", 3),
    ("--long: mlx_lm.server cold TTFT (s)", "mlx_lm_server_long_cold_ttft_s", 3),
    ("--long: ours repeated TTFT (s)", "ours_long_repeat_ttft_s", 3),
    ("--long: mlx_lm.server repeated TTFT (s)", "mlx_lm_server_long_repeat_ttft_s", 3),
)


def markdown(results: dict) -> str:
    shapes = {k: v for k, v in results["shapes"].items() if "summary" in v}
    m = results["machine"]
    bw = results.get("bandwidth", {})
    lines = [
        "## NVIDIA GPU, MLX CUDA backend (not a Mac): engine speed (issue 15)",
        "",
        f"Measured {results['measured']} with `{results['command']}`.",
        "",
        f"- GPUs: {m['gpus'] or 'none found (nvidia-smi)'}; MLX device: {m['mlx_device']}",
        f"- Host: {m['host']}",
        f"- Versions: {m['versions']}",
        f"- Copy bandwidth (read + written): **{bw.get('bytes_per_s', 0) / 1e9:.0f} GB/s**",
        "",
        "Method: benchmarks/accelerator.py's docstring. Random-weight 4-bit models (group 64) of "
        "the shapes named; greedy; servers interleaved request by request.",
        "",
    ]
    if not shapes:
        return "\n".join(lines + ["No shape finished."]) + "\n"
    lines += [
        "| | " + " | ".join(shapes) + " |",
        "|---|" + "---:|" * len(shapes),
    ]
    for label, key, digits in ROWS:
        values = [s["summary"].get(key) for s in shapes.values()]
        if all(v is None for v in values):
            continue
        lines.append(f"| {label} | " + " | ".join(num(v, digits) for v in values) + " |")
    lines += ["", "| ratio | target | " + " | ".join(shapes) + " |"]
    lines.append("|---|---|" + "---:|" * len(shapes))
    names = next(iter(shapes.values()))["summary"]["ratios"]
    for name in names:
        cells = []
        target = None
        for s in shapes.values():
            r = s["summary"]["ratios"][name]
            target = target or r["target"]
            mark = {True: " ✓", False: " ✗", None: ""}[r["passes"]]
            cells.append(num(r["value"]) + mark)
        lines.append(f"| {name} | {target or '-'} | " + " | ".join(cells) + " |")
    failed = {k: v["error"] for k, v in results["shapes"].items() if "error" in v}
    for shape, error in failed.items():
        lines += ["", f"{shape}: failed: {error.strip().splitlines()[-1]}"]
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict) -> None:
    tmp = out / "accelerator.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(out / "accelerator.json")


def log_tails(work: Path, out: Path) -> None:
    logs = sorted((work / "logs").glob("*.log"))
    text = "".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}\n" for p in logs)
    (out / "logs.txt").write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="accelerator.json/.md go here")
    parser.add_argument("--work", type=Path, help="models/ and logs/ (default: --out)")
    parser.add_argument("--shapes", default="1.5b,7b", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--long", action="store_true", help="7b: a ~28.7K-token prompt too")
    parser.add_argument("--long-tokens", type=int, default=28700)
    parser.add_argument("--prompt-tokens", type=int, default=0, help="the long prompt's size")
    parser.add_argument("--prefix-cache-mib", type=int, default=4096, help="our engine's")
    parser.add_argument("--profile", action="store_true", help="cProfile our ModelThread")
    parser.add_argument(
        "--budget-s", type=float, default=360.0, help="past this, optional parts are skipped"
    )
    args = parser.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if unknown := [s for s in shapes if s not in SHAPES]:
        parser.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    import_paths()
    out: Path = args.out
    work: Path = args.work or out
    out.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "measured": harness.now_utc(),
        "command": harness.command_line(),
        "machine": machine(),
        "shapes": {},
    }
    log(f"machine: {json.dumps(results['machine'])}")
    tiny = shapes == ["tiny"]
    gib, reps = (0.25, 5) if tiny else (Plan.copy_gib, Plan.copy_reps)
    results["bandwidth"] = copy_bandwidth(gib, reps)
    log(f"copy bandwidth: {results['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s (read + written)")
    write_results(out, results)
    try:
        for shape in shapes:
            res = results["shapes"][shape] = {
                "bandwidth_bytes_per_s": results["bandwidth"]["bytes_per_s"]
            }
            try:
                run_shape(shape, args, work, out, res, lambda: write_results(out, results))
            except Exception:
                res["error"] = traceback.format_exc()
                log(f"{shape}: FAILED\n{res['error']}")
            write_results(out, results)
            (out / "accelerator.md").write_text(markdown(results))
    finally:
        log_tails(work, out)
    text = markdown(results)
    (out / "accelerator.md").write_text(text)
    print("\n" + text, flush=True)
    return 1 if any("error" in r for r in results["shapes"].values()) else 0


if __name__ == "__main__":
    harness.run_script(main)
