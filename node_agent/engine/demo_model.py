"""A tiny random-weight Qwen2-shaped model, written offline, for tests and demos. The same
weights also make a Llama-shaped model (the Qwen2 one's attention biases are all zero), which
mlx-lm runs without its pipeline(): groups use it to test mlxfleet's own layer split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlx.core as mx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

logger = logging.getLogger(__name__)

DEMO_MARKER_KEY = "mlxfleet_demo"
DEMO_SEED = 20240611
DEMO_VOCAB_SIZE = 1536
HIDDEN_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE_SIZE = 256
MAX_POSITION_EMBEDDINGS = 4096
# Embeddings are tied to the output head: with small embeddings and strong residual writes the
# random model does not just echo its last input token, so greedy output is varied gibberish.
EMBED_STD = 0.1
OUT_PROJ_GAIN = 4.0

# The tool-call markers are single special tokens, as in Qwen2.5's and Hermes' vocabularies.
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", TOOL_CALL_START, TOOL_CALL_END)
EOS_TOKEN = "<|im_end|>"
# ChatML with tools in the Hermes / Qwen2.5 format: the tools listed in a system turn (by name
# and argument names: short prompts), calls as <tool_call> JSON </tool_call>, tool results as
# <tool_response> user turns. Naming <tool_call.name> is how mlx-lm recognises the format and
# picks its json_tools parser, as it does for Qwen2.5.
TOOLS_PROMPT = (
    "{% if tools %}<|im_start|>system\n<tools>"
    "{% for tool in tools %}\n{{ tool.function.name }}("
    "{{ tool.function.parameters.properties | list | join(', ') }})"
    "{% endfor %}\n</tools>\n<tool_call>{name: <tool_call.name>}</tool_call><|im_end|>\n"
    "{% endif %}"
)
MESSAGES = (
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% for tool_call in message.tool_calls %}"
    "{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    '<tool_call>\n{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
)
GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
CHAT_TEMPLATE = TOOLS_PROMPT + MESSAGES + GENERATION_PROMPT

# Training text for the tokenizer: plain English, enough for ~1,500 byte-level merges.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small team runs language models on its own
computers: laptops on desks and a few quiet machines in a cupboard. Every machine tells the
coordinator how much memory it has, how warm it is, and which models it already holds.
When a request arrives, the router picks a machine that is close, cool and not too busy.
If a machine gets hot or starts to swap, its work moves somewhere else and nobody notices.
Engineers write code, review changes, and ask questions about the system all day long.
The model answers with words, numbers, lists and sentences; sometimes it is right, and
sometimes it is wrong, so people check what it says before they trust it.
Once upon a time there was a little robot who wanted to learn how to paint. Each morning it
walked to the river, looked at the water and the trees, and tried to mix the colours of the
sky. The first pictures were grey and strange, but the robot kept trying, day after day,
until the blue of its paintings matched the blue of the morning light.
Weather report: cloudy in the north with light rain in the afternoon, sunny and warm in the
south, wind from the west at twenty kilometres per hour, and a cold clear night everywhere.
Recipe: take two cups of flour, one cup of milk, three eggs and a pinch of salt. Mix them
well, let the batter rest for ten minutes, then cook thin pancakes in a hot buttered pan.
Questions people ask: What time is it? Where is the meeting? How do I start the server?
Why did the test fail? Which port does the gateway use? Can you explain this error to me?
Answers they get: It is nine o'clock. The meeting is in the small room on the second floor.
Run the start command and wait until the health check says ready. The test failed because
the port was already in use. The gateway listens on port eight thousand four hundred.
Numbers and symbols: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 + - * / = ( ) [ ] { } < > # @ !
Code: def main(): print("hello, world") return 0 if x > y else 1 for i in range(10): pass
import json; data = json.loads(text); value = data["key"]; class Engine: ... async def run
History, science and art fill many books. The sun is a star; the earth goes around it once
a year and turns once a day. Water boils at one hundred degrees and freezes at zero.
Music has rhythm, melody and harmony; a good song is simple, honest and easy to remember.
Dear Maria, thank you for your letter. The garden is full of flowers this spring: yellow
tulips, purple violets and a tall white rose that climbs the wall beside the kitchen window.
The children planted tomatoes, beans and potatoes, and they water them every evening.
Grandfather says the harvest will be good if the summer is not too dry. We miss you very
much and hope you can visit us in August, when the apples are ripe. With love, Thomas.
Shopping list: bread, butter, cheese, apples, oranges, bananas, coffee, tea, rice, pasta,
tomatoes, onions, garlic, olive oil, chicken, fish, yoghurt, honey, chocolate and soap.
The library opens at eight in the morning and closes at six in the evening. Students come
to read, to study for examinations, to borrow novels and to use the quiet rooms upstairs.
Travel notes: the train left the station at seven, crossed the mountains before noon and
reached the coast in the late afternoon. The hotel was small and friendly; from our balcony
we could see fishing boats, white houses on the hill and the lighthouse at the harbour.
Sports news: the home team won the football match three goals to one after a difficult
first half. The captain scored twice, and the young goalkeeper made several excellent saves.
Health advice: drink enough water, sleep at least seven hours, walk every day, eat fruit
and vegetables, and take a short break from the screen every hour to rest your eyes.
Logs: INFO engine ready on port 51234; WARNING memory pressure high; ERROR request timed
out after 30 seconds; DEBUG batch size 4, tokens per second 812, queue length 0.
"""


