"""How fast the transfer layer moves a large payload over mutual TLS on loopback, and at what CPU cost.

    python bench/transfer.py [--mb 100] [--repeat 3]

Provisions a throw-away project, starts a server process with the server kit's credentials (a gRPC
server, and a data-lane listener speaking fedgrid/lane.py's framing) and moves the payload up
(client → server, as a site update) and down (server → client, as a global model) with fedgrid's
chunked streams (header, 1 MB chunks, trailer):
- over the data lane (a TLS socket; how job workers move models and updates),
- over gRPC with the size checked only (the same streams when the lane is off or unreachable),
- over gRPC with the SHA-256 digest computed and checked too (job packages, downloads, ciphertexts),
- and raw 1 MB gRPC messages without our framing (gRPC and TLS alone).
The limit is a plain TCP socket copy of the same bytes between two processes on this machine (no
TLS, no framing, no digest). Prints MB/s and the ratio to the limit (best of --repeat runs), and the
CPU both processes spent per MB moved (median run): on a round's 2 cores, CPU is what a round waits for.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

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
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=serve_lane, args=(kit, listener, payload, mb), daemon=True).start()
    print(f"ready {listener.getsockname()[1]}", flush=True)
    server.wait_for_termination()


def serve_lane(kit: Any, listener: socket.socket, payload: bytes, mb: int) -> None:
    """The data lane's server end, framing and checks as in fedserver/lane.py, without a job runtime."""
    from fedgrid import lane, transfer
    from fedgrid.v1 import common_pb2
    from fedgrid.v1 import federation_pb2 as fpb
    from fedserver.lane import server_context

    raw, _ = listener.accept()
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with server_context(kit).wrap_socket(raw, server_side=True) as sock:
        down = list(transfer.frames(fpb.TaskFrame, fpb.TaskHeader(), transfer.split(payload), digest=False))
        while True:
            try:
                kind, body = lane.receive(sock)
            except lane.Closed:
                return
            if kind == lane.TASK:
                for frame in down:
                    lane.send(sock, lane.FRAME, frame)
                continue
            sink = transfer.Chunks()
            assembler = transfer.Assembler(sink, max_size=(mb + 1) << 20, what="upload", verify=lambda h: False)
            while True:
                frame = lane.parse(lane.parse_result_frame, body, "result frame")
                assembler.feed(frame)
                if frame.WhichOneof("kind") == "trailer":
                    break
                kind, body = lane.receive(sock)
            assembler.finish()
            lane.send(sock, lane.ACK, common_pb2.Ack(message=str(sink.tell())))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    from fedgrid.lane import Lane
    from fedgrid.tls import secure_channel
    from fedgrid.v1 import admin_pb2, common_pb2
    from fedgrid.v1 import federation_pb2 as fpb

    size = args.mb << 20
    payload = os.urandom(size)
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        project = provision_project(Path(tmp), n_sites=1)
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(project.server), str(project.admin_port), "--mb", str(args.mb)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            ready, lane_port = server.stdout.readline().split()
            assert ready == "ready"
            kit = load_kit(project.admin_roles["project_admin"])
            site = load_kit(project.sites[0])
            lane = contextlib.closing(Lane(site, int(lane_port)))
            with secure_channel(kit, project.admin_port) as channel, lane as lane:

                def lane_up() -> None:
                    sent = transfer.frames(
                        fpb.ResultFrame, fpb.ResultHeader(), transfer.split(payload), digest=False, raw_data=True
                    )
                    assert lane.submit(sent) == str(size), "upload arrived short"

                def lane_down() -> None:
                    sink = transfer.Chunks()
                    transfer.receive(
                        lane.task(fpb.TaskRequest()), sink, max_size=size, what="download", verify=lambda h: False
                    )
                    assert sink.tell() == size, "download arrived short"

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
                    "data lane, up (workers' updates)": lane_up,
                    "data lane, down (global models to workers)": lane_down,
                    "gRPC, up, size only (without the lane)": uploader("UpNoDigest", False),
                    "gRPC, down, size only": downloader("DownNoDigest", False),
                    "gRPC, up, SHA-256 checked (job packages)": uploader("Up", True),
                    "gRPC, down, SHA-256 checked (downloads)": downloader("Down", True),
                    "gRPC + TLS alone, up (1 MB messages, no framing)": lambda: raw_up(
                        (bytes(c) for c in transfer.split(payload)), timeout=300
                    ),
                    "gRPC + TLS alone, down": lambda: sum(len(c) for c in raw_down(b"", timeout=300)),
                }
                for _ in range(args.repeat):
                    for name, run in runs.items():
                        start, cpu_start = time.perf_counter(), time.process_time() + cpu_seconds(server.pid)
                        run()
                        times.setdefault(name, []).append(time.perf_counter() - start)
                        used = time.process_time() + cpu_seconds(server.pid) - cpu_start
                        cpu.setdefault(name, []).append(used * 1e3 / (size / 1e6))
        finally:
            server.terminate()
            server.wait(10)
    plain = min(plain_copy(payload) for _ in range(args.repeat))
    rate = lambda seconds: size / seconds / 1e6  # noqa: E731
    print(f"payload {args.mb} MB, best of {args.repeat}, {os.cpu_count()} cores")
    print(f"  plain TCP socket copy (the limit): {rate(plain):8.0f} MB/s")
    print(f"  {'':<48} {'speed':>13}   {'of the limit':>12}   CPU per MB, both ends")
    for name, seconds in times.items():
        print(
            f"  {name:<48} {rate(min(seconds)):8.0f} MB/s   {plain / min(seconds):12.2f}"
            f"   {statistics.median(cpu[name]):6.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
