"""413 for a request body over the limit, however it is sent: a Content-Length over it is refused before any
byte is read, and a chunked body is counted as it arrives and cut off at the limit (ASGI middleware)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_body


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await self.refuse(send, f"request body of {int(length)} bytes")
            return
        received, started, refused = 0, False, False

        async def counted() -> Message:
            # past the limit: answer 413 now, and tell the app its client has gone, so it reads no further
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    if not started:
                        await self.refuse(send, f"request body of more than {self.limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if refused:  # the app's own answer to the cut-off body: the 413 was sent instead
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, tracked)

    async def refuse(self, send: Send, what: str) -> None:
        body = json.dumps(error_body(413, f"{what} exceeds the limit of {self.limit} bytes; send fewer edits per "
                                          "request")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
