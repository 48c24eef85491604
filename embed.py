"""
Embed the item texts through an OpenAI-compatible endpoint (POST {base_url}/embeddings): OpenAI,
vLLM, Hugging Face TEI, Ollama, llama.cpp, Infinity, or the local serve_embeddings.py (default).

    bash embed_local.sh DATA                    # starts serve_embeddings.py, waits for /health, runs:
    python embed.py DATA --base_url URL         # -> DATA/lang_emb.npy (N, 384)
    python embed.py DATA --base_url https://api.openai.com/v1 --model text-embedding-3-large

Reads  DATA/items.jsonl    N lines {"item_id": str, "text": str}
Writes DATA/lang_emb.npy   float32 (N, d_l): row i embeds line i of items.jsonl (item i+1)
       DATA/lang_emb.json  model, dimension d_l, base_url (no credentials), num_items, texts_sha256
                           (hex sha256 of Python's json.dumps(texts), ASCII-escaped)
       DATA/lang_emb.cache checksummed vectors keyed by (model, dimensions, text), from the first one
                           on: a rerun requests only the batches it lacks (batches are fixed by item
                           order, so its output is byte-identical). Delete it to re-embed from scratch.
The key, read from the environment variable --api_key_env (a Bearer token), and the ?query of
--base_url (sent: Azure's api-version) are never printed or written; user:password@ is refused.
First it GETs {base_url}/models and prints on stdout the server and what it lists: not listing --model
(another server on the port) is an error, no such route a note. Progress (texts/s, ETA) and retries
go to stderr; a summary line to stdout.
"""

import argparse
import base64
import hashlib
import json
import math
import os
import random
import re
import struct
import sys
import threading
import time
import urllib.parse
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import requests

from common import DataError, HelpFormatter, atomic_open, interrupted, read_items, write_json

RETRY_STATUS = {408, 409, 425, 429}  # and every 5xx; any other 4xx is the caller's fault: fail at once
BUSY_STATUS = {429, 503, 504}  # like a timeout, a sign of an overloaded server: send fewer requests at once
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


class Limiter:
    """At most `limit` requests in flight, adapted as TCP adapts to a network (AIMD): a timeout, 429,
    503 or 504 ("busy") halves it, down to 1, so an overloaded server's queue drains instead of timing
    out every request in it; a success adds 1/limit, up to --workers. It starts at 1: the first batch
    goes alone, so a bad key or model costs one request. The retry of a batch that met "busy" goes
    alone (no request of ours before or after it in the server's queue) with twice --timeout, as TCP
    doubles its retransmission timeout: it waits at most for one abandoned encode, then its own."""

    def __init__(self, most):
        self.most, self.limit, self.in_flight, self.alone = most, 1.0, 0, 0
        self.cond, self.stop = threading.Condition(), threading.Event()

    def acquire(self, alone=False):  # -> False once stopped (the counts no longer matter then)
        with self.cond:
            self.alone += alone  # holds the others back from now until it is answered
            self.cond.wait_for(lambda: self.stop.is_set() or (
                self.in_flight == 0 if alone else self.in_flight < int(self.limit) and not self.alone))
            self.in_flight += 1
            return not self.stop.is_set()

    def release(self, outcome=None, alone=False, count=True):  # "stop": a failure for good or Ctrl-C ends every worker
        with self.cond:
            self.in_flight -= count
            self.alone -= alone
            if outcome == "busy":
                self.limit = max(1.0, self.limit / 2)
            elif outcome == "ok":
                self.limit = min(self.most, self.limit + 1 / int(self.limit))
            elif outcome == "stop":
                self.stop.set()
            self.cond.notify_all()


