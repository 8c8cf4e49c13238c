"""Starting real worker and API processes for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.devserver import free_port
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The process environment that makes a child use ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"CONVEYOR_{name.upper()}"] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path
    name: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Spawner:
    """Starts processes and stops every one of them at teardown."""

    def __init__(self, settings: Settings, logdir: Path) -> None:
        self.settings = settings
        self.logdir = logdir
        self.procs: list[Proc] = []

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        log = self.logdir / f"{name}-{len(self.procs)}.log"
        out = log.open("wb")
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        p = Proc(proc, log, name)
        self.procs.append(p)
        return p

    def worker(
        self,
        queues: list[str],
        *,
        concurrency: int = 8,
        name: str | None = None,
        settings: Settings | None = None,
        processes: int = 1,
        **extra_env: str,
    ) -> Proc:
        name = name or f"w{len(self.procs)}-{os.urandom(2).hex()}"
        argv = [
            sys.executable,
            "-m",
            "workers",
            "--queues",
            ",".join(queues),
            "--concurrency",
            str(concurrency),
            "--name",
            name,
        ]
        if processes != 1:
            argv += ["--processes", str(processes)]
        return self._spawn(name, argv, env_for(settings or self.settings, **extra_env))

    def api(
        self, *, settings: Settings | None = None, workers: int = 1, **extra_env: str
    ) -> tuple[Proc, str]:
        port = free_port()
        argv = [sys.executable, "-m", "app.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
        if workers != 1:
            argv += ["--workers", str(workers)]
        proc = self._spawn("api", argv, env_for(settings or self.settings, **extra_env))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30 * workers  # each process starts on its own
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            if not proc.alive():
                break
            time.sleep(0.1)
        raise RuntimeError(f"API did not start:\n{proc.output()}")

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop(timeout=15)
