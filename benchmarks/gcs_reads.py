"""Images/s of one data worker reading loose files or record shards, locally or from a Cloud
Storage server.

Writes the synthetic dataset at COCO-like sizes (480-640 px JPEG/PNG), uploads it to
fake-gcs-server on 127.0.0.1 (the test suite's server, ``tests/gcs_server.py``), and times
``measure_pipeline`` (decode + every augmentation, a batch at a time as the DataLoader asks) on
both, in alternating pairs. ``--latency-ms`` puts a proxy in front of the server that holds every
request for that long before passing it on, so that the server answers as slowly as a real
bucket does (Cloud Storage's time to first byte is tens of milliseconds). Usage:

    python benchmarks/gcs_reads.py --pairs 3 [--latency-ms 20] [--threads 16] [--json out.json]
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retinanet_xla import storage  # noqa: E402
from retinanet_xla.data.records import write_records  # noqa: E402
from retinanet_xla.data.synthetic import write_synthetic_dataset  # noqa: E402
from retinanet_xla.data.throughput import measure_pipeline  # noqa: E402
from tests.gcs_server import GcsServer  # noqa: E402


class DelayingProxy:
    """A TCP proxy on 127.0.0.1 that forwards each chunk a client sends after ``seconds``: every
    HTTP request then takes that much longer, as over a long network path."""

    def __init__(self, upstream: str, seconds: float):
        host, port = upstream.split("//", 1)[1].rsplit(":", 1)
        self.upstream, self.seconds = (host, int(port)), seconds
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        ready.set()
        self.loop.run_forever()

    async def _connection(self, reader, writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)

        async def pipe(source, target, delay: float) -> None:
            try:
                while data := await source.read(65536):
                    if delay:
                        await asyncio.sleep(delay)
                    target.write(data)
                    await target.drain()
            finally:
                target.close()

        await asyncio.gather(
            pipe(reader, upstream_writer, self.seconds), pipe(upstream_reader, writer, 0.0), return_exceptions=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--images", type=int, default=96, help="samples timed per measurement")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=storage.FETCH_THREADS, help="concurrent fetches per worker")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    storage.FETCH_THREADS = args.threads

    server = GcsServer().start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch)
            paths = write_synthetic_dataset(local, num_train=64, num_val=1, min_size=480, max_size=640)["train"]
            bucket = server.make_bucket("bench")
            server.upload_tree(local, f"{bucket}/data")
            remote = (f"{bucket}/data/annotations/instances_train.json", f"{bucket}/data/train")
            write_records(paths["annotations"], paths["images"], local / "records" / "train", shards=4)
            write_records(paths["annotations"], paths["images"], f"{bucket}/records/train", shards=4)
            sources = {
                "local": (str(paths["annotations"]), str(paths["images"]), None),
                "gcs": (*remote, None),
                "records_local": (None, None, str(local / "records" / "train")),
                "records_gcs": (None, None, f"{bucket}/records/train"),
            }
            if args.latency_ms:  # gcsfs reads the variable when it makes a client
                os.environ["STORAGE_EMULATOR_HOST"] = DelayingProxy(
                    os.environ["STORAGE_EMULATOR_HOST"], args.latency_ms / 1000
                ).url
            rates = {name: [] for name in sources}
            for _ in range(args.pairs):
                for name, (annotations, images, records) in sources.items():
                    result = measure_pipeline((640, 640), args.images, annotations, images, records=records)
                    rates[name].append(result.images_per_second)
    finally:
        server.stop()
    report = {
        "latency_ms": args.latency_ms,
        "fetch_threads": args.threads,
        **{name: {"median": statistics.median(values), "runs": [round(v, 1) for v in values]} for name, values in rates.items()},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
