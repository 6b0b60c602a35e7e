"""`minivllm serve` as a child process on a free loopback port, for the tests and benchmarks.serving."""

import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts `python -m minivllm serve MODEL FLAGS` (or `python SCRIPT serve ...` with code as the script) and
    waits until /health answers; kill() in a finally or a fixture finalizer. The engine-core process, spawned,
    imports the script too (as multiprocessing does a main script): what code changes at its top level reaches the
    engine, and it runs the server under `if __name__ == "__main__":`."""

    def __init__(self, model: str, *flags: str, code: str | None = None, env: dict | None = None,
                 timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        launcher = ["-m", "minivllm", "serve"]
        if code:
            self.script = tempfile.NamedTemporaryFile("w", suffix=".py")  # removed with this object
            self.script.write(code)
            self.script.flush()
            launcher = [self.script.name, "serve"]
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a pipe nobody reads would block the server when full
        self.proc = subprocess.Popen([sys.executable, *launcher, model, "--port", str(self.port), *flags],
                                     env={**os.environ, **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.log.read()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"the server did not become healthy within {timeout:.0f} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
