"""Stubs and server handlers built from the service descriptors in `fedgrid/v1`, with a fast path for
the data frames of streamed payloads.

Every streamed payload is a sequence of `*Frame` messages (`oneof kind { header; data; trailer }`).
A data frame is nothing but field 2 of that oneof: the tag byte 0x12, a varint length, and the bytes.
For those frames we skip the protobuf object altogether: the sender writes the tag and length in front
of the chunk (one copy instead of three), the receiver hands on a view of the received bytes (no copy).
What travels is byte for byte what protobuf would produce, so any protobuf peer can read it; headers
and trailers, and every other message, go through protobuf as usual. `bench/transfer.py` measures it.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

DATA_TAG = b"\x12"
"""Field 2 (`data`), wire type 2 (length-delimited): the first byte of every data frame."""


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_data(chunk: bytes | memoryview) -> bytes:
    """The serialized data frame of `chunk`, identical to what protobuf would write."""
    return DATA_TAG + varint(len(chunk)) + chunk


class RawData:
    """A data frame read without protobuf: `data` is a view into the received message."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data

    @staticmethod
    def WhichOneof(_group: str) -> str:  # noqa: N802 - the protobuf spelling the receivers call
        return "data"


def frame_parser(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        if raw[:1] == DATA_TAG:
            length, shift, offset = 0, 0, 1
            while offset < len(raw) and shift < 64:
                byte = raw[offset]
                length |= (byte & 0x7F) << shift
                offset += 1
                shift += 7
                if not byte & 0x80:
                    break
            if offset + length == len(raw):
                return RawData(memoryview(raw)[offset:])
        return cls.FromString(raw)

    return parse


def serialize(message: Message | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _is_frame(cls: type[Message]) -> bool:
    return cls.DESCRIPTOR.name.endswith("Frame")


def _codecs(
    method: MethodDescriptor,
) -> tuple[Callable[..., bytes], Callable[[bytes], Any], Callable[..., bytes], Callable[[bytes], Any]]:
    """(request serializer, request parser, response serializer, response parser) of one method."""
    request = GetMessageClass(method.input_type)
    response = GetMessageClass(method.output_type)
    return (
        serialize if _is_frame(request) else request.SerializeToString,
        frame_parser(request) if _is_frame(request) else request.FromString,
        serialize if _is_frame(response) else response.SerializeToString,
        frame_parser(response) if _is_frame(response) else response.FromString,
    )


def _kind(method: MethodDescriptor) -> str:
    return ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming else "unary")


def stub(channel: grpc.Channel, service: ServiceDescriptor) -> Any:
    """An object with one callable per RPC of `service` (like a generated stub)."""
    calls = {}
    for method in service.methods:
        serialize, _, _, parse = _codecs(method)
        factory = getattr(channel, _kind(method))
        calls[method.name] = factory(
            f"/{service.full_name}/{method.name}",
            request_serializer=serialize,
            response_deserializer=parse,
            _registered_method=True,
        )
    return SimpleNamespace(**calls)


def add_servicer(server: grpc.Server | grpc.aio.Server, servicer: object, service: ServiceDescriptor) -> None:
    """Register every RPC of `service` on `server`, served by the same-named methods of `servicer`."""
    handlers = {}
    for method in service.methods:
        _, parse, serialize, _ = _codecs(method)
        factory = getattr(grpc, f"{_kind(method)}_rpc_method_handler")
        handlers[method.name] = factory(
            getattr(servicer, method.name), request_deserializer=parse, response_serializer=serialize
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
