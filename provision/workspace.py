"""The provisioning workspace of one project: numbered outputs and the state kept between runs.

```
<workspace>/<project>/
  state/              0700; never handed out
    rootCA.key        0600, the root CA's private key
    rootCA.pem        the root CA certificate every kit trusts
    state.json        {"project", "roster_version"}
  prod_00/ prod_01/   one folder per run, each holding one kit per participant; never rewritten
  .provision.lock     held while a run writes, so two runs cannot pick the same number or CA
```

The CA is created on the first run and reused afterwards, so a site added to the project file later
gets a kit that the already-running server trusts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fedgrid.certs import key_matches_cert, load_cert, load_private_key, verify_root_ca
from fedgrid.errors import ConfigError, FedgridError, IdentityError
from fedgrid.files import write_atomic, write_json_atomic
from fedgrid.signing import PrivateKey
from provision.builders import HEMaterial
from provision.ca import cert_pem, write_private_key

STATE_DIR = "state"
CA_KEY_FILE = "rootCA.key"
CA_CERT_FILE = "rootCA.pem"
STATE_FILE = "state.json"
LOCK_FILE = ".provision.lock"
PROD_PREFIX = "prod_"
_PROD_RE = re.compile(rf"^{PROD_PREFIX}(\d+)$")


@dataclass(frozen=True)
class State:
    """What one run hands to the next: the root CA and the last roster version issued."""

    ca_key: PrivateKey
    ca_cert: x509.Certificate
    roster_version: int


@dataclass(frozen=True)
class ProjectWorkspace:
    root: Path
    """<workspace>/<project name>."""
    project: str

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR

    @property
    def ca_key_path(self) -> Path:
        return self.state_dir / CA_KEY_FILE

    @property
    def ca_cert_path(self) -> Path:
        return self.state_dir / CA_CERT_FILE

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def _numbered(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in self.root.iterdir() if (m := _PROD_RE.match(p.name)))

    def prod_dirs(self) -> list[Path]:
        """Existing prod_NN folders, oldest first."""
        return [p for _, p in self._numbered()]

    def next_prod_dir(self) -> Path:
        """prod_NN one above the highest existing number: a deleted number is never reused."""
        highest = max((n for n, _ in self._numbered()), default=-1)
        return self.root / f"{PROD_PREFIX}{highest + 1:02d}"

    @contextlib.contextmanager
    def locked(self, timeout: float = 60.0) -> Iterator[None]:
        """Hold the project's provisioning lock, waiting up to `timeout` s for another run to finish."""
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ConfigError(
                            f"{self.root}: another provision of project {self.project} has held the lock "
                            f"for {timeout:.0f} s; wait for it to finish"
                        ) from None
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)

    def load_state(self) -> State | None:
        """The saved state, or None on the first run; ConfigError if it is incomplete or unusable."""
        if not self.state_dir.exists():
            return None
        for path in (self.ca_key_path, self.ca_cert_path, self.state_file):
            if not path.is_file():
                raise ConfigError(
                    f"{self.state_dir} is incomplete ({path.name} is missing): restore it from a backup, "
                    "or move the state folder away to start a new root CA (then re-provision every kit)"
                )
        try:
            ca_cert = load_cert(self.ca_cert_path)
            ca_key = load_private_key(self.ca_key_path)
        except FedgridError as exc:
            raise ConfigError(f"provisioning state: {exc}") from None
        if not key_matches_cert(ca_key, ca_cert):
            raise ConfigError(f"{self.ca_key_path} does not belong to {self.ca_cert_path}")
        try:
            verify_root_ca(ca_cert)
        except IdentityError as exc:
            raise ConfigError(
                f"{self.ca_cert_path}: {exc}; move the state folder away to create a new root CA "
                "(every participant then needs a new kit)"
            ) from None
        try:
            saved = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{self.state_file}: unreadable ({exc})") from None
        version = saved.get("roster_version") if isinstance(saved, dict) else None
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ConfigError(f"{self.state_file}: roster_version must be a non-negative integer")
        if saved.get("project") != self.project:
            owner = saved.get("project")
            raise ConfigError(f"{self.state_file}: belongs to project {owner!r}, not {self.project!r}")
        return State(ca_key=ca_key, ca_cert=ca_cert, roster_version=version)

    @property
    def he_paths(self) -> tuple[Path, Path]:
        return self.state_dir / "he_secret_context.bin", self.state_dir / "he_public_context.bin"

    def load_he(self) -> HEMaterial | None:
        """The HE contexts of an earlier run, if any (kept so later kits share them)."""
        secret, public = self.he_paths
        if not secret.is_file() or not public.is_file():
            return None
        return HEMaterial(secret_context=secret.read_bytes(), public_context=public.read_bytes())

    def drop_he(self) -> bool:
        """Remove the provisioned HE contexts of earlier runs (the project now makes keys at its sites);
        True when there were some. Kits provisioned with them keep their own copy."""
        found = False
        for path in self.he_paths:
            if path.exists():
                path.unlink()
                found = True
        return found

    def save_he(self, material: HEMaterial) -> None:
        """Keep the HE contexts beside the root CA; the secret one 0600 like every key."""
        secret, public = self.he_paths
        for path, data in ((secret, material.secret_context), (public, material.public_context)):
            write_atomic(path, data, mode=0o600)

    def save_state(self, state: State, *, new_ca: bool) -> None:
        """Write the CA (first run only) and the roster version (atomically, every run)."""
        if new_ca:
            self.state_dir.mkdir(mode=0o700)
            os.chmod(self.state_dir, 0o700)
            write_private_key(self.ca_key_path, state.ca_key)
            self.ca_cert_path.write_bytes(cert_pem(state.ca_cert))
        write_json_atomic(self.state_file, {"project": self.project, "roster_version": state.roster_version})
