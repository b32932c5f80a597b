"""`toolkit serve`: an OpenAI-compatible HTTP server with per-request LoRA and hot-swap (llama-server's
adapter routes, plus load/unload from a folder).

    toolkit serve -m base.gguf --lora a.gguf --lora-scaled b.gguf 0.5 [--lora-init-without-apply]
                  [--host 127.0.0.1] [--port 8080] [-np 4] [-c 4096] [--adapter-dir DIR] [--api-key KEY]

The base loads once. Requests share one continuously batched engine (--parallel slots, as llama-server's -np;
--ctx-size tokens per slot), each with its own adapter set (its `lora` field, else the global scales set by
POST /lora-adapters); see server_engine.py for the scheduler.
Layout: server_protocol.py (wire format), server_engine.py (adapters + model thread), server_app.py
(FastAPI routes), server_backend.py (the GGUF model behind it); this file is the command.
"""
from __future__ import annotations

import concurrent.futures
import ipaddress
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

from toolkit.config import arg, parse_config, parse_lora_flags, weights_arg
from toolkit.errors import ToolkitError


@dataclass
class ServeConfig:
    model: str = arg(None, "-m", "--model", help="GGUF base model", required=True)
    lora: list[str] = arg([], "--lora", action="append", metavar="FILE",
                          help="LoRA adapter (GGUF, PEFT dir or GGLA) at scale 1; repeatable")
    lora_scaled: list[list[str]] = arg([], "--lora-scaled", action="append", nargs=2, metavar=("FILE", "SCALE"),
                                       help="LoRA adapter with a scale; repeatable")
    lora_init_without_apply: bool = arg(False, help="load the adapters at scale 0 (apply later with POST "
                                                    "/lora-adapters or a request's 'lora' field)")
    host: str = arg("127.0.0.1", help="address to bind; anything but loopback exposes the model to the network")
    port: int = arg(8080, help="port (0: any free port; the chosen one is printed)")
    adapter_dir: str | None = arg(None, help="folder that POST /lora-adapters/load may load adapters from, by "
                                             "file name (off when not given)")
    api_key: str | None = arg(None, help="require 'Authorization: Bearer KEY' on every endpoint (or set "
                                         "TOOLKIT_API_KEY)")
    parallel: int = arg(4, "-np", "--parallel", help="requests decoded together (batch slots); more wait in the "
                                                     "queue")
    ctx_size: int = arg(4096, "-c", "--ctx-size", help="context size per slot (prompt + generation), at most the "
                                                        "model's; 0: the model's. Unlike llama-server's -c, not "
                                                        "divided among the slots")
    threads: int = arg(0, "-t", "--threads", help="CPU threads (0: torch's default)")
    device: str = arg("auto", help="auto|cpu|cuda|mps")
    dtype: str | None = arg(None, help="compute dtype (float32, float16, bfloat16); default per device")
    weights: str = weights_arg()
    compile: bool = arg(True, "--compile", help="compile the batched decode step with torch.compile at startup "
                                               "(minutes on a small CPU the first time, faster once inductor's "
                                               "disk cache is warm; after loading or unloading adapters, the "
                                               "first requests with adapters compile once more for a set of "
                                               "adapters not seen before); --no-compile starts at once with "
                                               "eager steps")
    alias: str | None = arg(None, help="model id reported by /v1/models and in responses (default: file name)")
    max_queue: int = arg(64, help="requests that may wait for a free slot; more get HTTP 503 at once")
    cache_prompt: bool = arg(True, help="a finished request's slot keeps its cache, and a prompt that starts with "
                                        "those tokens (same adapters) prefills only the rest, as llama-server's "
                                        "cache_prompt (a request may set \"cache_prompt\": false)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(cfg: ServeConfig, backend: Any = None) -> tuple[Any, Any]:
    """The ASGI app and its started Engine for `cfg` (Python users can mount the app themselves).

    The model is loaded, its adapters read and its steps warmed up on the thread that then runs the engine's loop:
    OpenMP (torch's CPU threads) keeps a pool of workers per thread that starts parallel work, and once two pools
    exist on a machine with no spare cores its workers stop spinning between parallel regions, so a model thread
    whose pool was not the first ran its steps ~1.5x slower (README, issue 18)."""
    from .server_app import create_app
    from .server_engine import Engine

    if cfg.parallel < 1:
        raise ToolkitError(f"--parallel must be >= 1 (got {cfg.parallel})")
    if cfg.max_queue < 0:
        raise ToolkitError(f"--max-queue must be >= 0 (got {cfg.max_queue})")
    if cfg.adapter_dir is not None and not os.path.isdir(cfg.adapter_dir):
        raise ToolkitError("--adapter-dir is not a folder", cfg.adapter_dir)
    ready: concurrent.futures.Future = concurrent.futures.Future()

    def model_thread() -> None:
        try:
            engine = _engine(cfg, backend)
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            ready.set_exception(e)
            return
        engine.run(on_start=ready.set_result)

    threading.Thread(target=model_thread, name=Engine.THREAD_NAME, daemon=True).start()
    engine = ready.result()
    api_key = cfg.api_key or os.environ.get("TOOLKIT_API_KEY") or None
    return create_app(engine, api_key=api_key, adapter_dir=cfg.adapter_dir), engine


def _engine(cfg: ServeConfig, backend: Any) -> Any:
    """The backend (loaded unless given), the startup adapters and the warmed-up Engine, made on this thread."""
    from .server_engine import AdapterRegistry, Engine

    if backend is None:
        from .server_backend import ModelBackend

        backend = ModelBackend.load(cfg.model, device=cfg.device, dtype=cfg.dtype, weights=cfg.weights,
                                    ctx_size=cfg.ctx_size, threads=cfg.threads, alias=cfg.alias,
                                    compile=cfg.compile, cache_prompt=cfg.cache_prompt)
    registry = AdapterRegistry()
    for path, scale in parse_lora_flags(cfg.lora, cfg.lora_scaled):
        i, name = registry.reserve()
        backend.load_adapter(path, name)  # a bad file: ToolkitError naming it, before we listen
        registry.add(i, name, os.path.abspath(path), 0.0 if cfg.lora_init_without_apply else scale)
    engine = Engine(backend, registry, n_slots=cfg.parallel, max_queue=cfg.max_queue)
    if cfg.compile:
        print("toolkit serve: compiling the batched decode step (--no-compile skips it)", file=sys.stderr, flush=True)
        engine.warmup()
    return engine


def bind(host: str, port: int) -> socket.socket:
    """Bind before serving so `--port 0` works and the real port can be printed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ToolkitError(f"cannot resolve --host ({e})", host) from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ToolkitError(f"cannot listen on port {port} ({e.strerror})", host) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServeConfig) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ToolkitError("toolkit serve needs FastAPI and uvicorn: pip install 'toolkit[serve]'") from None
    sock = bind(cfg.host, cfg.port)
    if not is_loopback(cfg.host) and not (cfg.api_key or os.environ.get("TOOLKIT_API_KEY")):
        print(f"toolkit serve: warning: listening on {cfg.host} without --api-key: anyone who can reach it "
              "can use the model", file=sys.stderr)
    try:
        app, engine = build(cfg)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"toolkit serve: {engine.backend.model_id} ({engine.n_slots} slots of n_ctx {engine.backend.n_ctx}, "
          f"{len(engine.registry.infos())} adapters) listening on http://{shown}:{port}", file=sys.stderr,
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ServeConfig, argv, prog="toolkit serve",
                       description="OpenAI-compatible server with per-request LoRA and hot-swap")
    return serve(cfg)
