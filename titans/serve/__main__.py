"""`titans-serve --export=DIR`: serve an exported cascade over HTTP on Ray Serve (see titans/serve/__init__.py).

titans-serve --export=exports/fmnist_cascade --port=8000          # binds 127.0.0.1
curl -s -X POST http://127.0.0.1:8000/ -H 'Content-Type: application/json' -d @request.json
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ray import serve

from titans import logs
from titans.serve import MAX_IMAGES, build_app
from titans.teachers import service


def start(
    export_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_images: int = MAX_IMAGES,
    teacher_max_replicas: int = 2,
    num_cpus: int = 2,
):
    """Starts a local (loopback-only) Ray, Serve's proxy on host:port, and the cascade application."""
    service.connect("", num_cpus=num_cpus)
    serve.start(http_options={"host": host, "port": int(port)})
    return serve.run(
        build_app(export_dir, max_images=max_images, teacher_max_replicas=teacher_max_replicas),
        name="titans",
        route_prefix="/",
    )


def stop() -> None:
    serve.shutdown()
    service.shutdown_local()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="titans-serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--export", required=True, help="an export directory written by titans-export")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_images", type=int, default=MAX_IMAGES, help="images per request at most")
    p.add_argument("--teacher_max_replicas", type=int, default=2)
    p.add_argument("--num_cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    logs.setup_cli_logging()
    start(
        a.export,
        host=a.host,
        port=a.port,
        max_images=a.max_images,
        teacher_max_replicas=a.teacher_max_replicas,
        num_cpus=a.num_cpus,
    )
    print(f"serving {a.export} on http://{a.host}:{a.port}/ (Ctrl-C or SIGTERM to stop)", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(timeout=0.5):  # a timed wait: signals are handled between waits
        pass
    stop()
    return 0


def cli():
    logs.run_cli(main)


if __name__ == "__main__":
    cli()
