"""`titans-serve --export=DIR`: serve an exported cascade over HTTP on Ray Serve (see titans/serve/__init__.py).

titans-serve --export=exports/fmnist_cascade --port=8000          # binds 127.0.0.1
curl -s -X POST http://127.0.0.1:8000/ -H 'Content-Type: application/json' -d @request.json
# a text export takes {"texts": ["...", ...]}

Exit codes: 0 after a stop by SIGINT/SIGTERM while serving; 1 when the application cannot start (the
reason, e.g. the replica's error naming a broken export file, is on stderr); 2 for a bad flag; 128+N
for signal N during the start. Every path shuts Ray down and removes its processes and temp dir.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import sys
import threading

from ray import serve

from titans import cli as cli_lib
from titans import host, logs
from titans.serve import MAX_BODY_BYTES, MAX_IMAGES, MAX_TEXT_CHARS, TEACHER_TIMEOUT_S, build_app
from titans.teachers import service

APP = "titans"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StartError(RuntimeError):
    """The application did not start; the message says why (each failed deployment's own error)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwinds whatever the main thread is doing, so that the cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, _frame):
    for sig in SIGNALS:  # the cleanup that follows is not interrupted by a second signal
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def why_not_running(app: str) -> str:
    """Each unhealthy deployment of `app` with its message (for a constructor that raised: its traceback,
    whose last line is the exception, e.g. the export loader's error naming the file)."""
    status = serve.status().applications.get(app)
    if status is None:
        return f"application {app} does not exist"
    lines = [f"{name} ({d.status}): {d.message.strip()}" for name, d in status.deployments.items() if d.message]
    return "\n".join(lines) or status.message


def start(
    export_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_images: int = MAX_IMAGES,
    teacher_max_replicas: int = 2,
    num_cpus: int = 2,
    max_body_bytes: int = MAX_BODY_BYTES,
    teacher_timeout_s: float = TEACHER_TIMEOUT_S,
    max_text_chars: int = MAX_TEXT_CHARS,
):
    """Starts a local (loopback-only) Ray, Serve's proxy on host:port, and the cascade application. If the
    start fails or is interrupted, Ray is shut down again (stop()) before the error propagates; a
    deployment that cannot start raises StartError with its replicas' error."""
    app = build_app(
        export_dir,
        max_images=max_images,
        teacher_max_replicas=teacher_max_replicas,
        max_body_bytes=max_body_bytes,
        teacher_timeout_s=teacher_timeout_s,
        max_text_chars=max_text_chars,
    )
    try:
        service.connect("", num_cpus=num_cpus)
        if signal.getsignal(signal.SIGINT) is _interrupt:  # main()'s handlers: ray.init replaced SIGTERM's
            signal.signal(signal.SIGTERM, _interrupt)
        serve.start(http_options={"host": host, "port": int(port)})
        try:
            return serve.run(app, name=APP, route_prefix="/")
        except RuntimeError as e:
            raise StartError(f"serving {export_dir} failed to start:\n{why_not_running(APP)}") from e
    except BaseException:
        stop()
        raise


def stop() -> None:
    """Serve (draining, at most 30 s), then the local Ray cluster, its processes and its temp dir."""
    try:
        serve.shutdown()
    except Exception as e:  # a half-started Serve: the cluster is torn down below all the same
        logging.warning("serve.shutdown failed (%s: %s); shutting Ray down", type(e).__name__, e)
    finally:
        service.shutdown_local()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv=None) -> argparse.Namespace:
    p = cli_lib.parser("titans-serve", __doc__)
    p.add_argument("--export", required=True, help="an export directory written by titans-export")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default: loopback only)")
    p.add_argument("--public", action="store_true", help="allow a --host other than loopback (no authentication!)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_images", type=int, default=MAX_IMAGES, help="images (or texts) per request at most")
    p.add_argument(
        "--max_text_chars", type=int, default=MAX_TEXT_CHARS, help="characters per text at most (text exports)"
    )
    p.add_argument("--max_body_bytes", type=int, default=MAX_BODY_BYTES, help="bytes per request body at most")
    p.add_argument(
        "--teacher_timeout_s",
        type=float,
        default=TEACHER_TIMEOUT_S,
        help="seconds a request waits for the teacher before a 503 with Retry-After",
    )
    p.add_argument("--teacher_max_replicas", type=int, default=2)
    p.add_argument("--num_cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not is_loopback(a.host) and not a.public:
        p.error(f"--host={a.host} would serve beyond this machine, without authentication; add --public to mean it")
    for flag in (
        "max_images",
        "max_body_bytes",
        "max_text_chars",
        "teacher_timeout_s",
        "teacher_max_replicas",
        "num_cpus",
    ):
        if not getattr(a, flag) > 0:
            p.error(f"--{flag} must be positive; got {getattr(a, flag)}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    logs.setup_cli_logging()
    for sig in SIGNALS:  # before the start: a signal during it unwinds into stop() too
        signal.signal(sig, _interrupt)
    serving = False
    try:
        start(
            a.export,
            host=a.host,
            port=a.port,
            max_images=a.max_images,
            teacher_max_replicas=a.teacher_max_replicas,
            num_cpus=a.num_cpus,
            max_body_bytes=a.max_body_bytes,
            teacher_timeout_s=a.teacher_timeout_s,
            max_text_chars=a.max_text_chars,
        )
        serving = True
        print(f"serving {a.export} on http://{a.host}:{a.port}/ (Ctrl-C or SIGTERM to stop)", flush=True)
        while True:
            threading.Event().wait(timeout=0.5)  # a timed wait: signals are handled between waits
    except Interrupted as e:
        if serving:
            stop()
            return 0
        return 128 + e.signum  # start() has stopped Ray already
    except SystemExit:
        if serving:
            stop()
            raise
        # SIGTERM inside ray.init, whose own handler (sys.exit) holds SIGTERM until start() takes it back
        return 128 + signal.SIGTERM  # start() has stopped Ray already
    except StartError as e:
        print(f"titans-serve: {e}", file=sys.stderr, flush=True)
        return 1
    except BaseException:
        if serving:
            stop()
        raise


def cli():
    host.apply()
    cli_lib.run(main)


if __name__ == "__main__":
    cli()