def _train_tokenizer() -> Tokenizer:
    """Train a deterministic byte-level BPE tokenizer on the built-in corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _CORPUS.splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def _config(vocab_size: int, eos_token_id: int, layers: int, model_type: str) -> dict:
    return {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_size": HIDDEN_SIZE,
        "num_hidden_layers": layers,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "intermediate_size": INTERMEDIATE_SIZE,
        "vocab_size": vocab_size,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "eos_token_id": eos_token_id,
        DEMO_MARKER_KEY: True,
    }


def _weights(vocab_size: int, layers: int) -> dict[str, mx.array]:
    """Random weights from a fixed key, named and shaped as mlx_lm's qwen2 model expects."""
    head_dim = HIDDEN_SIZE // NUM_HEADS
    kv_dim = NUM_KV_HEADS * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, HIDDEN_SIZE)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (HIDDEN_SIZE, HIDDEN_SIZE),
            f"{p}.self_attn.q_proj.bias": (HIDDEN_SIZE,),
            f"{p}.self_attn.k_proj.weight": (kv_dim, HIDDEN_SIZE),
            f"{p}.self_attn.k_proj.bias": (kv_dim,),
            f"{p}.self_attn.v_proj.weight": (kv_dim, HIDDEN_SIZE),
            f"{p}.self_attn.v_proj.bias": (kv_dim,),
            f"{p}.self_attn.o_proj.weight": (HIDDEN_SIZE, HIDDEN_SIZE),
            f"{p}.mlp.gate_proj.weight": (INTERMEDIATE_SIZE, HIDDEN_SIZE),
            f"{p}.mlp.up_proj.weight": (INTERMEDIATE_SIZE, HIDDEN_SIZE),
            f"{p}.mlp.down_proj.weight": (HIDDEN_SIZE, INTERMEDIATE_SIZE),
            f"{p}.input_layernorm.weight": (HIDDEN_SIZE,),
            f"{p}.post_attention_layernorm.weight": (HIDDEN_SIZE,),
        }
    shapes["model.norm.weight"] = (HIDDEN_SIZE,)

    # One explicit key split per tensor, in name order, so the global RNG is left untouched.
    names = sorted(shapes)
    keys = mx.random.split(mx.random.key(DEMO_SEED), len(names))
    weights = {}
    for name, key in zip(names, keys, strict=True):
        shape = shapes[name]
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            weights[name] = mx.ones(shape, dtype=mx.float32)
        elif name.endswith(".bias"):
            weights[name] = mx.zeros(shape, dtype=mx.float32)
        else:
            std = EMBED_STD if "embed_tokens" in name else shape[-1] ** -0.5
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std *= OUT_PROJ_GAIN
            weights[name] = mx.random.normal(shape, dtype=mx.float32, key=key) * std
    mx.eval(weights)
    return weights


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", TOOL_CALL_START, TOOL_CALL_END],
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_demo_model(path: Path, layers: int = NUM_LAYERS, model_type: str = "qwen2") -> Path:
    """Write the demo model (config, weights, tokenizer) into `path` and return it. More
    `layers` give a model to split over a group's ranks (tests of groups use 6); `model_type`
    "llama" drops the (zero) attention biases, for mlx-lm's Llama."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"the demo model is one of {sorted(ARCHITECTURES)}, not {model_type!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    vocab_size = tokenizer.get_vocab_size()
    eos_token_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_token_id is None:
        raise RuntimeError(f"the trained tokenizer lacks {EOS_TOKEN}")
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": EOS_TOKEN, "pad_token": "<|endoftext|>"}, indent=2) + "\n"
    )
    config = _config(vocab_size, eos_token_id, layers, model_type)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = _weights(vocab_size, layers)
    if model_type == "llama":
        weights = {name: w for name, w in weights.items() if not name.endswith(".bias")}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    logger.info("wrote demo model to %s (vocab %d)", path, vocab_size)
    return path


def is_demo_model(path: Path) -> bool:
    """Whether `path` holds a model written by write_demo_model (its output is gibberish)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get(DEMO_MARKER_KEY) is True
