"""TLS for the control plane: the files `roundhouse serve` is given, read once, as gRPC credentials, the
dashboard's HTTPS and what the ranks trust.

    --tls-cert FILE, --tls-key FILE   the server's certificate (chain) and key, PEM: gRPC and the dashboard
    --tls-client-ca FILE              also require every gRPC client to present a certificate this CA signed
                                      (mutual TLS: the CLI's ROUNDHOUSE_TLS_CLIENT_CERT/_KEY)
    --tls-ranks-cert FILE,            with --tls-client-ca: the certificate and key the ranks present, handed
    --tls-ranks-key FILE              to them in their environment (on Kubernetes the key through the
                                      attempt's Secret)
    --tls-ranks-ca FILE               what ranks trust for the server's certificate (default: --tls-cert,
                                      right for a self-signed certificate or a chain that ends in its root)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from orchestrator.launcher import RankTls


class TlsError(ValueError):
    """A TLS file that cannot be used; the message names the flag."""


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    client_ca: Path | None = None
    ranks_ca: Path | None = None
    ranks_cert: Path | None = None
    ranks_key: Path | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        client_ca = _read(self.client_ca, "--tls-client-ca") if self.client_ca else None
        return grpc.ssl_server_credentials([(_read(self.key, "--tls-key"), _read(self.cert, "--tls-cert"))],
                                           root_certificates=client_ca, require_client_auth=client_ca is not None)

    def rank_tls(self) -> RankTls:
        """What ranks trust for this server (by default its own certificate) and, for mutual TLS, present."""
        ca = _read(self.ranks_ca, "--tls-ranks-ca") if self.ranks_ca else _read(self.cert, "--tls-cert")
        if self.ranks_cert is None:
            return RankTls(ca.decode())
        return RankTls(ca.decode(), _read(self.ranks_cert, "--tls-ranks-cert").decode(),
                       _read(self.ranks_key, "--tls-ranks-key").decode())

    def uvicorn_options(self) -> dict[str, str]:
        """The dashboard's HTTPS: the same certificate and key."""
        return {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}


def _read(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{flag} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"{flag} {path}: not a PEM file")
    return data
