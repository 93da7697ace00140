"""memoir's HTTP routes on vLLM's OpenAI server (`--middleware memoir_vllm.vllm.http.memoir_routes`; `memoir serve`
adds it). They run in the API server process and reach the workers, which hold the memory, through the
engine's collective_rpc (MemoirWorkerExtension):

    GET  /memoir/info     the served version, edit counts, tau, routing counters, reloads (per worker)
    POST /memoir/reload   {"snapshot": PATH} loads that store or version now; {} re-reads the followed store
    GET  /metrics         vLLM's Prometheus text plus memoir_* counters and gauges (summed over workers)
    POST /v1/completions, /v1/chat/completions: memoir's fields in `vllm_xargs` are checked first; a malformed
                          one gets a 400 naming it (vLLM's engine would read it leniently)

The /memoir routes require the server's API key (`--api-key` or VLLM_API_KEY, sent as `Authorization: Bearer`)
and answer 404 on a server started without one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger(__name__)

COUNTERS = ("decided", "routed", "no_candidate", "reused", "opted_out", "reloads", "load_failures")  # per worker, since start
GAUGES = ("n_edits", "n_active", "live_requests", "version")


GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
XARGS = {"memoir": "true or false (false: this request gets the base model)"}  # what clients may set


def xargs_problem(body: bytes) -> str | None:
    """What is wrong with the memoir fields of a request body's `vllm_xargs`, or None (a body that is no JSON
    object is left to vLLM, which answers it)."""
    try:
        spec = json.loads(body)
    except ValueError:
        return None
    xargs = spec.get("vllm_xargs") if isinstance(spec, dict) else None
    if not isinstance(xargs, dict):
        return None
    for key, value in xargs.items():
        if not isinstance(key, str) or not key.startswith("memoir"):
            continue
        if key not in XARGS:
            return (f"vllm_xargs.{key} is not a memoir field: the only one is vllm_xargs.memoir "
                    f"({XARGS['memoir']})")
        if not isinstance(value, bool) and not (isinstance(value, str) and value.lower() in ("true", "false")):
            return f"vllm_xargs.{key} must be {XARGS[key]}, got {json.dumps(value)[:60]}"
    return None


def _keys(request: Request) -> list[str]:
    args = getattr(request.app.state, "args", None)
    keys = list(getattr(args, "api_key", None) or [])
    return [k for k in keys or [os.environ.get("VLLM_API_KEY", "")] if k]


def _authorised(request: Request, keys: list[str]) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    digest = hashlib.sha256(token.encode()).digest()
    return scheme.lower() == "bearer" and any(
        secrets.compare_digest(digest, hashlib.sha256(k.encode()).digest()) for k in keys)


async def _rpc(request: Request, method: str, *args) -> list:
    return await request.app.state.engine_client.collective_rpc(method, args=args)


async def memoir_routes(request: Request, call_next):
    """ASGI http middleware: the /memoir routes and memoir's lines on /metrics; everything else passes."""
    path = request.url.path
    if path == "/metrics" and request.method == "GET":
        return await _metrics(request, await call_next(request))
    if request.method == "POST" and path in GENERATION_ROUTES:
        problem = xargs_problem(await request.body())
        if problem:
            return JSONResponse({"error": {"message": problem, "type": "BadRequestError", "code": 400}},
                                status_code=400)
        return await call_next(request)
    if not path.startswith("/memoir/"):
        return await call_next(request)
    keys = _keys(request)
    if not keys:
        return JSONResponse({"error": "memoir's routes are off: start the server with --api-key KEY (or VLLM_API_KEY) "
                                      "and send it as 'Authorization: Bearer KEY'"}, status_code=404)
    if not _authorised(request, keys):
        return JSONResponse({"error": "Unauthorized: send the server's API key as 'Authorization: Bearer KEY'"},
                            status_code=401)
    try:
        if path == "/memoir/info" and request.method == "GET":
            return JSONResponse({"workers": await _rpc(request, "memoir_info")})
        if path == "/memoir/reload" and request.method == "POST":
            return await _reload(request)
    except Exception as e:  # the workers' refusal (a missing or foreign snapshot) is the client's error
        return JSONResponse({"error": str(e)}, status_code=400)
    return JSONResponse({"error": f"no memoir route {request.method} {path}: GET /memoir/info, POST /memoir/reload"},
                        status_code=404)


async def _reload(request: Request) -> Response:
    from ..snapshot import SnapshotError, resolve_version

    body = await request.body()
    try:
        spec = json.loads(body) if body.strip() else {}
        if not isinstance(spec, dict):
            raise ValueError
    except ValueError:
        return JSONResponse({"error": 'the body must be a JSON object: {"snapshot": "/path/to/store"} or {}'},
                            status_code=400)
    target = spec.get("snapshot")
    if target is not None:
        try:
            if not isinstance(target, str):
                raise SnapshotError("not a path")
            resolve_version(target)
        except SnapshotError:
            return JSONResponse({"error": f"snapshot {target!r} is not a memoir store or version directory on the "
                                          "server's filesystem"}, status_code=400)
    info = await _rpc(request, "memoir_reload", target)
    # KV cached under the previous memory must not be reused (blocks are salted with the configured store's
    # versions, which do not name another store's)
    await request.app.state.engine_client.reset_prefix_cache()
    log.info("memoir: reload of %s requested over HTTP: %s", target or "the followed store", info[0].get("snapshot"))
    return JSONResponse({"workers": info})


async def _metrics(request: Request, response: Response) -> Response:
    """vLLM's /metrics body with memoir's lines appended (the counters live in the workers: one RPC per scrape)."""
    body = b"".join([chunk async for chunk in response.body_iterator])
    try:
        infos = await _rpc(request, "memoir_info")
    except Exception as e:  # no memory attached (or switched off): vLLM's metrics alone
        log.debug("memoir metrics unavailable: %s", e)
        infos = []
    lines = []
    for name in COUNTERS + GAUGES:
        values = [float(i.get(name, 0) or 0) for i in infos]
        if not values:
            continue
        kind = "counter" if name in COUNTERS else "gauge"
        metric = f"memoir_{name}" + ("_total" if kind == "counter" else "")
        lines += [f"# TYPE {metric} {kind}", f"{metric} {sum(values) if kind == 'counter' else max(values):g}"]
    text = body + ("\n".join(lines) + "\n").encode() if lines else body
    headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
    return Response(text, status_code=response.status_code, headers=headers)