class Endpoint:
    """POST batches of texts to {base_url}/embeddings?{query} with retries; safe to call from many threads."""

    def __init__(self, args, api_key, dim):
        query = urllib.parse.urlsplit(args.base_url).query  # sent (Azure needs ?api-version=), never printed
        self.base, self.query, self.args = public_url(args.base_url), f"?{query}" if query else "", args
        self.name = self.base + "/embeddings"  # printed; self.query is appended when sending
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        values = [part.partition("=")[2] for part in query.split("&")]  # as written and decoded: servers echo
        self.secrets = sorted({api_key, *values, *map(urllib.parse.unquote_plus, values)} - {""}, key=len, reverse=True)
        self.limiter, self.local = Limiter(args.workers), threading.local()
        self.dim = dim  # --dimensions, the cached vectors', or else the first answer's: every answer must match
        self.answered = False  # until the server answers, a refused connection means a wrong URL or no server

    def auth(self, r):  # given to requests explicitly, so that it never sends ~/.netrc's Basic auth instead
        r.headers.update(self.headers)
        return r

    def redact(self, msg):
        for secret in self.secrets:
            msg = msg.replace(secret, "[redacted]")
        return msg

    def failure(self, e):
        """A requests exception -> one line saying why; EndpointError if the connection was refused
        before the server ever answered: nothing listens there, so no retry can help."""
        reason = getattr(e.args[0], "reason", None) if e.args else None  # urllib3's, without "Max retries"
        if isinstance(getattr(reason, "__cause__", None), ConnectionRefusedError) and not self.answered:
            raise EndpointError(f"{self.name}: connection refused; is the server running? "
                                "(start the local one with: python serve_embeddings.py)") from None
        return self.redact(f"{type(e).__name__}: {reason or e}")[:300]

    def check_model(self):
        """GET {base_url}/models (OpenAI: {"data": [{"id"}]}) once and print which server answered and
        what it serves: EndpointError if that is not --model (Ollama's "name:latest" counts as "name").
        No answer, another status or body is a note; the embedding requests, with retries, go on."""
        url, model = self.base + "/models", self.args.model
        try:
            r = requests.get(url + self.query, auth=self.auth, timeout=self.args.timeout)
            self.answered = True
            ids = [str(m["id"]) for m in r.json()["data"]] if r.ok else []
            problem = "" if ids else "no model listed" if r.ok else f"HTTP {r.status_code}: {server_message(r)}"
        except requests.RequestException as e:  # a JSONDecodeError too: self.answered is set by then
            problem = self.failure(e)
        except (ValueError, KeyError, TypeError) as e:
            problem = f"unexpected answer ({type(e).__name__}: {e})"
        if problem:
            return print(self.redact(f"note: {url}: {problem}")[:300] + "; going on, the model unconfirmed")
        shown = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
        if model not in ids and f"{model}:latest" not in ids:
            raise EndpointError(self.redact(f"{url} serves {shown}, not --model {model} (another server "
                                            "at that address, or a misspelt name?)"))
        print(self.redact(f"server {self.base} serves {shown}: --model {model} is among them"))

    def embed(self, texts):
        """texts -> (B, d) float32, retrying 429/5xx/timeouts/dropped connections/malformed bodies;
        None if stopped because another batch failed for good (its error is the one to report)."""
        args = self.args
        payload = {"model": args.model, "input": texts, "encoding_format": args.encoding_format}
        if args.dimensions:  # text-embedding-3 (and Matryoshka models on vLLM) shorten their vectors
            payload["dimensions"] = args.dimensions
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()  # one per thread: keep-alive, no sharing
        alone = False  # the retry of a batch that met a busy server: see Limiter
        for attempt in range(args.max_retries + 1):
            wait, outcome = None, None
            if not self.limiter.acquire(alone):
                return None
            try:
                r = self.local.session.post(self.name + self.query, json=payload, auth=self.auth, timeout=args.timeout * (1 + alone))
                self.answered = True
                if 200 <= r.status_code < 300:
                    E = parse_embeddings(r.json(), len(texts))
                    if self.dim not in (None, E.shape[1]):
                        raise EndpointError(f"{self.name} returns {E.shape[1]}-d vectors, expected {self.dim} (--dimensions, "
                                            "the first answer or the cache: delete lang_emb.cache if the model changed)")
                    self.dim, outcome = E.shape[1], "ok"  # no race: the limit is 1 until the first success
                    return E
                problem, wait = f"HTTP {r.status_code}: {self.redact(server_message(r))}", retry_after(r)
                outcome = "busy" if r.status_code in BUSY_STATUS else None
                if r.status_code not in RETRY_STATUS and r.status_code < 500:
                    raise EndpointError(f"{self.name}: {problem}")
            except requests.RequestException as e:  # timeouts, refused or dropped connections
                outcome = "stop"  # kept if failure() raises: nothing listens there
                problem = self.failure(e)
                outcome = "busy" if isinstance(e, requests.Timeout) else None
            except ValueError as e:  # invalid JSON or a response that fails validation
                problem = self.redact(f"malformed response: {e}")[:300]
            except EndpointError:  # no retry can help: no other worker may send another request either
                outcome = "stop"
                raise
            finally:
                self.limiter.release(outcome, alone)
            alone = outcome == "busy"
            if attempt == args.max_retries:
                self.limiter.release("stop", count=False)  # before the raise: no queued batch may start meanwhile
                raise EndpointError(f"{self.name}: giving up after {attempt + 1} attempts: {problem}")
            if wait is None:  # exponential backoff with jitter, so parallel workers do not retry in step
                wait = min(args.backoff_max, args.backoff_base * 2 ** attempt) * random.uniform(0.5, 1.0)
            print(f"warning: {problem}; retry {attempt + 1}/{args.max_retries} in {wait:.2f}s",
                  file=sys.stderr, flush=True)
            if self.limiter.stop.wait(wait):
                return None


