"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (with SSE streaming)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from service.auth import Reader
from service.deps import StateDep, split_model
from service.schemas import ChatRequest, CompletionRequest, ScoreRequest
from service.serving import Generation, Stream, UnknownModel, completion_id, now

router = APIRouter(prefix="/v1", tags=["openai"])
log = logging.getLogger(__name__)


def stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def resolve(state, model: str):
    server, ref = split_model(state, model)
    try:
        return server, server.resolve(ref)
    except UnknownModel as err:
        raise HTTPException(404, str(err)) from err


def checked_max_tokens(state, n: int | None, default: int = 16) -> int:
    n = n or default
    if n > state.settings.max_new_tokens:
        raise HTTPException(400, f"max_tokens {n} exceeds this server's limit {state.settings.max_new_tokens}")
    return n


def refuse_unsupported(req) -> None:
    if names := req.unsupported():
        raise HTTPException(400, f"unsupported parameter{'s' if len(names) > 1 else ''} {', '.join(names)}: this "
                                 "server does not implement it; leave it out")


def choice_seed(seed: int | None, j: int) -> int | None:
    """The seed of a request's j-th choice: each of n sampled choices differs, and repeats with the seed."""
    return None if seed is None else (seed + j) % 2**63


def wants_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


@router.get("/models/{model_id}")
def get_model(model_id: str, state: StateDep, _: Reader) -> dict:
    server, version = resolve(state, model_id)
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "crispedit", "version": version}


@router.get("/models")
def list_models(state: StateDep, _: Reader) -> dict:
    data = []
    for name in state.servers:
        ids = [name] + [f"{name}@{v.id}" for v in state.registry.versions(name)]
        ids += [f"{name}@{a}" for a in state.registry.aliases(name)]
        data += [{"id": i, "object": "model", "created": 0, "owned_by": "crispedit"} for i in ids]
    return {"object": "list", "data": data}


def sse(stream: Stream, chunk: Callable[[str | None, str | None], dict], first: dict | None = None,
        usage: bool = False) -> StreamingResponse:
    """Server-sent events of ``stream``'s pieces, each wrapped by ``chunk(text, finish_reason)``, then a last chunk
    with the finish reason, with ``usage`` one more with the usage and no choices, and [DONE]. However the response
    ends (done, client gone, an error), the generation is closed, so it stops at its next token and frees its slot."""

    async def body() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            while (piece := await run_in_threadpool(stream.next_piece)) is not None:
                yield f"data: {json.dumps(chunk(piece, None))}\n\n"
            last = chunk(None, stream.finish_reason)
            yield f"data: {json.dumps(last)}\n\n"
            if usage:
                yield f"data: {json.dumps({**last, 'choices': [], 'usage': stream.usage})}\n\n"
            yield "data: [DONE]\n\n"
        except Exception as err:  # past the status code: say what went wrong in the stream, as OpenAI does
            log.error("stream %s failed: %s", stream, err)
            yield f"data: {json.dumps({'error': {'message': str(err), 'type': 'server_error'}})}\n\n"
        finally:
            stream.close()

    return StreamingResponse(body(), media_type="text/event-stream")


async def generated(request: Request, server, *args) -> Generation:
    """``server.generate(*args)`` in a worker thread, cancelled at its next token if the client disconnects."""
    cancel = threading.Event()
    task = asyncio.ensure_future(run_in_threadpool(server.generate, *args, cancel=cancel))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                cancel.set()
    finally:
        cancel.set()  # also when this handler is cancelled: the thread must not run on for nobody


async def scored(server, version: str, g: Generation, top: int, echo: bool) -> dict:
    """OpenAI's logprobs object for a completion: each token (the prompt's too with ``echo``), its log-probability
    (None for the text's first token), the ``top`` most likely tokens at its position, and its text offset."""
    ids = g.prompt_ids + g.new_ids
    token_logprobs, top_logprobs = await run_in_threadpool(server.token_logprobs, version, ids, top)
    start = 0 if echo else len(g.prompt_ids)
    tokens = [server.tokenizer.decode([t]) for t in ids[start:]]
    offsets = [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": token_logprobs[start:], "top_logprobs": top_logprobs[start:],
            "text_offset": offsets}


