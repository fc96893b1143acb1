"""A small PD-disaggregation proxy for two (or more) ``vllm serve`` instances that use LLMDataDistConnector.

Pull mode (default): the request goes to a prefill with ``max_tokens=1`` and ``kv_transfer_params =
{"do_remote_decode": true}``; the ``kv_transfer_params`` of its answer go with the original request to a
decode, whose answer (streamed or not) is passed through. Push mode (``--mode push``): the proxy picks a
transfer id and sends both requests at once; the prefill pushes each layer into the decode's blocks.
Standard library only: ``python proxy.py --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

ROUTES = ("/v1/completions", "/v1/chat/completions")


class Backends:
    """Round-robin choice of prefill and decode servers."""

    def __init__(self, prefills: List[str], decodes: List[str], controls: List[str]) -> None:
        self._prefills = itertools.cycle(list(zip(prefills, controls or [""] * len(prefills))))
        self._decodes = itertools.cycle(decodes)
        self._lock = threading.Lock()

    def pick(self) -> Tuple[str, str, str]:
        """(prefill URL, its control-channel host:port for push mode, decode URL)."""
        with self._lock:
            prefill, control = next(self._prefills)
            return prefill, control, next(self._decodes)


def post(url: str, body: Dict[str, Any], timeout_s: float):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout_s)


def prefill_body(body: Dict[str, Any], params: Dict[str, Any]) -> Dict[str, Any]:
    """The prefill's copy of a request: one token, no streaming, the connector's params."""
    out = dict(body, max_tokens=1, stream=False, kv_transfer_params=params)
    out.pop("max_completion_tokens", None)
    out.pop("stream_options", None)
    return out


class ProxyHandler(BaseHTTPRequestHandler):
    backends: Backends
    mode = "pull"
    timeout_s = 600.0
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per request is enough
        return

    def _reply_json(self, status: int, payload: Dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/health":
            self._reply_json(200, {"status": "ok"})
        else:
            self._reply_json(404, {"error": f"unknown path {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path not in ROUTES:
            self._reply_json(404, {"error": f"unknown path {self.path}; use one of {ROUTES}"})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        prefill, control, decode = self.backends.pick()
        try:
            if self.mode == "push":
                response = self._push(body, prefill, control, decode)
            else:
                response = self._pull(body, prefill, decode)
        except urllib.error.HTTPError as exc:
            self._reply_json(exc.code, {"error": exc.read().decode(errors="replace")})
            return
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self._reply_json(502, {"error": f"backend failed: {exc}"})
            return
        self._relay(response)

    def _pull(self, body: Dict[str, Any], prefill: str, decode: str):
        with post(prefill + self.path, prefill_body(body, {"do_remote_decode": True}), self.timeout_s) as answer:
            params = json.loads(answer.read()).get("kv_transfer_params")
        if not params:
            raise ValueError("the prefill returned no kv_transfer_params (is it a kv_producer with the connector?)")
        return post(decode + self.path, dict(body, kv_transfer_params=params), self.timeout_s)

    def _push(self, body: Dict[str, Any], prefill: str, control: str, decode: str):
        if not control:
            raise ValueError("push mode needs --prefill-control host:port for every --prefill")
        host, port = control.rsplit(":", 1)
        transfer_id = uuid.uuid4().hex
        decode_params = {"do_remote_prefill": True, "transfer_mode": "push", "transfer_id": transfer_id,
                         "remote_endpoints": [[host, int(port)]]}
        failure: List[BaseException] = []

        def run_prefill() -> None:
            try:
                params = {"do_remote_decode": True, "transfer_mode": "push", "transfer_id": transfer_id}
                with post(prefill + self.path, prefill_body(body, params), self.timeout_s) as answer:
                    answer.read()
            except (urllib.error.URLError, OSError) as exc:
                failure.append(exc)

        thread = threading.Thread(target=run_prefill, daemon=True)
        thread.start()  # the decode answers once the push landed (or after its push_timeout_s, recomputed)
        response = post(decode + self.path, dict(body, kv_transfer_params=decode_params), self.timeout_s)
        thread.join(self.timeout_s)
        if failure:  # the decode has already answered (it recomputed after its push_timeout_s)
            print(f"proxy: prefill request of transfer {transfer_id} failed: {failure[0]}", file=sys.stderr)
        return response

    def _relay(self, response) -> None:
        with response:
            self.send_response(response.status)
            self.send_header("Content-Type", response.headers.get("Content-Type", "application/json"))
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            while True:
                chunk = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
                if not chunk:
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")


def serve(host: str, port: int, prefills: List[str], decodes: List[str], controls: Optional[List[str]] = None,
          mode: str = "pull") -> ThreadingHTTPServer:
    """A proxy server (not yet serving: call ``serve_forever``)."""
    handler = type("Handler", (ProxyHandler,), {"backends": Backends(prefills, decodes, controls or []),
                                                "mode": mode})
    return ThreadingHTTPServer((host, port), handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--prefill", action="append", required=True, help="prefill server URL (repeatable)")
    parser.add_argument("--decode", action="append", required=True, help="decode server URL (repeatable)")
    parser.add_argument("--prefill-control", action="append", default=[],
                        help="push mode: the prefill's llm_datadist host:port (its datadist_port), "
                             "one per --prefill, same order")
    parser.add_argument("--mode", choices=("pull", "push"), default="pull")
    args = parser.parse_args()
    if args.mode == "push" and len(args.prefill_control) != len(args.prefill):
        parser.error("push mode needs one --prefill-control per --prefill")
    server = serve(args.host, args.port, args.prefill, args.decode, args.prefill_control, args.mode)
    print(f"proxy on http://{args.host}:{server.server_address[1]} ({args.mode}): prefill {args.prefill}, "
          f"decode {args.decode}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