# -----------------------------------------------------------------------------

def embed_items(args, api_key):
    items = read_items(args.data)
    texts = [item["text"] for item in items]
    keys = [cache_key(args.model, args.dimensions, t) for t in texts]
    cache_path = os.path.join(args.data, "lang_emb.cache")
    vectors, valid = load_cache(cache_path, set(keys))
    # Batches are a pure function of item order (the distinct texts, cut every --batch_size), and a
    # batch that lacks any text is requested whole: real models' floats depend on what else is in
    # the batch, so a resumed run gets the same bytes as an uninterrupted one.
    distinct = list(dict(zip(keys, texts)).items())  # identical texts once, in item order
    batches = [distinct[i:i + args.batch_size] for i in range(0, len(distinct), args.batch_size)]
    todo = [b for b in batches if any(k not in vectors for k, _ in b)]
    total = sum(map(len, todo))
    endpoint = Endpoint(args, api_key, args.dimensions or next((len(v) for v in vectors.values()), None))
    plan = (f"{len(texts)} items, {len(distinct)} distinct texts, {len(vectors)} cached; requesting {total} "
            f"in {len(todo)} batches from {endpoint.name} (model {args.model})")

    if todo:
        endpoint.check_model()  # which server answers, before any text is sent
        if os.path.exists(cache_path) and os.path.getsize(cache_path) > valid:
            os.truncate(cache_path, valid)  # cut a torn tail off so that new records follow valid ones
    t0, done, shown, cache = time.time(), 0, 0.0, None
    pool = ThreadPoolExecutor(args.workers)  # the limiter decides how many of them send at once
    futures = {pool.submit(endpoint.embed, [t for _, t in b]): b for b in todo}
    try:
        for future in as_completed(futures):
            batch, E = futures[future], future.result()
            if E is None:
                continue
            new = [(k, e) for (k, _), e in zip(batch, E) if k not in vectors]
            if cache is None:  # created with the first vector: a run that fails before leaves no empty file
                cache = open(cache_path, "ab")
            # whole records, written by this thread only, and in the OS after flush: kill -9 loses nothing stored
            cache.write(b"".join(encode_record(k, e) for k, e in new))
            cache.flush()
            vectors.update(new)
            if not done:  # printed once the server has answered: a run that fails at once prints one line
                print(plan, file=sys.stderr, flush=True)
            done += len(batch)
            if time.time() - shown > 1.0 or done == total:
                shown, rate = time.time(), done / (time.time() - t0)
                print(f"embedded {done}/{total}  {rate:.1f} texts/s  ETA {(total - done) / rate:.0f}s",
                      file=sys.stderr, flush=True)
    finally:
        endpoint.limiter.release("stop")  # on failure or Ctrl-C: workers stop retrying, queued batches are dropped
        pool.shutdown(wait=False, cancel_futures=True)
        if cache is not None:
            cache.close()

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