async def chat_scored(server, version: str, g: Generation, top: int) -> dict:
    """Chat's logprobs object, from the completion's: each answer token with its log-probability, bytes and the
    ``top`` alternatives."""
    scores = await scored(server, version, g, top, echo=False)

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "surrogatepass"))}

    return {"content": [
        {**entry(token, lp), "top_logprobs": [entry(k, v) for k, v in (tops or {}).items()]}
        for token, lp, tops in zip(scores["tokens"], scores["token_logprobs"], scores["top_logprobs"], strict=True)]}


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request, state: StateDep, _: Reader):
    refuse_unsupported(req)
    server, version = resolve(state, req.model)
    if req.max_tokens == 0 and not req.echo:
        raise HTTPException(400, "max_tokens 0 asks for nothing: set echo to score the prompt")
    max_tokens = req.max_tokens if req.max_tokens == 0 else checked_max_tokens(state, req.max_tokens)
    prompts = req.prompts()
    cid, model_id = completion_id(), f"{server.name}@{version}"
    if req.stream:
        if len(prompts) != 1 or req.n != 1:
            raise HTTPException(400, "stream supports a single prompt and n = 1")
        if req.logprobs is not None or req.echo:
            raise HTTPException(400, "logprobs and echo are served without stream; leave stream out")
        stream = await run_in_threadpool(server.open_stream, version, prompts[0], max_tokens, req.temperature,
                                         req.top_p, stops(req.stop), req.seed)
        return sse(stream, lambda text, reason: {
            "id": cid, "object": "text_completion", "created": now(), "model": model_id,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]},
            usage=wants_usage(req))
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
    for i, (prompt, seed) in enumerate((p, choice_seed(req.seed, j)) for p in prompts for j in range(req.n)):
        g = await generated(request, server, version, prompt, max_tokens, req.temperature, req.top_p,
                            stops(req.stop), seed)
        text = (prompt if isinstance(prompt, str) else server.tokenizer.decode(g.prompt_ids)) + g.text \
            if req.echo else g.text
        logprobs = await scored(server, version, g, req.logprobs, req.echo) if req.logprobs is not None else None
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": g.finish_reason})
        usage["prompt_tokens"] += g.prompt_tokens if i % req.n == 0 else 0  # a prompt is read once
        usage["completion_tokens"] += g.completion_tokens
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"id": cid, "object": "text_completion", "created": now(), "model": model_id, "choices": choices,
            "usage": usage}


@router.post("/chat/completions")
async def chat_completions(req: ChatRequest, request: Request, state: StateDep, _: Reader):
    refuse_unsupported(req)
    server, version = resolve(state, req.model)
    max_tokens = checked_max_tokens(state, req.max_completion_tokens or req.max_tokens, default=256)
    prompt = await run_in_threadpool(server.chat_prompt, [m.for_template() for m in req.messages])
    cid, model_id = "chatcmpl-" + completion_id()[5:], f"{server.name}@{version}"
    if req.stream:
        if req.n != 1 or req.logprobs:
            raise HTTPException(400, "stream supports n = 1 and no logprobs")
        stream = await run_in_threadpool(server.open_stream, version, prompt, max_tokens, req.temperature,
                                         req.top_p, stops(req.stop), req.seed)

        def chunk(delta: dict, reason: str | None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": now(), "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

        return sse(stream, lambda text, reason: chunk({"content": text} if text is not None else {}, reason),
                   first=chunk({"role": "assistant", "content": ""}, None), usage=wants_usage(req))
    answers = [await generated(request, server, version, prompt, max_tokens, req.temperature, req.top_p,
                               stops(req.stop), choice_seed(req.seed, j)) for j in range(req.n)]
    completion = sum(g.completion_tokens for g in answers)
    scores = [await chat_scored(server, version, g, req.top_logprobs or 0) if req.logprobs else None for g in answers]
    return {"id": cid, "object": "chat.completion", "created": now(), "model": model_id,
            "choices": [{"index": j, "message": {"role": "assistant", "content": g.text}, "logprobs": lp,
                         "finish_reason": g.finish_reason} for j, (g, lp) in enumerate(zip(answers, scores,
                                                                                            strict=True))],
            "usage": {"prompt_tokens": answers[0].prompt_tokens, "completion_tokens": completion,
                      "total_tokens": answers[0].prompt_tokens + completion}}


@router.post("/score")
async def score(req: ScoreRequest, state: StateDep, _: Reader) -> dict:
    server, version = resolve(state, req.model)
    result = await run_in_threadpool(server.score, version, req.prompt, req.target)
    return {"model": f"{server.name}@{version}", **result}
