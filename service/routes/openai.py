"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (with SSE streaming)."""

from __future__ import annotations

import json

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from service.auth import Reader
from service.deps import StateDep, split_model
from service.schemas import ChatRequest, CompletionRequest, ScoreRequest
from service.serving import UnknownModel, completion_id, now

router = APIRouter(prefix="/v1", tags=["openai"])


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


@router.get("/models")
def list_models(state: StateDep, _: Reader) -> dict:
    data = []
    for name in state.servers:
        ids = [name] + [f"{name}@{v.id}" for v in state.registry.versions(name)]
        ids += [f"{name}@{a}" for a in state.registry.aliases(name)]
        data += [{"id": i, "object": "model", "created": 0, "owned_by": "crispedit"} for i in ids]
    return {"object": "list", "data": data}


def sse(chunks) -> StreamingResponse:
    def body():
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


@router.post("/completions")
async def completions(req: CompletionRequest, state: StateDep, _: Reader):
    server, version = resolve(state, req.model)
    max_tokens = checked_max_tokens(state, req.max_tokens)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    cid, model_id = completion_id(), f"{server.name}@{version}"
    if req.stream:
        if len(prompts) != 1:
            raise HTTPException(400, "stream supports a single prompt")
        pieces = server.stream(version, prompts[0], max_tokens, req.temperature, req.top_p, stops(req.stop), req.seed)
        return sse({"id": cid, "object": "text_completion", "created": now(), "model": model_id,
                    "choices": [{"index": 0, "text": p, "logprobs": None, "finish_reason": None}]} for p in pieces)
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
    for i, prompt in enumerate(prompts):
        g = await run_in_threadpool(server.generate, version, prompt, max_tokens, req.temperature, req.top_p,
                                    stops(req.stop), req.seed)
        choices.append({"index": i, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason})
        usage["prompt_tokens"] += g.prompt_tokens
        usage["completion_tokens"] += g.completion_tokens
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"id": cid, "object": "text_completion", "created": now(), "model": model_id, "choices": choices,
            "usage": usage}


@router.post("/chat/completions")
async def chat_completions(req: ChatRequest, state: StateDep, _: Reader):
    server, version = resolve(state, req.model)
    max_tokens = checked_max_tokens(state, req.max_completion_tokens or req.max_tokens, default=256)
    prompt = server.chat_prompt([m.model_dump() for m in req.messages])
    cid, model_id = "chatcmpl-" + completion_id()[5:], f"{server.name}@{version}"
    if req.stream:
        pieces = server.stream(version, prompt, max_tokens, req.temperature, req.top_p, stops(req.stop), req.seed)

        def chunks():
            yield {"id": cid, "object": "chat.completion.chunk", "created": now(), "model": model_id,
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            for p in pieces:
                yield {"id": cid, "object": "chat.completion.chunk", "created": now(), "model": model_id,
                       "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
            yield {"id": cid, "object": "chat.completion.chunk", "created": now(), "model": model_id,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}

        return sse(chunks())
    g = await run_in_threadpool(server.generate, version, prompt, max_tokens, req.temperature, req.top_p,
                                stops(req.stop), req.seed)
    return {"id": cid, "object": "chat.completion", "created": now(), "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text},
                         "finish_reason": g.finish_reason}],
            "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                      "total_tokens": g.prompt_tokens + g.completion_tokens}}


@router.post("/score")
async def score(req: ScoreRequest, state: StateDep, _: Reader) -> dict:
    server, version = resolve(state, req.model)
    result = await run_in_threadpool(server.score, version, req.prompt, req.target)
    return {"model": f"{server.name}@{version}", **result}
