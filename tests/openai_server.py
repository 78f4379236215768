"""A small OpenAI-compatible chat server for the GENIUS tests and for trying GENIUS by hand.

    with OpenAIServer(ScriptedPolicy(["[2, 2, 2, 1, 2, 2, 2, 0]"], fallback=FreshArchitecturePolicy(space))) as s:
        searcher = GeniusSearcher(space, "config.arch", "eval/accuracy", "max", model="m", base_url=s.base_url)

It is a real HTTP server (ThreadingHTTPServer on 127.0.0.1, a free port, in a daemon thread) that answers
POST /v1/chat/completions in the OpenAI response format from a `policy(messages) -> reply text`. It keeps every
request body (`requests`), every response (`responses`) and the Authorization header of each request
(`authorizations`), so tests can check prompts, usage and that a key was sent. Tokens are counted as
whitespace-separated words. A policy may also answer badly: `RawReply` sends a status and a body of its own (an
HTTP error, a 200 that is not JSON), `SlowReply` answers after a delay (a client timeout).

As a script it serves fresh architectures of a space until interrupted:

    python tests/openai_server.py --port 8000 --space nas_bench_macro
"""

from __future__ import annotations

import argparse
import json
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

from trainers.nas import get_space
from trainers.nas.space import SearchSpace


@dataclass(frozen=True)
class RawReply:
    """Sent as it is instead of a chat completion: an HTTP status, a body and its content type."""

    status: int
    body: str
    content_type: str = "text/html"


@dataclass(frozen=True)
class SlowReply:
    """The reply `text`, sent after `seconds` (past the client's timeout, the client sees a timeout)."""

    seconds: float
    text: str


Policy = Callable[[list[dict[str, str]]], "str | RawReply | SlowReply"]
INTEGER_LIST = re.compile(r"\[\s*-?\d+(?:\s*,\s*-?\d+)*\s*\]")


def count_tokens(text: str) -> int:
    return len(text.split())


class OpenAIServer:
    """POST /v1/chat/completions answered by `policy`; a context manager that yields itself (see `base_url`)."""

    def __init__(self, policy: Policy, port: int = 0, host: str = "127.0.0.1", served_model: str | None = None):
        self.policy, self.served_model = policy, served_model
        self.requests: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.app = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-test-server", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def complete(self, body: dict[str, Any], authorization: str | None) -> dict[str, Any] | RawReply:
        """One chat completion: record the request, ask the policy, answer in the OpenAI format (or as the policy's
        RawReply says)."""
        with self._lock:
            self.requests.append(body)
            self.authorizations.append(authorization)
            reply = self.policy(body["messages"])
            if isinstance(reply, RawReply):
                self.responses.append({"raw": reply})
                return reply
            if isinstance(reply, SlowReply):
                time.sleep(reply.seconds)
                reply = reply.text
            prompt_tokens = sum(count_tokens(message.get("content") or "") for message in body["messages"])
            completion_tokens = count_tokens(reply)
            response = {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.served_model or body.get("model", "test-model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            }
            self.responses.append(response)
            return response


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        try:
            response = self.server.app.complete(body, self.headers.get("Authorization"))  # type: ignore[attr-defined]
        except Exception as exc:  # the policy's failure becomes the client's API error
            self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}})
            return
        if isinstance(response, RawReply):
            self._send(response.status, response.body, response.content_type)
            return
        self._send(200, response)

    def _send(self, status: int, payload: dict[str, Any] | str, content_type: str = "application/json") -> None:
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (a SlowReply)
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        """Quiet: tests read `requests` instead."""


class ScriptedPolicy:
    """The scripted replies in order, then `fallback(messages)` (an error when there is none)."""

    def __init__(self, replies: Sequence[str], fallback: Policy | None = None):
        self.replies, self.fallback = list(replies), fallback

    def __call__(self, messages: list[dict[str, str]]) -> str:
        if self.replies:
            return self.replies.pop(0)
        if self.fallback is None:
            raise RuntimeError("ScriptedPolicy has no replies left and no fallback")
        return self.fallback(messages)


class FreshArchitecturePolicy:
    """A valid, in-budget architecture of `space` whose network no message mentions yet, as a bare list.

    Mentioned networks are the canonical forms of every valid bracketed list in the messages. A random sample
    outside the FLOPs window is walked into it by mutations that bring it no farther from the window. The choice
    is random but a pure function of `seed` and the mentioned networks: the same prompt gets the same answer.
    """

    def __init__(self, space: SearchSpace, seed: int = 0, flops: tuple[float, float] | None = None,
                 tries: int = 1000, steps: int = 300):
        self.space, self.seed, self.tries, self.steps = space, seed, tries, steps
        self.window = flops if flops is not None else space.flops_window

    def __call__(self, messages: list[dict[str, str]]) -> str:
        seen = self.mentioned(messages)
        rng = random.Random(f"{self.seed}|{'|'.join(sorted(seen))}")
        for _ in range(self.tries):
            code = self._into_window(self.space.sample(rng), rng)
            if code is not None and self.space.canonical(code) not in seen:
                return str(self.space.answer_list(code))
        raise RuntimeError(f"no fresh architecture of {self.space.name} in {self.tries} samples")

    def mentioned(self, messages: list[dict[str, str]]) -> set[str]:
        seen = set()
        for message in messages:
            for match in INTEGER_LIST.findall(message.get("content") or ""):
                try:
                    seen.add(self.space.canonical(self.space.from_answer(json.loads(match))))
                except ValueError:  # not an architecture of the space (InvalidArchitecture) or not JSON
                    continue
        return seen

    def _into_window(self, code: str, rng: random.Random) -> str | None:
        for _ in range(self.steps):
            if self._distance(code) == 0:
                return code
            mutant = self.space.mutate(code, rng)
            if self._distance(mutant) <= self._distance(code):
                code = mutant
        return None

    def _distance(self, code: str) -> float:
        """MFLOPs between `code` and the window (0 inside it, or without a window)."""
        if self.window is None:
            return 0.0
        flops = self.space.flops(code)
        return max(0.0, self.window[0] - flops, flops - self.window[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--space", default="nas_bench_macro")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    server = OpenAIServer(FreshArchitecturePolicy(get_space(args.space), args.seed), args.port, args.host)
    with server:
        print(server.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