def check_args(parser, args):
    """Mistakes that no retry can fix stop here, before any request; no message echoes the URL or key."""
    if min(args.batch_size, args.workers, args.max_retries + 1, 1 if args.dimensions is None else args.dimensions) < 1:
        parser.error("--batch_size, --workers and --dimensions must be >= 1, --max_retries >= 0")
    if not (0 < args.timeout < math.inf and 0 <= args.backoff_base < math.inf and 0 <= args.backoff_max < math.inf):
        parser.error("--timeout must be a number of seconds > 0, --backoff_base and --backoff_max >= 0")
    try:
        url = urllib.parse.urlsplit(args.base_url)
        ok = url.scheme in ("http", "https") and url.hostname and (url.port or 0) >= 0  # .port checks the digits
    except ValueError:
        ok = False
    if not ok:
        parser.error("--base_url must be http:// or https:// and a host, e.g. http://127.0.0.1:8080/v1")
    if "@" in url.netloc:  # requests would send it as HTTP Basic auth, and servers echo that back
        parser.error("--base_url must not hold user:password@; put the key in the variable named by --api_key_env")
    key = os.environ.get(args.api_key_env, "").strip()
    if key and not re.fullmatch(r"[!-~]+", key):  # what an HTTP header carries; requests' error would print it
        sys.exit(f"error: environment variable {args.api_key_env}: the API key has a space, control or "
                 "non-ASCII character, so it cannot be sent in an HTTP header (the key is not shown)")
    return key


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("data", help="prepared dataset folder holding items.jsonl")
    # endpoint
    parser.add_argument("--base_url", default="http://127.0.0.1:8080/v1", help="OpenAI-compatible API root, http(s)://host[:port]/path[?query]; {path}/embeddings?{query} is POSTed; the query is sent but never printed (default: serve_embeddings.py)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="embedding model name the server knows (e.g. text-embedding-3-large)")
    parser.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key (Bearer token; none sent if unset)")
    parser.add_argument("--dimensions", type=int, default=None, help="ask for d_l-dimensional vectors (text-embedding-3 and Matryoshka models only)")
    parser.add_argument("--encoding_format", default="base64", choices=["base64", "float"], help="wire format of the vectors (base64 is exact float32 and smaller)")
    # throughput
    parser.add_argument("--batch_size", type=int, default=32, help="texts per request (TEI allows 32 by default, OpenAI 2048)")
    parser.add_argument("--workers", type=int, default=4, help="most requests in flight at once; a timeout, 429, 503 or 504 halves that for a while")
    # failures
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a response (including the time queued in the server) before retrying")
    parser.add_argument("--max_retries", type=int, default=8, help="retries per batch on 429, 5xx, timeouts, dropped connections, malformed responses")
    parser.add_argument("--backoff_base", type=float, default=1.0, help="first retry delay in seconds, doubled each retry, with jitter (tests use small values)")
    parser.add_argument("--backoff_max", type=float, default=60.0, help="longest retry delay in seconds (a server's Retry-After is honoured as given)")
    args = parser.parse_args(argv)
    api_key = check_args(parser, args)
    try:
        embed_items(args, api_key)
    except (DataError, EndpointError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # e.g. a folder named lang_emb.cache, or DATA not writable
        sys.exit(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}")
    except KeyboardInterrupt:
        interrupted("what was embedded is in the cache; rerun the same command to finish")


if __name__ == "__main__":
    main()
