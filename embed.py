"""
Embed the item texts through an OpenAI-compatible endpoint (POST {base_url}/embeddings): OpenAI,
vLLM, Hugging Face TEI, Ollama, llama.cpp, Infinity, or the local serve_embeddings.py (default).

    python serve_embeddings.py &                # local all-MiniLM-L6-v2 on http://127.0.0.1:8080/v1
    python embed.py DATA                        # -> DATA/lang_emb.npy (N, 384)
    python embed.py DATA --base_url https://api.openai.com/v1 --model text-embedding-3-large

Reads  DATA/items.jsonl    N lines {"item_id": str, "text": str}
Writes DATA/lang_emb.npy   float32 (N, d_l): row i embeds line i of items.jsonl (item i+1)
       DATA/lang_emb.json  model, dimension d_l, base_url (no credentials), num_items, texts_sha256
                           (hex sha256 of Python's json.dumps(texts), ASCII-escaped)
       DATA/lang_emb.cache append-only records (magic, sha256 of [model, dimensions, text], d, crc32,
                           d float32): a repeated or interrupted run requests only the texts it lacks;
                           a torn last record (kill -9 mid-write) fails its length or crc32 check and
                           is cut off. Delete it to re-embed from scratch.
The key is read from the environment variable --api_key_env (sent as a Bearer token when set) and is
never printed or written. Progress (texts/s, ETA) and retries go to stderr; a summary line to stdout.
"""

import argparse
import base64
import hashlib
import json
import os
import random
import struct
import sys
import threading
import time
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import requests

from common import DataError, atomic_open, read_items, write_json

RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx; any other 4xx is the caller's fault: fail at once
RECORD = struct.Struct("<4s32sII")  # magic, key = sha256([model, dimensions, text]), d, crc32(key, d, vector)
MAGIC = b"AFE1"


class EndpointError(Exception):
    """The endpoint refused (other 4xx) or kept failing after all retries."""


# -----------------------------------------------------------------------------
# the cache: an append-only file of checksummed records

def cache_key(model, dimensions, text):
    return hashlib.sha256(json.dumps([model, dimensions, text]).encode()).digest()


def load_cache(path, wanted):
    """Vectors of the keys in `wanted` found in the cache, and the length of its valid prefix:
    reading stops at the first torn or corrupt record (short, bad magic, or crc32 mismatch)."""
    if not os.path.exists(path):
        return {}, 0
    vectors, valid, size = {}, 0, os.path.getsize(path)
    with open(path, "rb") as f:
        while len(header := f.read(RECORD.size)) == RECORD.size:
            magic, key, d, crc = RECORD.unpack(header)
            if magic != MAGIC or f.tell() + 4 * d > size:
                break
            vector = f.read(4 * d)
            if zlib.crc32(vector, zlib.crc32(header[4:40])) != crc:
                break
            if key in wanted:
                vectors[key] = np.frombuffer(vector, "<f4")
            valid = f.tell()
    return vectors, valid


def encode_record(key, vector):
    vector = np.ascontiguousarray(vector, "<f4").tobytes()
    head = key + struct.pack("<I", len(vector) // 4)
    return MAGIC + head + struct.pack("<I", zlib.crc32(vector, zlib.crc32(head))) + vector


# -----------------------------------------------------------------------------
# the endpoint

def public_url(url):
    """The URL without user:password@, ?query or #fragment, where credentials hide: safe to print."""
    p = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((p.scheme, p.netloc.rpartition("@")[2], p.path.rstrip("/"), "", ""))


def parse_embeddings(body, n):
    """An OpenAI embeddings response body -> (n, d) float32 in input order; ValueError if malformed."""
    try:
        data = body["data"]
        if len(data) != n:
            raise ValueError(f"{len(data)} embeddings for {n} inputs")
        rows = [None] * n
        for pos, item in enumerate(data):
            i = item.get("index", pos)  # some servers answer out of order: sort by index
            if not isinstance(i, int) or not 0 <= i < n or rows[i] is not None:
                raise ValueError(f"index {i!r} is out of range or repeated")
            e = item["embedding"]
            # base64 float32 as asked, or a list of floats from servers that ignore encoding_format (Ollama)
            rows[i] = np.frombuffer(base64.b64decode(e, validate=True), "<f4") if isinstance(e, str) \
                else np.array(e, dtype=np.float32)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"unexpected structure ({type(e).__name__}: {e})") from None
    dims = sorted({r.shape for r in rows})
    if len(dims) != 1 or len(dims[0]) != 1 or dims[0][0] == 0:
        raise ValueError(f"embeddings of shapes {dims[:3]}, expected one dimension throughout")
    E = np.stack(rows)  # (n, d)
    if not np.isfinite(E).all():
        raise ValueError("non-finite values (NaN or inf)")
    return E


