"""Test helper: run ``tests/rtsp_server.py`` (a GStreamer RTSP server) in a subprocess.

The server needs the system Python's GObject bindings and GStreamer plugins. When
they are missing the helper *fails* the test with the Debian packages to install:
CI installs them, so a silent skip would hide a broken setup.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
SYSTEM_PYTHON = "/usr/bin/python3"
PACKAGES = (
    "gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-base "
    "gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly gstreamer1.0-tools"
)
_HINT = f"RTSP tests need GStreamer's RTSP server: apt-get install -y {PACKAGES}"


class RtspServer:
    """One server process; ``start()`` again after ``stop()`` reuses the same port."""

    def __init__(
        self, name: str = "cam", python: str = SYSTEM_PYTHON, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.name = name
        self.python = python
        self.extra_args = extra_args
        self.port = 0  # 0 until the first start picks a free port
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+")

    def start(self, timeout: float = 10.0) -> str:
        """Start the server and wait for its ready line; returns the stream URL."""
        if not os.path.exists(self.python):
            pytest.fail(f"{self.python} not found. {_HINT}")
        cmd = [self.python, str(SERVER_SCRIPT), "--port", str(self.port), "--name", self.name,
               *self.extra_args]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        line = self._ready_line(timeout)
        if line.startswith("MISSING"):
            self.stop()
            pytest.fail(f"{line}\n{_HINT}")
        if not line.startswith("READY "):
            self.stop()
            pytest.fail(f"RTSP server did not start: {line or 'no output'}\n{self._errors()}")
        self.url = line.split()[1]
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])
        return self.url

    def _ready_line(self, timeout: float) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.1)
            if ready:
                return self._proc.stdout.readline().strip()
            if self._proc.poll() is not None:
                return ""
        return f"(no ready line within {timeout}s)"

    def _errors(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-2000:]

    def stop(self) -> None:
        """Kill the server abruptly, as a crash or a pulled cable would."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.wait(timeout=10)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None

    def freeze(self) -> None:
        """Stop the server in its tracks (SIGSTOP), as a frozen camera: connected, silent."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def close(self) -> None:
        self.stop()
        self._stderr.close()


@pytest.fixture
def rtsp_server() -> Iterator[RtspServer]:
    """A started RTSP server serving a live 160x120 30 fps test pattern."""
    server = RtspServer()
    server.start()
    try:
        yield server
    finally:
        server.close()
