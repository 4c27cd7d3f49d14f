"""The engine's HTTP server: parse -> tokenize -> hand to the model thread -> respond."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import hmac
import itertools
import logging
import os
import signal
import ssl
import sys
import time
from typing import Any, Literal, TextIO

from aiohttp import web

from mlxfleet.engines import EXIT_CANNOT_SPLIT
from mlxfleet.errors import ApiError
from mlxfleet.openai.protocol import (
    ChatRequest,
    CompletionRequest,
    parse_chat_request,
    parse_completion_request,
    parse_json_body,
    resolve_max_tokens,
)
from mlxfleet.openai.responses import Kind, ResponseHeader, Usage, error_body
from node_agent.engine.channels import Channels, machine, starts_in_reasoning
from node_agent.engine.config import EngineConfig
from node_agent.engine.generator import Event, Job, ModelThread
from node_agent.engine.grammar import Grammars, RequestGrammar
from node_agent.engine.knobs import updated_knobs
from node_agent.engine.respond import Answer, Handle, collect, json_error, stream
from node_agent.errors import CannotSplit, QueueFull

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
DRAIN_TIMEOUT_S = 10.0
MODEL_THREAD_JOIN_TIMEOUT_S = 5.0
PARENT_POLL_S = 1.0  # how often an engine checks that its agent still exists
PARENT_PID_ENV = "MLXFLEET_PARENT_PID"
RETRY_AFTER_S = 1
DROP_CACHE_TIMEOUT_S = 5.0  # the model thread takes the drop between two decode steps
BATCH_TIER_NICE = 10  # batch engines yield the CPU to interactive ones under contention
LISTENING_LINE = "MLXFLEET_ENGINE_LISTENING port={port}"


class EngineServer:
    """Serves one model over HTTP until SIGTERM/SIGINT; all methods run on the event loop."""

    def __init__(self, config: EngineConfig, out: TextIO = sys.stdout) -> None:
        self._config = config
        self._out = out
        self._expected_auth = f"Bearer {config.secret}".encode()
        self._model = ModelThread(
            config.model_path,
            knobs=config.knobs,
            context_length=config.context_length,
            kv_bits=config.kv_bits,
            kv_group_size=config.kv_group_size,
            prefix_cache_bytes=config.prefix_cache_mib * 2**20,
            group=config.group,
        )
        # One worker: HF fast tokenizers are not safe to call from several threads at once.
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, "mlxfleet-tokenize")
        self._ids = itertools.count(1)
        self._machines: dict[bool, Any] = {}  # channels.machine(tokenizer, with_tools), built once
        self._grammars: Grammars | None = None  # built on the first constrained request
        self._ready = False
        self._started = int(time.time())
        self._stop = asyncio.Event()

    def build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._auth]
        )
        app.router.add_get("/v1/engine/stats", self._stats)
        app.router.add_get("/health", self._health)
        # Memory pressure on any member's node (its agent asks its own rank; rank 0 drops on all).
        app.router.add_post("/v1/engine/prefix_cache/drop", self._drop_prefix_cache)
        group = self._config.group
        if group is not None and group.rank > 0:
            return app  # a group's other ranks do what rank 0 sends them (group.py)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._one_model)
        app.router.add_post("/v1/engine/count_tokens", self._count_tokens)
        app.router.add_get("/v1/engine/knobs", self._get_knobs)
        app.router.add_post("/v1/engine/knobs", self._set_knobs)
        return app

    async def serve(self) -> int:
        """Listen, load the model, serve; on a signal drain in-flight work and return 0."""
        if self._config.tier == "batch":
            # The interactive engine (and the user's apps) on this Mac get the CPU first. Set
            # before the model thread and pools exist: Linux applies nice per thread and new
            # threads inherit it.
            os.nice(BATCH_TIER_NICE)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        runner = web.AppRunner(
            self.build_app(),
            access_log=None,
            handler_cancellation=True,  # a client that goes away cancels its handler
            shutdown_timeout=DRAIN_TIMEOUT_S,
        )
        await runner.setup()
        tls = None
        if self._config.tls_cert is not None and self._config.tls_key is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(self._config.tls_cert, self._config.tls_key)
        await web.TCPSite(runner, self._config.host, self._config.port, ssl_context=tls).start()
        port = runner.addresses[0][1]
        print(LISTENING_LINE.format(port=port), file=self._out, flush=True)
        logger.info(
            "listening on port %d, loading %s (%s tier, %s)",
            port,
            self._config.model_path,
            self._config.tier,
            self._config.knobs,
        )
        # A rank > 0 told to stop by rank 0 ends the process as a signal would.
        self._model.on_follow_end = lambda: self._stop_soon(loop)
        self._model.start()
        # The agent names itself: by the time we run, a dead agent would already show as 1.
        parent = int(os.environ.get(PARENT_PID_ENV) or os.getppid())
        orphan_watch = asyncio.create_task(self._exit_when_orphaned(parent))
        loaded = asyncio.wrap_future(self._model.loaded)
        stopping = asyncio.ensure_future(self._stop.wait())
        waiting: set[asyncio.Future[Any]] = {loaded, stopping}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        exit_code = 0
        if loaded.done() and loaded.exception() is not None:
            exit_code = EXIT_CANNOT_SPLIT if isinstance(loaded.exception(), CannotSplit) else 1
        elif loaded.done():
            # Everything allocated so far (modules, the model's Python objects, the tokenizer)
            # lives as long as the engine: keep it out of the cyclic collector, whose full
            # passes over it would otherwise stall decode steps (vLLM freezes after start too).
            gc.collect()
            gc.freeze()
            self._ready = True
            logger.info("ready: serving %s", self._config.model_name)
            await stopping
        # `loaded` is left alone when a signal comes first: cancelling it would make the model
        # thread's set_result fail; the thread is a daemon and is stopped below.
        stopping.cancel()
        orphan_watch.cancel()
        if exit_code == 0:
            logger.info("shutting down: draining in-flight work (up to %.0f s)", DRAIN_TIMEOUT_S)
        await runner.cleanup()
        await asyncio.to_thread(self._model.stop, MODEL_THREAD_JOIN_TIMEOUT_S)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        return exit_code

    def _stop_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon_threadsafe(self._stop.set)

    async def _exit_when_orphaned(self, parent_pid: int) -> None:
        """Shut down when the agent that started us is gone (an agent SIGKILLed or crashed
        must not leave engines holding unified memory nobody can reach)."""
        while os.getppid() == parent_pid:
            await asyncio.sleep(PARENT_POLL_S)
        logger.warning("parent process %d is gone: shutting down", parent_pid)
        self._stop.set()

    # --- middlewares ---------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status in (429, 503) else None
            body = error_body(exc.message, exc.type, exc.param, exc.code)
            return web.json_response(body, status=exc.status, headers=headers)
        except web.HTTPException as exc:
            if exc.status == 413:
                message = f"Request body is larger than {MAX_BODY_BYTES} bytes."
                return json_error(413, message, "invalid_request_error", "request_too_large")
            code = "not_found" if exc.status == 404 else None
            return json_error(exc.status, exc.reason, "invalid_request_error", code)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            logger.exception("internal error on %s %s", request.method, request.path)
            return json_error(500, "Internal server error.", "server_error", None)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self._expected_auth):
            return json_error(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer <engine secret>'.",
                "invalid_request_error",
                "invalid_api_key",
            )
        return await handler(request)

    # --- handlers ------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        if self._ready:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "loading"}, status=503)

    def _model_object(self) -> dict[str, Any]:
        return {
            "id": self._config.model_name,
            "object": "model",
            "created": self._started,
            "owned_by": "mlxfleet",
        }

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_object()]})

    async def _one_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self._config.model_name:
            raise ApiError.invalid(
                f"The model '{name}' does not exist.", "model", "model_not_found", 404
            )
        return web.json_response(self._model_object())

    async def _stats(self, request: web.Request) -> web.Response:
        stats = dataclasses.asdict(self._model.stats())
        return web.json_response({**stats, "tier": self._config.tier})

    async def _drop_prefix_cache(self, request: web.Request) -> web.Response:
        """Empty the prefix cache: the agent asks when its Mac reports memory pressure."""
        try:
            freed = await asyncio.wait_for(
                asyncio.wrap_future(self._model.drop_prefix_cache()), DROP_CACHE_TIMEOUT_S
            )
        except TimeoutError:
            raise ApiError.invalid(
                "The model thread did not answer.", None, "model_busy", 503, "server_error"
            ) from None
        if freed:
            logger.info("prefix cache dropped: %d bytes freed", freed)
        return web.json_response({"freed_bytes": freed})

    def _knobs_body(self) -> dict[str, Any]:
        return {"tier": self._config.tier, **self._model.knobs.as_dict()}

    async def _get_knobs(self, request: web.Request) -> web.Response:
        return web.json_response(self._knobs_body())

    async def _set_knobs(self, request: web.Request) -> web.Response:
        """Change any subset of the knobs; they apply from the next admission decision."""
        knobs = updated_knobs(self._model.knobs, parse_json_body(await request.read()))
        self._model.set_knobs(knobs)
        logger.info("knobs changed: %s", knobs)
        return web.json_response(self._knobs_body())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_chat_request(parse_json_body(await request.read()))
        return await self._generate(request, "chat", parsed)

    async def _count_tokens(self, request: web.Request) -> web.Response:
        """The prompt size of a chat body, through the model's own template and tokenizer
        (what Anthropic's count_tokens answers); nothing is generated."""
        parsed = parse_chat_request(parse_json_body(await request.read()))
        self._check_ready()
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._tokenize_pool, self._tokenize, parsed)
        return web.json_response({"prompt_tokens": len(ids)})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        parsed = parse_completion_request(parse_json_body(await request.read()))
        return await self._generate(request, "completion", parsed)

    async def _generate(
        self, request: web.Request, kind: Kind, parsed: ChatRequest | CompletionRequest
    ) -> web.StreamResponse:
        self._check_ready()
        loop = asyncio.get_running_loop()
        prompt_ids, grammar = await loop.run_in_executor(self._tokenize_pool, self._prepare, parsed)
        param: Literal["messages", "prompt"] = "messages" if kind == "chat" else "prompt"
        header = ResponseHeader.new(kind, self._config.model_name)
        usage_base = Usage(len(prompt_ids), 0)
        sent: tuple[int, ...] = ()
        wanted = parsed.params.max_tokens
        if (cont := parsed.continuation) is not None:
            # Pick up another engine's stream: same response id, its tokens as our prompt's tail.
            header = dataclasses.replace(header, id=cont.id, created=cont.created)
            sent = cont.token_ids
            usage_base = Usage(len(prompt_ids), len(sent))
            wanted = None if wanted is None else wanted - len(sent)
        handle = Handle(next(self._ids), loop)
        if wanted is not None and wanted <= 0:  # the stream had all its tokens but not its end
            handle.push(Event("", [], "length", 0))
        else:
            max_tokens = resolve_max_tokens(
                len(prompt_ids) + len(sent), wanted, self._model.context_length, param
            )
            job = Job(
                handle.request_id,
                prompt_ids + list(sent),
                max_tokens,
                parsed.params,
                handle.push,
                sent,
                grammar,
            )
            try:
                self._model.submit(job)
            except QueueFull:
                raise ApiError.invalid(
                    "The engine is at capacity; retry shortly.",
                    None,
                    "rate_limit_exceeded",
                    429,
                    "rate_limit_error",
                ) from None
        request_id = handle.request_id
        answer = Answer(
            handle,
            header,
            usage_base,
            self._token_text,
            self._channels(parsed, prompt_ids),
            one_call=isinstance(parsed, ChatRequest) and not parsed.parallel_tool_calls,
            stop=lambda: self._model.cancel(request_id),
        )
        if sent:  # what the client has already: the channels' state (an open call) resumes
            answer.channels.resume(self._model.tokenizer.decode(list(sent)))
            answer.calls_taken = answer.calls_sent = answer.channels.calls_made
        try:
            if parsed.stream:
                return await stream(
                    request, answer, parsed.include_usage, first=parsed.continuation is None
                )
            return await collect(answer)
        finally:
            if not handle.done:
                # The client went away (or we failed): the model thread frees the slot.
                self._model.cancel(handle.request_id)

    def _check_ready(self) -> None:
        if not self._ready:
            raise ApiError.invalid(
                "The model is still loading.", None, "model_loading", 503, "server_error"
            )

    def _channels(self, parsed: ChatRequest | CompletionRequest, prompt_ids: list[int]) -> Channels:
        """How this answer's text splits into content, reasoning and tool calls (completions:
        all content)."""
        tokenizer = self._model.tokenizer
        if not isinstance(parsed, ChatRequest):
            return Channels(None, tokenizer, None, reasoning=False)
        tools_on = parsed.tools_on and tokenizer.has_tool_calling
        if tools_on not in self._machines:
            self._machines[tools_on] = machine(tokenizer, tools_on)
        tools = [t.as_template() for t in parsed.tools] if tools_on else None
        reasoning = starts_in_reasoning(tokenizer, prompt_ids)
        return Channels(self._machines[tools_on], tokenizer, tools, reasoning)

    def _prepare(
        self, parsed: ChatRequest | CompletionRequest
    ) -> tuple[list[int], RequestGrammar | None]:
        """Off the event loop, in one hop: the prompt's ids and the request's grammar."""
        prompt_ids = self._tokenize(parsed)
        sent = list(parsed.continuation.token_ids) if parsed.continuation else []
        return prompt_ids, self._grammar(parsed, prompt_ids, sent)

    def _grammar(
        self, parsed: ChatRequest | CompletionRequest, prompt_ids: list[int], sent: list[int]
    ) -> RequestGrammar | None:
        """The request's constrained decoding (grammar.py): its response_format, or the forced
        call of tool_choice required or named. Compiles the grammar (cached) off the loop."""
        if not isinstance(parsed, ChatRequest):
            return None
        if self._grammars is None:
            self._grammars = Grammars(self._model.tokenizer, self._model.vocab_size)
        opened = starts_in_reasoning(self._model.tokenizer, prompt_ids)
        if parsed.response_format.constrained:
            return self._grammars.for_format(parsed.response_format, sent, opened)
        if parsed.tools_on and parsed.tool_choice.mode == "required":
            return self._grammars.for_tool_choice(
                parsed.tools, parsed.tool_choice, parsed.parallel_tool_calls, sent, opened
            )
        return None

    def _token_text(self, token_id: int) -> str:
        """One token as text, for logprobs (a piece of a multi-byte character decodes to U+FFFD;
        its `bytes` then say so, as OpenAI's do)."""
        return str(self._model.tokenizer.decode([token_id]))

    def _check_vocabulary(self, param: str, ids: list[int] | tuple[int, ...]) -> None:
        bad = [t for t in ids if t >= self._model.vocab_size]
        if bad:
            raise ApiError.invalid(
                f"Invalid '{param}': token id {bad[0]} is outside the vocabulary "
                f"(size {self._model.vocab_size}).",
                param,
                "invalid_value",
            )

    def _tokenize(self, parsed: ChatRequest | CompletionRequest) -> list[int]:
        self._check_vocabulary("logit_bias", [t for t, _ in parsed.params.logit_bias])
        tokenizer = self._model.tokenizer
        if isinstance(parsed, ChatRequest):
            messages = [m.as_template() for m in parsed.messages]
            extra: dict[str, Any] = dict(parsed.template_kwargs)
            if parsed.tools_on:
                if not tokenizer.has_tool_calling:
                    raise ApiError.invalid(
                        f"The model '{self._config.model_name}' has no tool calling in its "
                        "chat template; send tool_choice 'none' or no tools.",
                        "tools",
                        "unsupported_parameter",
                    )
                extra["tools"] = [t.as_template() for t in parsed.tools]
            try:
                ids = list(
                    tokenizer.apply_chat_template(messages, add_generation_prompt=True, **extra)
                )
            except Exception as exc:
                raise ApiError.invalid(
                    f"The model's chat template rejected the messages: {exc}",
                    "messages",
                    "invalid_value",
                ) from None
        elif isinstance(parsed.prompt, str):
            ids = list(tokenizer.encode(parsed.prompt))
        else:
            ids = list(parsed.prompt)
            self._check_vocabulary("prompt", ids)
        if not ids:
            raise ApiError.invalid("The prompt tokenizes to nothing.", "prompt", "invalid_value")
        return ids
