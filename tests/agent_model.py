"""A fixture model with known behaviour: the demo model's shape, trained offline in seconds with
MLX to answer a few prompts with a tool call, a think section and a JSON object.

It carries a real tool-capable chat template in the Hermes / Qwen2.5 format (`<tool_call>` JSON
`</tool_call>`, tools listed in the system turn), so mlx-lm's tokenizer wrapper finds its tool
parser (`json_tools`) and its think markers by itself, as it would for a real model. Nothing in
the engine knows this model: the real template, parser, engine and gateway run against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from tokenizers import Tokenizer

from mlxfleet.openai.protocol import parse_chat_request
from node_agent.engine import demo_model
from node_agent.engine.demo_model import EOS_TOKEN, write_demo_model

MARKERS = ["<think>", "</think>"]  # the demo model has the tool-call markers already
TRAIN_STEPS = 400  # at most: training stops once the loss is below TARGET_LOSS
TARGET_LOSS = 0.005
LEARNING_RATE = 3e-3
TRAIN_SEED = 7

# The demo model's template (tools in the Hermes / Qwen2.5 format), plus Qwen3's switch: with
# enable_thinking false the generation prompt closes the think section itself.
CHAT_TEMPLATE = (
    demo_model.TOOLS_PROMPT
    + demo_model.MESSAGES
    + "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)

# As the OpenAI Agents SDK sends `def get_weather(city: str) -> str` (a @function_tool).
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "properties": {"city": {"title": "City", "type": "string"}},
            "required": ["city"],
            "title": "get_weather_args",
            "type": "object",
            "additionalProperties": False,
        },
        "strict": True,
    },
}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
WEATHER_RESULT = "sunny, 21 C"
WEATHER_ANSWER = "It is sunny in Paris."
THINK_QUESTION = [{"role": "user", "content": "Think first: what is two plus two?"}]
THOUGHT = "Two plus two is four."
THINK_ANSWER = "Four."
# A schema with every kind of constraint, for structured output (short strings and arrays, so
# even the random demo model ends within a few dozen tokens).
CARD_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 20},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["mac", "mlx", "fleet"]}, "maxItems": 2},
        "done": {"type": "boolean"},
    },
    "required": ["title", "stars", "tags", "done"],
    "additionalProperties": False,
}
CARD_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "card", "schema": CARD_SCHEMA, "strict": True},
}
JSON_QUESTION = [{"role": "user", "content": "Give me a title as JSON."}]
JSON_ANSWER = '{"title": "Macs at work"}'


def weather_history(call_id: str = "call_1") -> list[dict[str, Any]]:
    """The conversation after the model's call: the call, then the tool's answer."""
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps(WEATHER_CALL["arguments"])},
    }
    return [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": WEATHER_RESULT},
    ]


@dataclass(frozen=True)
class Example:
    messages: list[dict[str, Any]]
    target: str  # what the model must answer, up to (not including) its end-of-turn token
    tools: list[dict[str, Any]] = field(default_factory=list)


EXAMPLES = [
    Example(
        WEATHER_QUESTION, f"<tool_call>\n{json.dumps(WEATHER_CALL)}\n</tool_call>", [WEATHER_TOOL]
    ),
    Example(weather_history(), WEATHER_ANSWER, [WEATHER_TOOL]),
    Example(THINK_QUESTION, f"<think>\n{THOUGHT}\n</think>\n\n{THINK_ANSWER}"),
    Example(JSON_QUESTION, JSON_ANSWER),
]


def _add_markers(path: Path) -> None:
    """The think and tool-call markers as single special tokens, and the template."""
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.add_special_tokens(MARKERS)
    tokenizer.save(str(path / "tokenizer.json"))
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config["additional_special_tokens"] = [*config["additional_special_tokens"], *MARKERS]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    model_config_path = path / "config.json"
    model_config = json.loads(model_config_path.read_text())
    old_vocab = model_config["vocab_size"]
    model_config["vocab_size"] = tokenizer.get_vocab_size()
    model_config_path.write_text(json.dumps(model_config, indent=2) + "\n")
    weights = mx.load(str(path / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    extra = mx.random.normal(
        (model_config["vocab_size"] - old_vocab, embed.shape[1]), key=mx.random.key(TRAIN_SEED)
    )
    weights["model.embed_tokens.weight"] = mx.concatenate([embed, extra * 0.1])
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})


def _sequences(tokenizer: Any) -> list[tuple[mx.array, mx.array, mx.array]]:
    """Per example: the input ids, the positions whose next token is the answer's, and those
    next tokens."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    rows = []
    for ex in EXAMPLES:
        # Parsed and templated exactly as the engine does (arguments as objects, roles mapped).
        request = parse_chat_request({"messages": ex.messages, "tools": ex.tools or None})
        messages = [m.as_template() for m in request.messages]
        kwargs: dict[str, Any] = {}
        if request.tools:
            kwargs["tools"] = [t.as_template() for t in request.tools]
        prompt = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs))
        answer = tokenizer.encode(ex.target, add_special_tokens=False) + [eos]
        ids = prompt + answer
        positions = mx.arange(len(prompt) - 1, len(ids) - 1)
        rows.append((mx.array([ids[:-1]]), positions, mx.array(answer)))
    return rows


def train(path: Path) -> float:
    """Fit the model to EXAMPLES; returns the final loss (the mean of each answer's mean).

    Cheap on 2 CPU cores: one unpadded sequence per example, and the output head (a 1,540-wide
    matmul, most of the cost) only at the positions that predict an answer token.
    """
    from mlx_lm import load

    mx.random.seed(TRAIN_SEED)
    model, wrapper = load(str(path))
    rows = _sequences(wrapper)

    def loss_fn(model: nn.Module) -> mx.array:
        total = mx.array(0.0)
        for inputs, positions, answer in rows:
            hidden = model.model(inputs)[0, positions]
            logits = model.model.embed_tokens.as_linear(hidden)
            total = total + nn.losses.cross_entropy(logits, answer).mean()
        return total / len(rows)  # each example weighs the same, short answers too

    optimizer = optim.Adam(learning_rate=LEARNING_RATE)
    step = nn.value_and_grad(model, loss_fn)
    loss = mx.array(0.0)
    for _ in range(TRAIN_STEPS):
        loss, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        if loss.item() < TARGET_LOSS:
            break
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return float(loss.item())


def write_agent_model(path: Path) -> Path:
    """Write and train the fixture model into `path` (a few seconds on the CPU)."""
    write_demo_model(path)
    _add_markers(path)
    loss = train(path)
    if loss > TARGET_LOSS:
        raise RuntimeError(f"the agent fixture model did not learn its examples (loss {loss:.3f})")
    return path
