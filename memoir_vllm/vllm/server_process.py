"""`memoir serve` as a child process on 127.0.0.1: started, waited for, stopped (scripts and tests).

    with ServerProcess(snapshot, ["--max-model-len", "512"]) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
        client.chat.completions.create(model=srv.model, messages=[...], temperature=0)
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m memoir_vllm.cli serve --snapshot S --port P ...` with its output in `log_path`.

    The served model name is `model` ("memoir"); the context manager waits until /health answers (at most
    `start_timeout` s, failing with the server's last output) and terminates the server on exit.
    """

    def __init__(self, snapshot: str | Path, vllm_args: list[str] | None = None, log_path: str | Path | None = None,
                 model: str = "memoir", start_timeout: float = 300.0, env: dict[str, str] | None = None):
        self.port = free_port()
        self.model = model
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else Path(os.environ.get("TMPDIR", "/tmp")) / f"memoir_serve_{self.port}.log"
        self.cmd = [sys.executable, "-m", "memoir_vllm.cli", "serve", "--snapshot", str(snapshot),
                    "--port", str(self.port), "--served-model-name", model, *(vllm_args or [])]
        self.env = env
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.time() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"memoir serve exited with {self.proc.returncode}:\n{self.tail()}")
            if time.time() > deadline:
                self.stop()
                raise TimeoutError(f"memoir serve did not answer /health in {self.start_timeout:.0f} s:\n{self.tail()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return self
            except OSError:
                time.sleep(1)

    def tail(self, chars: int = 4000) -> str:
        """The end of the server's output."""
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
