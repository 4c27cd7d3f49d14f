"""How to sample and when to stop: the sampling fields of chat and completion requests.

Parsed once, here, by the gateway (to refuse bad input before engine work) and by the engine
(to apply it). Ranges are OpenAI's where OpenAI has the field, vLLM's for its extensions
(`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mlxfleet.errors import ApiError

MAX_STOP_SEQUENCES = 4
MIN_TEMPERATURE = 0.0
MAX_TEMPERATURE = 2.0
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty, frequency_penalty (OpenAI)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit on logit_bias keys
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI)
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions `logprobs` integer (OpenAI)
# The tokens the penalties look back over: mlx-lm's window (mlx_lm.server's default too).
PENALTY_CONTEXT_TOKENS = 20

Kind = Literal["chat", "completion"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample and when to stop; max_tokens None means "the rest of the context".

    Every default is "off": a request that sets none of them samples as before.
    """

    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    # vLLM's extension, for benchmarks: generate to max_tokens through end-of-sequence tokens.
    ignore_eos: bool = False
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # 1: none; multiplicative, sign-aware (mlx-lm)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: bool = False  # report the chosen token's log probability
    top_logprobs: int = 0  # and this many most likely alternatives per position

    @property
    def needs_processors(self) -> bool:
        """Whether logits must be changed before sampling (bias or a penalty)."""
        return bool(
            self.logit_bias
            or self.repetition_penalty != 1.0
            or self.presence_penalty
            or self.frequency_penalty
        )


def is_int(value: Any) -> bool:
    # bool is a subclass of int, but `"max_tokens": true` is a client bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return is_int(value) or isinstance(value, float)


def invalid(message: str, param: str, code: str = "invalid_value") -> ApiError:
    """A 400 naming the field (OpenAI's invalid_request_error)."""
    return ApiError.invalid(message, param, code)


def type_error(param: str, expected: str, value: Any) -> ApiError:
    return ApiError.invalid(
        f"Invalid type for '{param}': expected {expected}, got {type(value).__name__} ({value!r}).",
        param,
        "invalid_type",
    )


def _in_range(value: Any, param: str, low: float, high: float, integer: bool = False) -> Any:
    """A number (an integer with `integer`) field's value, checked to be in [low, high]."""
    if not (is_int(value) if integer else is_number(value)):
        raise type_error(param, "an integer" if integer else "a number", value)
    if not low <= value <= high:
        raise ApiError.invalid(
            f"Invalid '{param}': {value} is not in [{low:g}, {high:g}].", param, "invalid_value"
        )
    return value


def _number(body: dict[str, Any], param: str, default: float, low: float, high: float) -> float:
    """A number field in [low, high], or its default when absent or null."""
    value = body.get(param)
    return default if value is None else float(_in_range(value, param, low, high))


def _int_in(value: Any, param: str, low: int, high: int) -> int:
    """An integer field in [low, high]."""
    return int(_in_range(value, param, low, high, integer=True))


def _parse_max_tokens(body: dict[str, Any]) -> int | None:
    # max_completion_tokens is OpenAI's newer name; when both are sent it wins.
    chosen: int | None = None
    for param in ("max_tokens", "max_completion_tokens"):
        value = body.get(param)
        if value is None:
            continue
        if not is_int(value):
            raise type_error(param, "an integer", value)
        # 0 is refused like OpenAI does: a request that may generate nothing is a client bug.
        if value < 1:
            raise ApiError.invalid(
                f"Invalid '{param}': integer below minimum value. "
                f"Expected a value >= 1, but got {value} instead.",
                param,
                "integer_below_min_value",
            )
        chosen = value
    return chosen


def _parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        stops = [value]
    elif isinstance(value, list) and all(isinstance(s, str) for s in value):
        stops = value
    else:
        raise type_error("stop", "a string or a list of strings", value)
    if len(stops) > MAX_STOP_SEQUENCES:
        message = f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}."
        raise invalid(message, "stop", "array_above_max_length")
    # An empty stop string would match before the first token; ignore it, as OpenAI does.
    return tuple(s for s in stops if s)


def _parse_n(value: Any) -> None:
    if value is None:
        return
    if not is_int(value):
        raise type_error("n", "an integer", value)
    if value < 1:
        raise ApiError.invalid(f"Invalid 'n': {value} is below 1.", "n", "integer_below_min_value")
    if value > 1:
        raise ApiError.invalid(
            f"Unsupported value for 'n': {value}; this server returns one choice.",
            "n",
            "unsupported_parameter",
        )


