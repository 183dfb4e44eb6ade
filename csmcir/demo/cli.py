"""``csmcir demo``: serve the retrieval demo for an index built by ``csmcir index build``.

    csmcir demo --index runs/index/synth                 # the model the index was built with
    csmcir demo --model checkpoints/synthcir-tiny --index runs/index/synth --port 7861

The page serves on 127.0.0.1 (this machine only) unless --host says otherwise; there is no
public share link. Uploaded references are capped at --max-upload-mb and must decode as images.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from csmcir.demo.engine import DEFAULT_MAX_UPLOAD_MB, RetrievalDemo
from csmcir.device import add_device_argument
from csmcir.errors import ConfigError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="csmcir demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--index", required=True, type=Path, help="folder from csmcir index build")
    parser.add_argument(
        "--model",
        type=Path,
        help="model folder, training run folder (its model/) or hub name; default: the index's own",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: the first free from 7860)")
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"largest reference upload accepted (default {DEFAULT_MAX_UPLOAD_MB:g})",
    )
    add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.port is not None:
        check_port(args.host, args.port)

    demo = RetrievalDemo.load(args.index, args.model, args.device, args.max_upload_mb)
    from csmcir.demo.app import serve

    with serve(demo, args.host, args.port) as app:
        folders = ", ".join(map(str, demo.gallery_folders()))
        print(f"{len(demo.index)} gallery images; the server reads files only under: {folders}")
        print(f"demo running at {app.local_url}  (Ctrl+C or kill stops it and deletes the uploads)")
        app.block_thread()
    return 0


def check_port(host: str, port: int) -> None:
    """Refuse a ``--port`` the page could not serve on, before the model loads: in use, or
    not ours to bind. Without it Gradio fails after loading, telling the user to set
    ``GRADIO_SERVER_PORT``, which a given ``--port`` overrides."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be within 1..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: not an address to serve on ({e.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(
                f"--port {port}: cannot serve on {host}:{port} ({e.strerror}; another server, "
                "perhaps another csmcir demo, may hold it). Pass another --port, or leave --port "
                "out to take the first free port from 7860"
            ) from None
