"""Images/s of one data worker reading from local files vs from a Cloud Storage server.

Writes the synthetic dataset at COCO-like sizes (480-640 px JPEG/PNG), uploads it to
fake-gcs-server on 127.0.0.1 (the test suite's server, ``tests/gcs_server.py``), and times
``measure_pipeline`` (decode + every augmentation, a batch at a time as the DataLoader asks) on
both, in alternating pairs. ``--latency-ms`` adds a delay to every packet on the loopback
interface (``tc qdisc ... netem``, needs root) so that the server answers as slowly as a real
bucket does; it is removed at the end. Usage:

    python benchmarks/gcs_reads.py --pairs 3 [--latency-ms 20] [--threads 16] [--json out.json]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from retinanet_xla import storage  # noqa: E402
from retinanet_xla.data.synthetic import write_synthetic_dataset  # noqa: E402
from retinanet_xla.data.throughput import measure_pipeline  # noqa: E402
from tests.gcs_server import GcsServer  # noqa: E402


def loopback_delay(milliseconds: float) -> None:
    command = ["tc", "qdisc", "replace", "dev", "lo", "root", "netem", "delay", f"{milliseconds}ms"]
    subprocess.run(command if milliseconds else ["tc", "qdisc", "del", "dev", "lo", "root"], check=False)


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
            sources = {"local": (str(paths["annotations"]), str(paths["images"])), "gcs": remote}
            if args.latency_ms:
                loopback_delay(args.latency_ms)
            rates = {name: [] for name in sources}
            try:
                for _ in range(args.pairs):
                    for name, (annotations, images) in sources.items():
                        result = measure_pipeline((640, 640), args.images, annotations, images)
                        rates[name].append(result.images_per_second)
            finally:
                if args.latency_ms:
                    loopback_delay(0)
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
