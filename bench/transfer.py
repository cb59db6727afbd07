"""How fast the transfer layer moves a large payload over mutual TLS on loopback, against the limit.

    python bench/transfer.py [--mb 100] [--repeat 3]

Provisions a throw-away project, starts a gRPC server process with the server kit's credentials and
moves the payload up (client → server, as a site update) and down (server → client, as a global
model) with fedgrid's chunked streams (header, 1 MB chunks, trailer), once with the size checked only
(how plaintext models and updates travel) and once with the SHA-256 digest computed and checked too
(job packages, downloads, ciphertexts). The limit is a plain TCP socket copy of the same bytes between
two processes on this machine (no TLS, no framing, no digest). Prints MB/s for each and the ratio to
the limit; the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def serve(kit_dir: str, port: int, mb: int) -> None:
    """The server side (run in its own process)."""
    from fedgrid import transfer, wire
    from fedgrid.kit import load_kit
    from fedgrid.tls import server_credentials
    from fedgrid.v1 import admin_pb2, common_pb2

    kit = load_kit(Path(kit_dir))
    payload = os.urandom(mb << 20)

    def up(
        frames: Iterator[admin_pb2.UploadFrame], context: grpc.ServicerContext, digest: bool = True
    ) -> common_pb2.Ack:
        sink = transfer.Chunks()
        verify = None if digest else lambda header: False
        assembler = transfer.Assembler(sink, max_size=(mb + 1) << 20, what="upload", verify=verify)
        for frame in frames:
            assembler.feed(frame)
        assembler.finish()  # size (and SHA-256, if asked for) checked against the trailer
        return common_pb2.Ack(message=str(sink.tell()))

    def down(
        request: admin_pb2.JobRequest, context: grpc.ServicerContext, digest: bool = True
    ) -> Iterator[admin_pb2.DownloadFrame]:
        header = admin_pb2.DownloadHeader(size=len(payload))
        yield from transfer.frames(admin_pb2.DownloadFrame, header, transfer.split(payload), digest=digest)

    def raw_up(chunks: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return str(sum(len(c) for c in chunks)).encode()

    def raw_down(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        view = memoryview(payload)
        for start in range(0, len(payload), transfer.CHUNK_SIZE):
            yield bytes(view[start : start + transfer.CHUNK_SIZE])

    same = lambda data: data  # noqa: E731 - raw bytes in and out: gRPC and TLS alone
    handlers = {
        "RawUp": grpc.stream_unary_rpc_method_handler(raw_up, request_deserializer=same, response_serializer=same),
        "RawDown": grpc.unary_stream_rpc_method_handler(raw_down, request_deserializer=same, response_serializer=same),
        "Up": grpc.stream_unary_rpc_method_handler(
            up,
            request_deserializer=wire.frame_parser(admin_pb2.UploadFrame),
            response_serializer=common_pb2.Ack.SerializeToString,
        ),
        "Down": grpc.unary_stream_rpc_method_handler(
            down, request_deserializer=admin_pb2.JobRequest.FromString, response_serializer=wire.serialize
        ),
        "UpNoDigest": grpc.stream_unary_rpc_method_handler(
            functools.partial(up, digest=False),
            request_deserializer=wire.frame_parser(admin_pb2.UploadFrame),
            response_serializer=common_pb2.Ack.SerializeToString,
        ),
        "DownNoDigest": grpc.unary_stream_rpc_method_handler(
            functools.partial(down, digest=False),
            request_deserializer=admin_pb2.JobRequest.FromString,
            response_serializer=wire.serialize,
        ),
    }
    server = grpc.server(futures.ThreadPoolExecutor(4), options=transfer.GRPC_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Transfer", handlers),))
    server.add_secure_port(f"127.0.0.1:{port}", server_credentials(kit))
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def sink_socket(port_file: str, size: int) -> None:
    """The receiving end of the plain TCP copy (run in its own process)."""
    listener = socket.create_server(("127.0.0.1", 0))
    Path(port_file).write_text(str(listener.getsockname()[1]))
    conn, _ = listener.accept()
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = conn.recv_into(view[got:], min(size - got, 4 << 20))
        if not n:
            break
        got += n
    conn.sendall(b"k")
    conn.close()


def plain_copy(payload: bytes) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen([sys.executable, __file__, "--sink", str(port_file), "--size", str(len(payload))])
        try:
            while not port_file.exists() or not port_file.read_text():
                time.sleep(0.01)
            with socket.create_connection(("127.0.0.1", int(port_file.read_text()))) as conn:
                start = time.perf_counter()
                conn.sendall(payload)
                conn.recv(1)
                return time.perf_counter() - start
        finally:
            proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("KIT", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--sink", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.mb)
        return 0
    if args.sink:
        sink_socket(args.sink, args.size)
        return 0

    from conftest import provision_project

    from fedgrid import transfer, wire
    from fedgrid.kit import load_kit
    from fedgrid.tls import secure_channel
    from fedgrid.v1 import admin_pb2, common_pb2

    size = args.mb << 20
    payload = os.urandom(size)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        project = provision_project(Path(tmp), n_sites=1)
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(project.server), str(project.admin_port), "--mb", str(args.mb)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            kit = load_kit(project.admin_roles["project_admin"])
            with secure_channel(kit, project.admin_port) as channel:
                def uploader(method: str, digest: bool) -> Callable[[], None]:
                    call = channel.stream_unary(
                        f"/bench.Transfer/{method}",
                        request_serializer=wire.serialize,
                        response_deserializer=common_pb2.Ack.FromString,
                    )
                    header = admin_pb2.UploadHeader(size=size)

                    def run() -> None:
                        sent = transfer.frames(admin_pb2.UploadFrame, header, transfer.split(payload), digest=digest)
                        assert call(sent, timeout=300).message == str(size), "upload arrived short"

                    return run

                def downloader(method: str, digest: bool) -> Callable[[], None]:
                    call = channel.unary_stream(
                        f"/bench.Transfer/{method}",
                        request_serializer=admin_pb2.JobRequest.SerializeToString,
                        response_deserializer=wire.frame_parser(admin_pb2.DownloadFrame),
                    )
                    verify = None if digest else lambda header: False

                    def run() -> None:
                        sink = transfer.Chunks()
                        frames = call(admin_pb2.JobRequest(), timeout=300)
                        transfer.receive(frames, sink, max_size=size, what="download", verify=verify)
                        assert sink.tell() == size, "download arrived short"

                    return run

                same = lambda data: data  # noqa: E731
                raw_up = channel.stream_unary(
                    "/bench.Transfer/RawUp", request_serializer=same, response_deserializer=same
                )
                raw_down = channel.unary_stream(
                    "/bench.Transfer/RawDown", request_serializer=same, response_deserializer=same
                )
                runs = {
                    "upload, size only (plaintext models and updates)": uploader("UpNoDigest", False),
                    "download, size only (plaintext global models)": downloader("DownNoDigest", False),
                    "upload, SHA-256 checked (job packages, ciphertexts)": uploader("Up", True),
                    "download, SHA-256 checked": downloader("Down", True),
                    "gRPC + TLS alone, up (1 MB messages, no framing)": lambda: raw_up(
                        (bytes(c) for c in transfer.split(payload)), timeout=300
                    ),
                    "gRPC + TLS alone, down": lambda: sum(len(c) for c in raw_down(b"", timeout=300)),
                }
                for _ in range(args.repeat):
                    for name, run in runs.items():
                        start = time.perf_counter()
                        run()
                        times.setdefault(name, []).append(time.perf_counter() - start)
        finally:
            server.terminate()
            server.wait(10)
    plain = min(plain_copy(payload) for _ in range(args.repeat))
    rate = lambda seconds: size / seconds / 1e6  # noqa: E731
    print(f"payload {args.mb} MB, best of {args.repeat}, {os.cpu_count()} cores")
    print(f"  plain TCP socket copy (the limit): {rate(plain):8.0f} MB/s")
    for name, seconds in times.items():
        print(f"  {name:<52} {rate(min(seconds)):8.0f} MB/s   ratio {plain / min(seconds):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
