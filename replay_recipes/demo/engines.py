"""The rollout engine for the demo, up for the duration of a ``with`` block, always shut down.

- ``reference``: the reference engine in prefill/decode mode: a prefill worker, a decode worker
  and the merging router, each its own HTTP server on a free loopback port (in this process,
  on a private event loop); the client talks to the router over SGLang's ``/generate``.
- ``vllm`` with an endpoint: a vLLM server someone else runs; with ``start_vllm``: a vLLM
  OpenAI server started here as a subprocess (its own session, terminated on exit, also on
  failure or Ctrl-C), its log in ``OUT/vllm.log``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from replay_bridge.client import NotHealthyError, free_port, wait_healthy

from .config import EngineConfig

__all__ = ["EngineError", "EngineHandle", "running_engine"]


class EngineError(RuntimeError):
    """The engine could not be started or reached."""


@dataclass(frozen=True)
class EngineHandle:
    """Where the rollout client sends requests, and in which wire format."""

    endpoint: str
    wire: str
    """``sglang`` (``/generate``) or ``vllm`` (``/v1/completions``)."""
    served_model: str | None
    """The OpenAI ``model`` field (vLLM), ``None`` for ``/generate``."""
    description: str
    label: str
    """Short name for titles: what runs, in which precision."""


@contextlib.contextmanager
def running_engine(config: EngineConfig, model_dir: Path, log_dir: Path) -> Iterator[EngineHandle]:
    """Start (or reach) the configured engine serving ``model_dir``; stop what was started."""
    if config.kind == "reference":
        with _reference_pd(model_dir, config.dtype, config.startup_timeout_s) as handle:
            yield handle
    elif config.endpoint:
        url = config.endpoint.rstrip("/")
        name = _served_model(url, timeout_s=10.0)
        yield EngineHandle(url, "vllm", name, f"vLLM at {url} serving {name}", "vLLM")
    else:
        with _vllm_process(config, model_dir, log_dir / "vllm.log") as handle:
            yield handle


@contextlib.contextmanager
def _reference_pd(model_dir: Path, dtype: str, timeout_s: float) -> Iterator[EngineHandle]:
    from reference_engine import in_background, serve_pd

    with in_background(serve_pd(model_dir, dtype=dtype), timeout_s=timeout_s) as pd:
        yield EngineHandle(
            pd.router, "sglang", None,
            f"reference engine ({dtype}) in PD mode: prefill {pd.prefill}, decode {pd.decode}, "
            f"router {pd.router}", f"reference engine, PD ({dtype})")


def _get_json(url: str, timeout_s: float) -> object:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 - loopback/user URL
        return orjson.loads(r.read())


def _served_model(url: str, timeout_s: float) -> str:
    """The first model id an OpenAI-compatible server lists at ``/v1/models``."""
    try:
        body = _get_json(f"{url}/v1/models", timeout_s)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise EngineError(f"cannot reach {url}/v1/models: {e}") from None
    data = body.get("data") if isinstance(body, dict) else None
    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise EngineError(f"{url}/v1/models lists no model: {body!r:.200}")
    return str(data[0]["id"])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def _vllm_process(config: EngineConfig, model_dir: Path, log: Path) -> Iterator[EngineHandle]:
    python = Path(config.vllm_python)
    if not python.exists():
        raise EngineError(f"{python} does not exist: create the vLLM environment first "
                          "(make vllm-env, or bash scripts/vllm_env.sh)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
           "--enforce-eager", "--enable-return-routed-experts", "--dtype", "bfloat16"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
    try:
        try:
            wait_healthy(url, proc, timeout=config.startup_timeout_s, interval=1.0)
        except NotHealthyError as e:
            if e.returncode is not None:
                raise EngineError(f"vLLM exited with code {e.returncode} while starting; "
                                  f"{log}:\n{_tail(log)}") from None
            raise EngineError(f"vLLM not healthy after {config.startup_timeout_s:.0f} s; "
                              f"{log}:\n{_tail(log)}") from None
        name = _served_model(url, timeout_s=10.0)
        yield EngineHandle(url, "vllm", name,
                           f"vLLM (bfloat16, pid {proc.pid}) at {url} serving {model_dir}",
                           "vLLM (bfloat16)")
    finally:
        _stop(proc)


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the process that started it dies, so a
    killed demo (SIGKILL, a test's timeout) leaves no vLLM behind. A no-op elsewhere."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    """Terminate the process group this module started (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