def _parse_top_k(value: Any) -> int:
    if value is None:
        return 0
    if not is_int(value):
        raise type_error("top_k", "an integer", value)
    if value < -1:
        raise ApiError.invalid(
            f"Invalid 'top_k': {value}; expected -1 or 0 (off) or a positive number of tokens.",
            "top_k",
            "invalid_value",
        )
    return max(value, 0)  # vLLM's -1 and our 0 both mean every token


def _parse_repetition_penalty(value: Any) -> float:
    if value is None:
        return 1.0
    if not is_number(value):
        raise type_error("repetition_penalty", "a number", value)
    if value <= 0:
        raise ApiError.invalid(
            f"Invalid 'repetition_penalty': {value}; expected a number above 0 (1 is none).",
            "repetition_penalty",
            "invalid_value",
        )
    return float(value)


def _parse_logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token ids (as JSON strings) to a bias in [-100, 100]. The ids are checked
    against the vocabulary by the engine, which knows it."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise type_error("logit_bias", "an object mapping token ids to numbers", value)
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        message = (
            f"Invalid 'logit_bias': at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(value)}."
        )
        raise invalid(message, "logit_bias")
    low, high = LOGIT_BIAS_RANGE
    entries = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ApiError.invalid(
                f"Invalid 'logit_bias': key {key!r} is not a token id.",
                "logit_bias",
                "invalid_value",
            )
        if not is_number(bias) or not low <= bias <= high:
            raise ApiError.invalid(
                f"Invalid 'logit_bias[{key}]': {bias!r} is not a number in [{low:g}, {high:g}].",
                "logit_bias",
                "invalid_value",
            )
        entries.append((int(key), float(bias)))
    return tuple(sorted(entries))


def _parse_logprobs(body: dict[str, Any], kind: Kind) -> tuple[bool, int]:
    """(logprobs, top_logprobs). Chat: `logprobs` true plus `top_logprobs` 0..20. Completions:
    `logprobs` an integer 0..5, the number of alternatives (0: the chosen token's only)."""
    value, top = body.get("logprobs"), body.get("top_logprobs")
    if kind == "completion":
        if top is not None:
            raise ApiError.invalid(
                "Unsupported parameter 'top_logprobs' for completions: send 'logprobs' as the "
                "number of alternatives.",
                "top_logprobs",
                "unsupported_parameter",
            )
        if value is None:
            return False, 0
        return True, _int_in(value, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    if value is not None and not isinstance(value, bool):
        raise type_error("logprobs", "a boolean", value)
    wanted = bool(value)
    if top is None:
        return wanted, 0
    top = _int_in(top, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if not wanted:
        raise ApiError.invalid(
            "Invalid 'top_logprobs': it requires 'logprobs' to be true.",
            "top_logprobs",
            "invalid_value",
        )
    return True, top


def parse_sampling(body: dict[str, Any], kind: Kind) -> SamplingParams:
    """The sampling fields of a chat (`kind` "chat") or completions body."""
    temperature = _number(
        body, "temperature", DEFAULT_TEMPERATURE, MIN_TEMPERATURE, MAX_TEMPERATURE
    )
    top_p = body.get("top_p")
    if top_p is None:
        top_p = DEFAULT_TOP_P
    elif not is_number(top_p):
        raise type_error("top_p", "a number", top_p)
    elif not 0.0 < top_p <= 1.0:
        raise ApiError.invalid(
            f"Invalid 'top_p': {top_p} is not in (0, 1].", "top_p", "invalid_value"
        )
    seed = body.get("seed")
    if seed is not None and not is_int(seed):
        raise type_error("seed", "an integer", seed)
    _parse_n(body.get("n"))
    if body.get("echo") not in (None, False):
        raise ApiError.invalid("Unsupported parameter 'echo'.", "echo", "unsupported_parameter")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise type_error("ignore_eos", "a boolean", ignore_eos)
    logprobs, top_logprobs = _parse_logprobs(body, kind)
    return SamplingParams(
        max_tokens=_parse_max_tokens(body),
        temperature=temperature,
        top_p=float(top_p),
        seed=seed,
        stop=_parse_stop(body.get("stop")),
        ignore_eos=ignore_eos,
        top_k=_parse_top_k(body.get("top_k")),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_parse_repetition_penalty(body.get("repetition_penalty")),
        presence_penalty=_number(body, "presence_penalty", 0.0, *PENALTY_RANGE),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, *PENALTY_RANGE),
        logit_bias=_parse_logit_bias(body.get("logit_bias")),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
