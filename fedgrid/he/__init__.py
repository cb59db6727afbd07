"""CKKS homomorphic encryption for FedAvg: the server adds site updates it cannot read.

Callers use this package's names (`from fedgrid import he; he.encrypt_update(...)`); the modules
behind them, one job each:

    params      HEParams: the `he:` section of project.yml, its checks, security and error bounds
    ckks        SEAL through TenSEAL, the only module that imports it: keys, encrypt, add, decrypt
    context     he_context.bin: create_contexts, and HEContext.load with its secret-key expectation
    layout      tensors to a flat run of values and back
    stream      the records that frame ciphertexts on the wire
    operations  encrypt_update (site), EncryptedSum (server), decrypt_update / decrypt_mean (site)

Importing this package imports TenSEAL: `import fedgrid.he` failing with ImportError is how
provisioning tells that HE support is not installed.
"""

from fedgrid.he.ckks import TENSEAL_VERSION
from fedgrid.he.context import HEContext, create_contexts
from fedgrid.he.layout import INT_SHIFT_BITS
from fedgrid.he.operations import (
    FLOOD_FACTOR,
    SEAL_NOISE_SIGMA,
    EncryptedSum,
    decrypt_mean,
    decrypt_update,
    encrypt_update,
)
from fedgrid.he.params import ENCRYPTIONS, MAX_COEFF_BITS, MIN_PRECISION_BITS, PRIME_BITS, HEParams
from fedgrid.he.stream import Source

__all__ = [
    "ENCRYPTIONS",
    "FLOOD_FACTOR",
    "INT_SHIFT_BITS",
    "MAX_COEFF_BITS",
    "MIN_PRECISION_BITS",
    "PRIME_BITS",
    "SEAL_NOISE_SIGMA",
    "TENSEAL_VERSION",
    "EncryptedSum",
    "HEContext",
    "HEParams",
    "Source",
    "create_contexts",
    "decrypt_mean",
    "decrypt_update",
    "encrypt_update",
]
