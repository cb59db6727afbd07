"""What each layer of an upload's path costs, from bare gRPC up to what fedgrid does with it.

    python bench/grpc_layers.py [--mb 90] [--repeat 3]

A client process streams --mb MB in 512 KB messages (fedgrid.transfer.UPLOAD_CHUNK_SIZE) to a gRPC asyncio
server in another process over TLS on loopback (a throw-away self-signed certificate), with fedgrid's channel
options (fedgrid.transfer) and its malloc settings (fedgrid.allocator) in both. The layers are added one at a time:

1. bare gRPC: the messages are bytes, the server counts them;
2. protobuf frames: each message a WorkerMessage carrying a ResultFrame, built (as fedclient.work_stream
   builds a result's) and parsed by the generated code;
3. the worker's outbox: the messages go through a bounded queue that gRPC's thread drains, as
   fedclient.work_stream sends every request of its one stream;
4. the server's spool: fedserver.spool.Spool, as fedserver/worker_io.py spools a large update (a file
   reserved at the payload's size, the frames gathered into one write of 2 MB off the event loop), with the
   server's pool of used files: the warm-up upload writes a new file, the measured ones overwrite it.

Printed: MB/s of each layer (best of --repeat) and its ratio to bare gRPC, to tell where an upload's time
goes (bench/transfer.py measures the real server path end to end).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYERS = ["bare gRPC (bytes messages)", "+ protobuf frames", "+ the worker's outbox queue", "+ the server's spool file"]
METHOD = "/bench.Layers/Upload"


def certificate() -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) for localhost, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def serve(layer: int, key: bytes, cert: bytes, ports: multiprocessing.Queue, spool_dir: str, expected: int) -> None:
    """The server process: one stream-unary method that takes the messages of `layer`."""
    import grpc

    from fedgrid import allocator
    from fedgrid.transfer import GRPC_OPTIONS
    from fedgrid.v1 import federation_pb2 as fpb
    from fedserver.spool import FilePool, Spool

    allocator.tune(arenas=2)
    Spool.pool = FilePool(Path(spool_dir) / "pool")

    async def upload(requests, context) -> bytes:  # noqa: ANN001 - gRPC's request iterator and context
        received = 0
        spool = Spool(Path(spool_dir), "bench-", expected) if layer >= 4 else None
        try:
            async for message in requests:
                data = message if layer == 1 else message.result.data
                received += len(data)
                if spool is not None:
                    spool.write(data)
                    if spool.flush_due:
                        await asyncio.to_thread(spool.flush)
            if spool is not None:
                await asyncio.to_thread(spool.flush)
        finally:
            if spool is not None:
                spool.discard()  # the file goes to the pool, as a folded update's does
        return str(received).encode()

    async def main() -> None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        handler = grpc.stream_unary_rpc_method_handler(
            upload, request_deserializer=None if layer == 1 else fpb.WorkerMessage.FromString
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Layers", {"Upload": handler}),))
        port = server.add_secure_port("localhost:0", grpc.ssl_server_credentials([(key, cert)]))
        await server.start()
        ports.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def messages(layer: int, payload: bytes, chunk: int) -> Iterator[object]:
    from fedclient.work_stream import RESULT_MESSAGE

    view = memoryview(payload)
    for start in range(0, len(payload), chunk):
        piece = bytes(view[start : start + chunk])
        yield piece if layer == 1 else RESULT_MESSAGE(data=piece)


def through_outbox(source: Iterator[object]) -> Iterator[object]:
    """The messages as a WorkStream sends them: put into a bounded queue by one thread, drained by gRPC's."""
    from fedclient.work_stream import OUTBOX_MESSAGES

    outbox: queue.Queue[object] = queue.Queue(OUTBOX_MESSAGES)

    def fill() -> None:
        for message in source:
            outbox.put(message)
        outbox.put(None)

    threading.Thread(target=fill, daemon=True).start()
    return iter(outbox.get, None)


def measure(layer: int, payload: bytes, repeat: int) -> float:
    """Best MB/s of `repeat` uploads of `payload` with the layers up to `layer`."""
    import grpc

    from fedgrid.transfer import GRPC_OPTIONS, UPLOAD_CHUNK_SIZE
    from fedgrid.v1 import federation_pb2 as fpb

    key, cert = certificate()
    spawn = multiprocessing.get_context("spawn")
    ports: multiprocessing.Queue = spawn.Queue()
    with tempfile.TemporaryDirectory() as spool_dir:
        server = spawn.Process(target=serve, args=(layer, key, cert, ports, spool_dir, len(payload)), daemon=True)
        server.start()
        try:
            port = ports.get(timeout=60)
            with grpc.secure_channel(
                f"localhost:{port}", grpc.ssl_channel_credentials(cert), options=GRPC_OPTIONS
            ) as channel:
                serializer = None if layer == 1 else fpb.WorkerMessage.SerializeToString
                upload = channel.stream_unary(METHOD, request_serializer=serializer)
                best = 0.0
                for _ in range(repeat + 1):  # the first one warms the connection up
                    source = messages(layer, payload, UPLOAD_CHUNK_SIZE)
                    started = time.perf_counter()
                    answer = upload(through_outbox(source) if layer >= 3 else source, timeout=300)
                    elapsed = time.perf_counter() - started
                    assert int(answer) == len(payload), answer
                    best = max(best, len(payload) / 1e6 / elapsed)
                return best
        finally:
            server.terminate()
            server.join(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=90, help="MB per upload (default 90)")
    parser.add_argument("--repeat", type=int, default=3, help="uploads per layer; the best is shown (default 3)")
    args = parser.parse_args()

    from fedgrid import allocator

    allocator.tune()
    payload = os.urandom(args.mb << 20)
    print(f"{args.mb} MB in 2 MB messages over TLS on loopback, client and server in two processes")
    print(f"{'layer':32} {'MB/s':>8} {'of bare gRPC':>13}")
    bare = 0.0
    for layer, name in enumerate(LAYERS, start=1):
        rate = measure(layer, payload, args.repeat)
        bare = bare or rate
        print(f"{name:32} {rate:8.0f} {rate / bare:13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
