"""gRPC credentials and channels built from a startup kit: mutual TLS against the project's root CA.

There is no insecure channel anywhere in fedgrid: the server requires a client certificate on both
ports, and clients verify the server's certificate against the root CA of their own kit.
"""

from __future__ import annotations

import grpc

from fedgrid.kit import Kit
from fedgrid.transfer import GRPC_OPTIONS


def server_credentials(kit: Kit) -> grpc.ServerCredentials:
    """The server's certificate, and a client certificate required from every caller."""
    return grpc.ssl_server_credentials(
        [(kit.key_pem, kit.cert_pem)], root_certificates=kit.root_pem, require_client_auth=True
    )


def channel_credentials(kit: Kit) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=kit.root_pem, private_key=kit.key_pem, certificate_chain=kit.cert_pem
    )


def target(kit: Kit, port: int) -> str:
    host = kit.server_host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def secure_channel(kit: Kit, port: int) -> grpc.Channel:
    """A blocking channel to the server (site daemon, job worker, admin Session)."""
    return grpc.secure_channel(target(kit, port), channel_credentials(kit), options=GRPC_OPTIONS)
