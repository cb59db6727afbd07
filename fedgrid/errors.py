"""Every error fedgrid raises on purpose, in one tree.

    FedgridError                 base: a message written for the person who has to act on it
    ├── ConfigError              a project file, kit config, job folder or option is wrong
    │   ├── ProjectFileError     project.yml does not validate (exit 2 from `provision`)
    │   └── JobSpecError         a job folder or upload does not validate
    ├── KitError                 a startup kit is missing, incomplete or was changed
    │   └── TamperedError        a signed file differs from what was signed
    ├── IdentityError            a certificate is not a participant's, or is used on the wrong port
    ├── AuthorizationError       the caller's role may not run this command
    ├── TransferError            a streamed payload is truncated, oversized or fails its digest
    │   └── FrameError           bytes on a stream that are not a message of the expected type
    ├── PayloadError             a received tensor set or ciphertext does not match what was expected
    │   ├── LayoutError          its tensor names, shapes or dtypes differ from the global model's
    │   ├── NonFiniteError       it holds NaN, infinite or out-of-range values
    │   └── SampleCountError     its sample count (its weight in the mean) is not a usable number
    ├── NotFoundError            a job, site or file that was asked for does not exist
    ├── StateError               the request is valid but not now (delete a running job, ...)
    ├── LimitError               the caller holds as many streams as it may, or went silent on one
    ├── EncryptionError          a homomorphic-encryption context or ciphertext is unusable
    └── PrivacyError             a secure-aggregation or key-wrapping step refused: too few shares, a wrapped
                                 key that is not for this site or job, a forged or altered message

Library code raises these; only the `__main__` modules turn them into exit codes
(see `fedgrid.exit_codes`), and only the gRPC servicers turn them into status codes.
"""

from __future__ import annotations


class FedgridError(Exception):
    """Base class: the message says what is wrong, where, and what to do next."""


class ConfigError(FedgridError):
    """A configuration file, job folder or command-line option is invalid."""


class ProjectFileError(ConfigError):
    """project.yml does not validate."""


class JobSpecError(ConfigError):
    """A job folder or job upload does not validate."""


class KitError(FedgridError):
    """A startup kit is missing, incomplete or unreadable."""


class TamperedError(KitError):
    """A signed file changed after it was signed, or a file was added or removed."""


class IdentityError(FedgridError):
    """A certificate does not identify a participant allowed here."""


class AuthorizationError(FedgridError):
    """The caller's role does not allow the command."""


class TransferError(FedgridError):
    """A streamed payload was truncated, too large, or failed its digest check."""


class FrameError(TransferError):
    """Bytes on a stream that do not parse as the message the method expects."""


class PayloadError(FedgridError):
    """A tensor set or ciphertext does not match the expected layout."""


class LayoutError(PayloadError):
    """A tensor set's names, shapes or dtypes differ from the global model's."""


class NonFiniteError(PayloadError):
    """A tensor set holds NaN, infinite or out-of-range values (it would poison the mean)."""


class SampleCountError(PayloadError):
    """An update's sample count, its weight in the mean, is not a positive finite number in range."""


class NotFoundError(FedgridError):
    """A job, site or file that was asked for does not exist."""


class StateError(FedgridError):
    """The request is valid, but not in the current state."""


class LimitError(FedgridError):
    """The caller reached a per-identity limit (streams held) or a stream's deadline passed."""


class EncryptionError(FedgridError):
    """A homomorphic-encryption context or ciphertext is unusable."""


class PrivacyError(FedgridError):
    """A secure-aggregation or key-wrapping step cannot go on without giving up what it protects."""