def server_message(r):
    """The error text of a non-2xx response, whichever server's error shape it has."""
    try:
        body = r.json()
        err = body.get("error", body.get("detail", body.get("message", body))) if isinstance(body, dict) else body
        return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    except ValueError:
        return r.text[:500] or r.reason


def retry_after(r):
    """Seconds the server asks us to wait, or None (no Retry-After, or an HTTP date: use backoff)."""
    try:
        return max(0.0, float(r.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


class Endpoint:
    """POST batches of texts to {base_url}/embeddings with retries; safe to call from many threads."""

    def __init__(self, args, api_key):
        p = urllib.parse.urlsplit(args.base_url)
        self.url = urllib.parse.urlunsplit(p._replace(path=p.path.rstrip("/") + "/embeddings"))
        self.name = public_url(args.base_url) + "/embeddings"
        self.args, self.api_key = args, api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.local, self.stop = threading.local(), threading.Event()
        self.dim = None  # every response must have the d of the first one

    def redact(self, msg):  # servers may echo the key in their messages
        return msg.replace(self.api_key, "[api key]") if self.api_key else msg

    def embed(self, texts):
        """texts -> (B, d) float32, retrying 429/5xx/timeouts/dropped connections/malformed bodies."""
        args = self.args
        payload = {"model": args.model, "input": texts, "encoding_format": args.encoding_format}
        if args.dimensions:  # text-embedding-3 (and Matryoshka models on vLLM) shorten their vectors
            payload["dimensions"] = args.dimensions
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()  # one per thread: keep-alive, no sharing
        for attempt in range(args.max_retries + 1):
            wait = None
            try:
                r = self.local.session.post(self.url, json=payload, headers=self.headers, timeout=args.timeout)
                if 200 <= r.status_code < 300:
                    E = parse_embeddings(r.json(), len(texts))
                    if self.dim not in (None, E.shape[1]):
                        raise ValueError(f"dimension {E.shape[1]}, expected {self.dim}")
                    return E
                problem, wait = f"HTTP {r.status_code}: {server_message(r)}", retry_after(r)
                if r.status_code not in RETRY_STATUS and r.status_code < 500:
                    raise EndpointError(self.redact(f"{self.name}: {problem}"))
            except requests.RequestException as e:  # timeouts, refused or dropped connections
                reason = getattr(e.args[0], "reason", None) if e.args else None  # urllib3's, without "Max retries"
                problem = f"{type(e).__name__}: {reason or e}"[:300]
            except ValueError as e:  # invalid JSON or a response that fails validation
                problem = f"malformed response: {e}"[:300]
            if attempt == args.max_retries or self.stop.is_set():
                raise EndpointError(self.redact(f"{self.name}: giving up after {attempt + 1} attempts: {problem}"))
            if wait is None:  # exponential backoff with jitter, so parallel workers do not retry in step
                wait = min(args.backoff_max, args.backoff_base * 2 ** attempt) * random.uniform(0.5, 1.0)
            print(self.redact(f"warning: {problem}; retry {attempt + 1}/{args.max_retries} in {wait:.2f}s"),
                  file=sys.stderr, flush=True)
            if self.stop.wait(wait):
                raise EndpointError("stopped")


# -----------------------------------------------------------------------------

def embed_batches(endpoint, batches, workers):
    """Yield (batch, E) as batches complete: the first alone (a bad key or model costs one request,
    and its answer fixes d for the rest), then the others with `workers` requests in flight."""
    if not batches:
        return
    E = endpoint.embed([t for _, t in batches[0]])
    endpoint.dim = E.shape[1]
    yield batches[0], E
    pool = ThreadPoolExecutor(workers)
    try:
        futures = {pool.submit(endpoint.embed, [t for _, t in b]): b for b in batches[1:]}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        endpoint.stop.set()  # on failure or Ctrl-C: workers stop retrying, queued batches are dropped
        pool.shutdown(wait=False, cancel_futures=True)


def embed_items(args):
    items = read_items(args.data)
    texts = [item["text"] for item in items]
    keys = [cache_key(args.model, args.dimensions, t) for t in texts]
    cache_path = os.path.join(args.data, "lang_emb.cache")
    vectors, valid = load_cache(cache_path, set(keys))
    todo = list({k: t for k, t in zip(keys, texts) if k not in vectors}.items())  # identical texts once
    batches = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    endpoint = Endpoint(args, os.environ.get(args.api_key_env, "").strip())
    print(f"{len(texts)} items, {len(set(keys))} distinct texts, {len(set(keys)) - len(todo)} cached; "
          f"requesting {len(todo)} in {len(batches)} batches from {endpoint.name} (model {args.model})",
          file=sys.stderr, flush=True)

    expected = args.dimensions or (len(next(iter(vectors.values()))) if vectors else None)
    if batches and os.path.exists(cache_path) and os.path.getsize(cache_path) > valid:
        os.truncate(cache_path, valid)  # cut a torn tail off so that new records follow valid ones
    t0, done, shown = time.time(), 0, 0.0
    with open(cache_path, "ab") as cache:
        for batch, E in embed_batches(endpoint, batches, args.workers):
            if expected not in (None, E.shape[1]):
                raise EndpointError(f"{endpoint.name} returns {E.shape[1]}-d vectors, expected {expected} "
                                    f"(--dimensions, or the cached vectors: delete {cache_path} if the model changed)")
            # whole records, written by this thread only, and in the OS after flush: kill -9 loses nothing stored
            cache.write(b"".join(encode_record(k, e) for (k, _), e in zip(batch, E)))
            cache.flush()
            vectors.update((k, e) for (k, _), e in zip(batch, E))
            done += len(batch)
            if time.time() - shown > 1.0 or done == len(todo):
                shown, rate = time.time(), done / (time.time() - t0)
                print(f"embedded {done}/{len(todo)}  {rate:.1f} texts/s  ETA {(len(todo) - done) / rate:.0f}s",
                      file=sys.stderr, flush=True)

    E = [vectors[k] for k in keys]
    if len({len(e) for e in E}) != 1:
        raise DataError(f"{cache_path}: vectors of model '{args.model}' differ in dimension; delete the cache")
    E = np.stack(E).astype(np.float32)  # (N, d_l)
    with atomic_open(os.path.join(args.data, "lang_emb.npy")) as f:
        np.save(f, E)
    write_json(os.path.join(args.data, "lang_emb.json"), {
        "model": args.model, "dimension": E.shape[1], "requested_dimensions": args.dimensions,
        "base_url": public_url(args.base_url), "num_items": len(texts),
        "texts_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest()})
    print(f"wrote {os.path.join(args.data, 'lang_emb.npy')} {E.shape[0]} x {E.shape[1]} float32")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="prepared dataset folder holding items.jsonl")
    # endpoint
    parser.add_argument("--base_url", default="http://127.0.0.1:8080/v1", help="OpenAI-compatible API root; {base_url}/embeddings is POSTed (default: serve_embeddings.py)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="embedding model name the server knows (e.g. text-embedding-3-large)")
    parser.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key (Bearer token; none sent if unset)")
    parser.add_argument("--dimensions", type=int, default=None, help="ask for d_l-dimensional vectors (text-embedding-3 and Matryoshka models only)")
    parser.add_argument("--encoding_format", default="base64", choices=["base64", "float"], help="wire format of the vectors (base64 is exact float32 and smaller)")
    # throughput
    parser.add_argument("--batch_size", type=int, default=32, help="texts per request (TEI allows 32 by default, OpenAI 2048)")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight at once")
    # failures
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a response before retrying")
    parser.add_argument("--max_retries", type=int, default=8, help="retries per batch on 429, 5xx, timeouts, dropped connections, malformed responses")
    parser.add_argument("--backoff_base", type=float, default=1.0, help="first retry delay in seconds, doubled each retry, with jitter (tests use small values)")
    parser.add_argument("--backoff_max", type=float, default=60.0, help="longest retry delay in seconds (a server's Retry-After is honoured as given)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 1 or args.max_retries < 0:
        parser.error("--batch_size and --workers must be >= 1, --max_retries >= 0")
    try:
        embed_items(args)
    except (DataError, EndpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: what was embedded is in the cache, rerun to finish")


if __name__ == "__main__":
    main()
