"""SecAgg+ secure aggregation (Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead", CCS 2020): the server learns the sum of the sites' updates and nothing
else about them, and the sum is recovered even when sites drop out after masking.

One module, over 400 lines, because every step uses the same keys, labels and share layout: what a site
masks in step 3 is what the server removes in step 4, and a reader checks that in one file.

A round, every message relayed by the server (sites never talk to each other)::

    0 setup       server  the sites, a neighbour graph over them, a session id unique to (job, round)
    1 advertise   site    two fresh X25519 key pairs: a mask key and a channel key
    2 share keys  site    a fresh 16-byte self-mask seed b; Shamir shares (threshold t) of b and of its mask
                          private key, one per neighbour, each encrypted for that neighbour (X25519 of the
                          channel keys, HKDF-SHA256, AES-GCM); the commitment SHA-256(b) to the server
    3 mask        site    y = q(x) + PRG(b) + Σ_{neighbour v, u<v} PRG(s_uv) − Σ_{neighbour v, v<u} PRG(s_uv)
                          mod 2^k, where s_uv is the X25519 agreement of u's and v's mask keys
    4 unmask      site    told who survived (its y arrived) and who dropped: for each neighbour, the share of
                          its seed b if it survived, the share of its mask key if it dropped, never both
                  server  Σ y over the survivors; t shares give back each survivor's b and each dropped
                          site's mask key; it removes the self masks and the pairwise masks that the dropped
                          sites left uncancelled, then dequantizes

Pairwise masks between two survivors cancel in the sum. PRG(key) is the AES-256-CTR keystream of a key
derived with HKDF-SHA256 from the seed or the agreed secret, the session id and both names, read as
little-endian unsigned integers mod 2^k. Quantization maps [-value_range, value_range] onto
0..2^bits−1, by stochastic rounding (unbiased: E[q(x)] is exact, each value within one step) or by
rounding to the nearest (within half a step); the sum of n updates needs n·(2^bits−1) < 2^k, which
`check_no_overflow` enforces before a job starts.

Threat model. Sites and server follow the protocol and try to learn from what they see (semi-honest), as
in Bell et al.'s main construction:

- The server alone, or with fewer than t neighbours of a site, learns the sum of the survivors' updates
  and nothing else about any one of them: a masked vector is uniform mod 2^k without the masks. With
  fewer neighbours than sites, this rests on the graph being drawn at random, as Bell et al. assume; a
  server that places a site among colluders on purpose is outside this model.
- The sum comes back as long as at least t neighbours of every site that sent a masked update, and of
  every site that dropped after step 2, answer step 4, and the survivors stay connected in the graph.
  If they fall apart into groups, unmasking would give each group's sum (a lone survivor's update):
  sites refuse step 4 then, and so does the server.
- t > degree/2 is required: a server that tells some neighbours of u "u survived" and others "u dropped"
  collects at most degree shares, so never t of u's seed and t of u's mask key. A site answers step 4
  once per round (`SiteState` refuses a second request) and only when at least t sites survived.
- Step 4 refuses with PrivacyError, rather than return a wrong or partial sum, when fewer than t shares
  of a secret arrive, a share is malformed or from a site that may not hold it, or recovered secrets do
  not match the seed's commitment or the advertised public key.
- Advertisements are signed by the job workers (fedclient/secure_aggregation.py): each signs
  `Advertisement.signed_bytes` with its certificate key and checks its neighbours' signatures against
  their certificates from the project's root CA, so a server can neither substitute keys to stand in the
  middle between two sites nor invent sites. A site that submits garbage corrupts the sum undetected:
  secure aggregation hides inputs, so it cannot check them.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import random
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedgrid.errors import ConfigError, PayloadError, PrivacyError
from fedgrid.tensors import Arrays, Layout, TensorSpec

SEED_BYTES = 16  # the self-mask seed: one Shamir secret (pycryptodome shares 16-byte secrets)
KEY_BYTES = 32  # an X25519 key, shared as two 16-byte halves with the same share indices
_NONCE_BYTES = 12
_SHARE_PLAINTEXT = struct.Struct("<H16s16s16s")  # share index, seed share, key share (low half, high half)
_LABEL = b"fedgrid secagg+ v1 "
_SPLIT = (
    "secagg: the survivors fall apart into separate groups in the neighbour graph, and unmasking would reveal "
    "each group's sum; the round cannot be aggregated (raise secagg.degree)"
)


# -- parameters ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecAggParams:
    """What a job sets for secure aggregation; `check_params` validates it against the number of sites."""

    threshold: int
    """t: shares needed to recover a site's seed or mask key; more than half of its neighbours."""
    bits: int = 16
    """Quantization: each value becomes an integer in 0..2^bits−1."""
    value_range: float = 1.0
    """Values are quantized over [-value_range, value_range]."""
    modulus_bits: int = 32
    """k: masked values and the sum are integers mod 2^k (k <= 32 travels as 4 bytes per value, else 8)."""
    degree: int | None = None
    """Neighbours per site (even); None, or at least the number of sites − 1: every other site."""
    stochastic_rounding: bool = True
    """Round up with probability equal to the fraction (unbiased) rather than to the nearest level."""

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self.modulus_bits <= 32 else np.uint64)

    @property
    def mask(self) -> int:
        return (1 << self.modulus_bits) - 1

    @property
    def step(self) -> float:
        """The value of one quantization level."""
        return 2.0 * self.value_range / ((1 << self.bits) - 1)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_no_overflow(n_sites: int, bits: int, modulus_bits: int) -> None:
    """Refuse (ConfigError naming the parameters) when the sum of `n_sites` values of `bits` bits can reach
    2^modulus_bits: it would wrap around and the server would unmask a wrong sum without noticing."""
    largest = n_sites * ((1 << bits) - 1)
    if largest < (1 << modulus_bits):
        return
    fitting = max((b for b in range(1, bits) if n_sites * ((1 << b) - 1) < (1 << modulus_bits)), default=0)
    lower = f", or lower secagg.bits to {fitting}" if fitting else ""
    raise ConfigError(
        f"secagg: the sum of {n_sites} updates quantized to bits={bits} can reach {largest}, which needs "
        f"{largest.bit_length()} bits and overflows modulus_bits={modulus_bits}; raise secagg.modulus_bits to "
        f"{largest.bit_length()}{lower}"
    )


def effective_degree(params: SecAggParams, n_sites: int) -> int:
    """How many neighbours each site has with `n_sites` sites."""
    if params.degree is None or params.degree >= n_sites - 1:
        return n_sites - 1
    return params.degree


def check_params(params: SecAggParams, n_sites: int) -> None:
    """Validate `params` for a round of `n_sites` sites; ConfigError naming the parameter and what to change."""
    if not _is_int(n_sites) or n_sites < 2:
        raise ConfigError(f"secagg: secure aggregation needs at least 2 sites in a round, got {n_sites!r}")
    if not _is_int(params.modulus_bits) or not 2 <= params.modulus_bits <= 64:
        raise ConfigError(f"secagg.modulus_bits must be an integer in 2..64, got {params.modulus_bits!r}")
    if not _is_int(params.bits) or not 1 <= params.bits < params.modulus_bits:
        raise ConfigError(f"secagg.bits must be an integer in 1..{params.modulus_bits - 1}, got {params.bits!r}")
    value_range = params.value_range
    if not _is_number(value_range) or not math.isfinite(value_range) or value_range <= 0:
        raise ConfigError(f"secagg.value_range must be a positive finite number, got {value_range!r}")
    if params.degree is not None and (not _is_int(params.degree) or params.degree < 2 or params.degree % 2):
        raise ConfigError(f"secagg.degree must be an even integer >= 2 or unset (every site), got {params.degree!r}")
    degree = effective_degree(params, n_sites)
    if not _is_int(params.threshold) or not degree / 2 < params.threshold <= degree:
        low = degree // 2 + 1
        raise ConfigError(
            f"secagg.threshold must be an integer in {low}..{degree} with {n_sites} sites ({degree} neighbours "
            f"each): more than half the neighbours, so that no two disjoint groups of them can each recover a "
            f"site's secrets; got {params.threshold!r}"
        )
    check_no_overflow(n_sites, params.bits, params.modulus_bits)


# -- quantization ----------------------------------------------------------------------------------


def flatten(arrays: Mapping[str, np.ndarray]) -> tuple[Layout, np.ndarray]:
    """All values of a tensor set as one float64 vector, tensors in name order, and the layout to undo it."""
    layout: Layout = {
        name: TensorSpec(str(np.asarray(arrays[name]).dtype), np.shape(arrays[name])) for name in sorted(arrays)
    }
    parts = [np.asarray(arrays[name], dtype=np.float64).reshape(-1) for name in layout]
    return layout, (np.concatenate(parts) if parts else np.zeros(0))


def unflatten(layout: Layout, vector: np.ndarray) -> Arrays:
    """The tensor set `flatten` made `vector` from (integer tensors rounded)."""
    size = sum(math.prod(spec.shape) for spec in layout.values())
    if vector.size != size:
        raise PayloadError(f"a vector of {vector.size} values does not fill a layout of {size}")
    out: Arrays = {}
    offset = 0
    for name, spec in layout.items():
        count = math.prod(spec.shape)
        part = vector[offset : offset + count].reshape(spec.shape)
        offset += count
        dtype = np.dtype(spec.dtype)
        out[name] = (part if dtype.kind == "f" else np.rint(part)).astype(dtype)
    return out


def quantize(
    values: np.ndarray,
    params: SecAggParams,
    rng: np.random.Generator | None = None,
    *,
    clip: bool = False,
    what: str = "update",
) -> np.ndarray:
    """Map float values in [-value_range, value_range] to integers 0..2^bits−1 (`params.dtype`).

    A value outside the range raises PayloadError naming the largest one, unless `clip` is set: then it is
    clipped to the range (right for DP-clipped differences, whose every value is within the clip norm).
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size and not np.isfinite(values).all():
        raise PayloadError(f"{what}: contains NaN or infinite values")
    r = float(params.value_range)
    if clip:
        values = np.clip(values, -r, r)
    elif values.size and float(np.abs(values).max()) > r:
        raise PayloadError(
            f"{what}: holds values up to {float(np.abs(values).max()):.6g} in magnitude, outside "
            f"secagg.value_range {r:g}; raise value_range (costs precision) or clip the update"
        )
    levels = (1 << params.bits) - 1
    scaled = (values + r) * (levels / (2.0 * r))
    if params.stochastic_rounding:
        rng = np.random.default_rng() if rng is None else rng
        quantized = np.floor(scaled + rng.random(scaled.size))
    else:
        quantized = np.rint(scaled)
    return np.clip(quantized, 0, levels).astype(params.dtype)


def dequantize_sum(total: np.ndarray, count: int, params: SecAggParams) -> np.ndarray:
    """The float sum of `count` quantized vectors from their integer sum (which must not have wrapped)."""
    return np.asarray(total, dtype=np.float64) * params.step - count * float(params.value_range)


# -- the neighbour graph and the round -------------------------------------------------------------


def neighbour_graph(sites: Sequence[str], degree: int | None, seed: int) -> dict[str, tuple[str, ...]]:
    """Who shares secrets with whom: every other site, or a `degree`-regular graph over a random order.

    The sites are placed on a ring in an order shuffled by `seed`, and each is joined to the degree/2
    nearest on either side (a Harary graph): every site has exactly `degree` neighbours, and the graph
    stays connected while fewer than `degree` sites drop out.
    """
    names = sorted(sites)
    if len(set(names)) != len(names):
        raise ConfigError(f"secagg: a site is listed twice among {', '.join(names)}")
    n = len(names)
    if degree is None or degree >= n - 1:
        return {site: tuple(other for other in names if other != site) for site in names}
    ring = list(names)
    random.Random(seed).shuffle(ring)
    half = degree // 2
    graph: dict[str, tuple[str, ...]] = {}
    for i, site in enumerate(ring):
        near = {ring[(i + j) % n] for j in range(-half, half + 1) if j}
        graph[site] = tuple(sorted(near))
    return dict(sorted(graph.items()))


@dataclass(frozen=True)
class RoundSetup:
    """What the server tells every site of the round before step 1."""

    session: bytes
    """Unique per job and round: every key, mask and message is bound to it, so nothing carries over."""
    params: SecAggParams
    neighbours: Mapping[str, tuple[str, ...]]

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(sorted(self.neighbours))


def _connected(sites: Collection[str], neighbours: Mapping[str, tuple[str, ...]]) -> bool:
    """Whether `sites` form one piece of the neighbour graph, counting only edges between them."""
    members = set(sites)
    if not members:
        return True
    start = min(members)
    seen, todo = {start}, [start]
    while todo:
        for v in neighbours[todo.pop()]:
            if v in members and v not in seen:
                seen.add(v)
                todo.append(v)
    return seen == members


def setup_round(session: bytes, sites: Sequence[str], params: SecAggParams, graph_seed: int) -> RoundSetup:
    """Check the parameters for these sites and draw the neighbour graph."""
    if not session:
        raise ValueError("the session id must not be empty")
    check_params(params, len(sites))
    return RoundSetup(session, params, neighbour_graph(sites, params.degree, graph_seed))


def _frame(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different part lists give the same bytes."""
    return b"".join(struct.pack("<H", len(p)) + p for p in parts)


def _derive(secret: bytes, purpose: str, session: bytes, *names: str) -> bytes:
    info = _LABEL + _frame(purpose.encode(), session, *(n.encode() for n in names))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _prg(key: bytes, length: int, params: SecAggParams) -> np.ndarray:
    """`length` pseudorandom values mod 2^k: the AES-256-CTR keystream of `key` (fresh per session and pair)."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(length * params.dtype.itemsize)) + encryptor.finalize()
    values = np.frombuffer(stream, dtype=params.dtype.newbyteorder("<")).astype(params.dtype)
    values &= params.dtype.type(params.mask)
    return values


def _agree(private: X25519PrivateKey, public: bytes, whose: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise PrivacyError(f"secagg: the key advertised by {whose} is not a usable X25519 public key") from None


def _pairwise_mask(secret: bytes, session: bytes, a: str, b: str, length: int, params: SecAggParams) -> np.ndarray:
    low, high = sorted((a, b))
    return _prg(_derive(secret, "pairwise mask", session, low, high), length, params)


def _self_mask(seed: bytes, session: bytes, site: str, length: int, params: SecAggParams) -> np.ndarray:
    return _prg(_derive(seed, "self mask", session, site), length, params)


def _commitment(seed: bytes, session: bytes, site: str) -> bytes:
    return hashlib.sha256(_LABEL + _frame(b"seed commitment", session, site.encode(), seed)).digest()


# -- the messages ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Advertisement:
    """Step 1, site → server → neighbours: the site's two public keys for this round."""

    site: str
    mask_key: bytes
    channel_key: bytes

    def signed_bytes(self, session: bytes) -> bytes:
        """What the site signs with its certificate key so that neighbours know the keys are its own."""
        return _LABEL + _frame(b"advertisement", session, self.site.encode(), self.mask_key, self.channel_key)


@dataclass(frozen=True)
class SharedKeys:
    """Step 2, site → server: the commitment to its seed, and its shares encrypted for each neighbour."""

    site: str
    commitment: bytes
    encrypted_shares: Mapping[str, bytes]
    """Neighbour → nonce | AES-GCM ciphertext of (index, seed share, mask-key share)."""


@dataclass(frozen=True)
class Share:
    """One Shamir share: its index (1..number of the owner's neighbours) and its bytes."""

    index: int
    data: bytes


@dataclass(frozen=True)
class Reveal:
    """Step 4, site → server: shares of the seeds of surviving neighbours, of the mask keys of dropped ones."""

    site: str
    seed_shares: Mapping[str, Share]
    key_shares: Mapping[str, Share]


@dataclass
class SiteState:
    """One site's secrets for one round. Never leaves the site."""

    setup: RoundSetup
    site: str
    mask_private: X25519PrivateKey = field(repr=False)
    channel_private: X25519PrivateKey = field(repr=False)
    seed: bytes = field(default=b"", repr=False)
    adverts: dict[str, Advertisement] = field(default_factory=dict)
    held: dict[str, tuple[Share, Share]] = field(default_factory=dict, repr=False)
    """Owner → (its seed share, its mask-key share) as received in step 3."""
    revealed: bool = False

    @property
    def neighbours(self) -> tuple[str, ...]:
        return self.setup.neighbours[self.site]


# -- the site's steps ------------------------------------------------------------------------------


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def session_of(job_id: str, task_id: str) -> bytes:
    """The session id of a job's round, which every site computes for itself: unique per job, round and
    attempt (task ids carry both), so no key, mask or share carries over between rounds."""
    return hashlib.sha256(_LABEL + _frame(b"session", job_id.encode(), task_id.encode())).digest()


def graph_seed(session: bytes) -> int:
    """The neighbour graph's seed, from the session: the server does not choose it."""
    return int.from_bytes(session[:8], "little")


def masked_names(layout: Layout) -> list[str]:
    """The tensors a masked update carries, in the order of its vector: the floating point ones (integer
    tensors are not aggregated: the global model keeps their values)."""
    return sorted(name for name, spec in layout.items() if np.dtype(spec.dtype).kind == "f")


def vector_length(layout: Layout) -> int:
    return sum(math.prod(layout[name].shape) for name in masked_names(layout))


def fresh_keys(site: str) -> tuple[X25519PrivateKey, X25519PrivateKey, Advertisement]:
    """Step 1 before the round's setup is known: the mask and channel key pairs and their advertisement."""
    mask_private, channel_private = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    return mask_private, channel_private, Advertisement(site, _raw_public(mask_private), _raw_public(channel_private))


def advertise(setup: RoundSetup, site: str) -> tuple[SiteState, Advertisement]:
    """Step 1: fresh key pairs for this round."""
    if site not in setup.neighbours:
        raise PrivacyError(f"secagg: {site} is not one of this round's sites")
    state = SiteState(setup, site, X25519PrivateKey.generate(), X25519PrivateKey.generate())
    return state, Advertisement(site, _raw_public(state.mask_private), _raw_public(state.channel_private))


def _channel_key(state: SiteState, peer: Advertisement) -> bytes:
    secret = _agree(state.channel_private, peer.channel_key, peer.site)
    low, high = sorted((state.site, peer.site))
    return _derive(secret, "share channel", state.setup.session, low, high)


def _share_aad(session: bytes, sender: str, recipient: str) -> bytes:
    return _LABEL + _frame(b"shares", session, sender.encode(), recipient.encode())


def share_keys(state: SiteState, adverts: Mapping[str, Advertisement]) -> SharedKeys:
    """Step 2: split the seed and the mask key among the neighbours that advertised keys."""
    t = state.setup.params.threshold
    peers = sorted(v for v in state.neighbours if v in adverts)
    if len(peers) < t:
        raise PrivacyError(
            f"secagg: only {len(peers)} of {state.site}'s neighbours advertised keys, fewer than the threshold "
            f"{t}; the round cannot go on without exposing its secrets"
        )
    for v in peers:
        if adverts[v].site != v:
            raise PrivacyError(f"secagg: the advertisement relayed as {v}'s names {adverts[v].site}")
    state.adverts = {v: adverts[v] for v in peers}
    state.seed = os.urandom(SEED_BYTES)
    key = state.mask_private.private_bytes_raw()
    seed_shares = Shamir.split(t, len(peers), state.seed)
    low_shares = Shamir.split(t, len(peers), key[:16])
    high_shares = Shamir.split(t, len(peers), key[16:])
    encrypted = {}
    for v, (index, s), (_, lo), (_, hi) in zip(peers, seed_shares, low_shares, high_shares, strict=True):
        nonce = os.urandom(_NONCE_BYTES)
        aad = _share_aad(state.setup.session, state.site, v)
        plaintext = _SHARE_PLAINTEXT.pack(index, s, lo, hi)
        encrypted[v] = nonce + AESGCM(_channel_key(state, adverts[v])).encrypt(nonce, plaintext, aad)
    return SharedKeys(state.site, _commitment(state.seed, state.setup.session, state.site), encrypted)


def _open_shares(state: SiteState, sender: str, blob: bytes) -> tuple[Share, Share]:
    if sender not in state.adverts:
        raise PrivacyError(f"secagg: {state.site} got shares from {sender}, which is not a neighbour that advertised")
    nonce, ciphertext = blob[:_NONCE_BYTES], blob[_NONCE_BYTES:]
    try:
        plaintext = AESGCM(_channel_key(state, state.adverts[sender])).decrypt(
            nonce, ciphertext, _share_aad(state.setup.session, sender, state.site)
        )
        index, seed_share, low, high = _SHARE_PLAINTEXT.unpack(plaintext)
    except (InvalidTag, struct.error):
        raise PrivacyError(f"secagg: the shares {sender} sent to {state.site} were altered or are not for it") from None
    return Share(index, seed_share), Share(index, low + high)


def mask(state: SiteState, quantized: np.ndarray, received: Mapping[str, bytes]) -> np.ndarray:
    """Step 3: the masked update y, given the quantized update and the shares the neighbours sent it.

    The neighbours whose shares arrived are the ones this site masks against: exactly the sites the server
    saw finish step 2, so the server knows which pairwise masks are in y.
    """
    params = state.setup.params
    if not state.seed:
        raise PrivacyError("secagg: step 3 before step 2 (no seed)")
    quantized = np.asarray(quantized)
    if quantized.dtype != params.dtype or quantized.ndim != 1:
        raise PayloadError(f"secagg: the quantized update must be a 1-d {params.dtype} vector, got {quantized.dtype}")
    if len(received) < params.threshold:
        raise PrivacyError(
            f"secagg: only {len(received)} of {state.site}'s neighbours shared keys, fewer than the threshold "
            f"{params.threshold}"
        )
    state.held = {sender: _open_shares(state, sender, blob) for sender, blob in sorted(received.items())}
    session, length = state.setup.session, quantized.size
    masked = quantized & params.dtype.type(params.mask)
    masked += _self_mask(state.seed, session, state.site, length, params)
    for v in sorted(state.held):
        pair = _pairwise_mask(
            _agree(state.mask_private, state.adverts[v].mask_key, v), session, state.site, v, length, params
        )
        if state.site < v:
            masked += pair
        else:
            masked -= pair
    masked &= params.dtype.type(params.mask)
    return masked


def reveal(state: SiteState, survivors: Collection[str], dropped: Collection[str]) -> Reveal:
    """Step 4: for each neighbour it holds shares of, the seed share if it survived, the key share if not.

    Refuses a second request in the same round, a survivor list shorter than the threshold, a site on both
    lists, and a neighbour on neither: each could let the server have both secrets of one site. Refuses
    survivors that fall apart in the neighbour graph: the server would learn each part's sum.
    """
    t = state.setup.params.threshold
    if state.revealed:
        raise PrivacyError(f"secagg: {state.site} already answered the unmasking request of this round")
    alive, gone = set(survivors), set(dropped)
    if state.site not in alive:
        raise PrivacyError(f"secagg: {state.site} is asked to unmask but is not on the survivor list")
    if alive & gone:
        raise PrivacyError(f"secagg: {', '.join(sorted(alive & gone))} both survived and dropped, says the server")
    if len(alive) < t:
        raise PrivacyError(f"secagg: only {len(alive)} sites survived, fewer than the threshold {t}")
    unknown = sorted(set(state.held) - alive - gone)
    if unknown:
        raise PrivacyError(f"secagg: the server says neither whether {', '.join(unknown)} survived nor dropped")
    if not alive <= set(state.setup.neighbours) or not _connected(alive, state.setup.neighbours):
        raise PrivacyError(_SPLIT)
    state.revealed = True
    return Reveal(
        state.site,
        seed_shares={v: shares[0] for v, shares in state.held.items() if v in alive},
        key_shares={v: shares[1] for v, shares in state.held.items() if v in gone},
    )


# -- the server's step -----------------------------------------------------------------------------


def _collect(
    reveals: Iterable[Reveal], setup: RoundSetup, survivors: set[str], dropped: set[str]
) -> tuple[dict[str, dict[int, bytes]], dict[str, dict[int, bytes]]]:
    seeds: dict[str, dict[int, bytes]] = {u: {} for u in survivors}
    keys: dict[str, dict[int, bytes]] = {v: {} for v in dropped}
    seen = set()
    for r in reveals:
        if r.site not in survivors or r.site in seen:
            raise PrivacyError(f"secagg: an unmasking answer from {r.site}, which is not a survivor or answered twice")
        seen.add(r.site)
        for kind, shares, owners, size, out in (
            ("seed", r.seed_shares, survivors, SEED_BYTES, seeds),
            ("mask-key", r.key_shares, dropped, KEY_BYTES, keys),
        ):
            for owner, share in shares.items():
                if owner not in owners or owner not in setup.neighbours[r.site]:
                    raise PrivacyError(f"secagg: {r.site} sent a {kind} share of {owner}, which it may not hold")
                n_peers = len(setup.neighbours[owner])
                if not _is_int(share.index) or not 1 <= share.index <= n_peers or len(share.data) != size:
                    raise PrivacyError(f"secagg: the {kind} share of {owner} from {r.site} is malformed")
                if share.index in out[owner]:
                    raise PrivacyError(f"secagg: two {kind} shares of {owner} carry the same index {share.index}")
                out[owner][share.index] = bytes(share.data)
    return seeds, keys


def _combine(shares: dict[int, bytes], t: int, what: str, owner: str) -> list[bytes]:
    if len(shares) < t:
        raise PrivacyError(
            f"secagg: cannot unmask: only {len(shares)} of the {t} shares needed to recover {owner}'s {what} "
            f"arrived; the round cannot be aggregated"
        )
    width = len(next(iter(shares.values())))
    return [
        Shamir.combine([(index, data[start : start + 16]) for index, data in sorted(shares.items())])
        for start in range(0, width, 16)
    ]


def unmask(
    setup: RoundSetup,
    adverts: Mapping[str, Advertisement],
    commitments: Mapping[str, bytes],
    masked: Mapping[str, np.ndarray],
    reveals: Iterable[Reveal],
) -> np.ndarray:
    """Step 4 at the server: the exact sum mod 2^k of the survivors' quantized updates, or PrivacyError.

    `commitments` holds the commitment of every site whose step-2 message arrived, `masked` the vector of
    every survivor. Nothing partial is returned: the sum is either exact or refused.
    """
    params = setup.params
    vectors = [np.asarray(masked[u]) for u in sorted(masked)]
    length = vectors[0].size if vectors else 0
    if any(v.dtype != params.dtype or v.ndim != 1 or v.size != length for v in vectors):
        raise PayloadError(f"secagg: masked updates must all be 1-d {params.dtype} vectors of {length} values")
    total = np.zeros(length, dtype=params.dtype)
    for vector in vectors:
        total += vector
    return unmask_total(setup, adverts, commitments, set(masked), total, reveals)


def unmask_total(
    setup: RoundSetup,
    adverts: Mapping[str, Advertisement],
    commitments: Mapping[str, bytes],
    survivors: Collection[str],
    total: np.ndarray,
    reveals: Iterable[Reveal],
) -> np.ndarray:
    """`unmask` for a server that added the survivors' masked vectors as they arrived (mod 2^k, O(model)
    memory): `total` is that sum, `survivors` the sites whose vectors are in it."""
    params, session, t = setup.params, setup.session, setup.params.threshold
    shared, alive = set(commitments), set(survivors)
    if not alive <= shared:
        raise PrivacyError(f"secagg: masked updates from {', '.join(sorted(alive - shared))}, who shared no keys")
    if len(alive) < t:
        raise PrivacyError(f"secagg: only {len(alive)} sites survived, fewer than the threshold {t}")
    if not _connected(alive, setup.neighbours):
        raise PrivacyError(_SPLIT)
    if not shared <= set(adverts):
        raise PrivacyError(f"secagg: no advertised keys of {', '.join(sorted(shared - set(adverts)))}")
    dropped = shared - alive
    total = np.asarray(total)
    if total.dtype != params.dtype or total.ndim != 1:
        raise PayloadError(f"secagg: the masked sum must be a 1-d {params.dtype} vector")
    length = total.size
    seeds, keys = _collect(reveals, setup, alive, dropped)
    total = total.copy()
    for u in sorted(alive):
        seed = _combine(seeds[u], t, "self-mask seed", u)[0]
        if not hmac.compare_digest(_commitment(seed, session, u), commitments[u]):
            raise PrivacyError(
                f"secagg: the shares of {u}'s self-mask seed do not match its commitment: one was altered"
            )
        total -= _self_mask(seed, session, u, length, params)
    for v in sorted(dropped):
        private = X25519PrivateKey.from_private_bytes(b"".join(_combine(keys[v], t, "mask key", v)))
        if _raw_public(private) != adverts[v].mask_key:
            raise PrivacyError(f"secagg: the shares of {v}'s mask key do not give its advertised key: one was altered")
        for u in sorted(alive & set(setup.neighbours[v])):
            pair = _pairwise_mask(_agree(private, adverts[u].mask_key, u), session, u, v, length, params)
            if u < v:  # u added the mask, v (gone) would have subtracted it
                total -= pair
            else:
                total += pair
    total &= params.dtype.type(params.mask)
    return total


# -- the masked vector on the wire -----------------------------------------------------------------


def encode_masked(vector: np.ndarray, params: SecAggParams) -> bytes:
    """A masked vector as little-endian unsigned integers, 4 or 8 bytes per value."""
    return np.asarray(vector, dtype=params.dtype).astype(params.dtype.newbyteorder("<")).tobytes()


def decode_masked(data: bytes, params: SecAggParams, length: int, what: str = "masked update") -> np.ndarray:
    """The vector `encode_masked` wrote; PayloadError unless it has `length` values, each below 2^k."""
    if len(data) != length * params.dtype.itemsize:
        raise PayloadError(f"{what}: {len(data)} bytes, expected {length} values of {params.dtype.itemsize} bytes")
    vector = np.frombuffer(data, dtype=params.dtype.newbyteorder("<")).astype(params.dtype)
    if length and int(vector.max()) > params.mask:
        raise PayloadError(f"{what}: a value above 2^{params.modulus_bits} - 1")
    return vector


# -- the whole round in memory ---------------------------------------------------------------------


def aggregate_in_memory(
    updates: Mapping[str, np.ndarray],
    params: SecAggParams,
    *,
    session: bytes = b"in-memory round",
    graph_seed: int = 0,
    dropped: Collection[str] = (),
    silent: Collection[str] = (),
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, int]:
    """Run one round over float vectors in memory, the steps in the order the daemons run them.

    `dropped` sites go through steps 1-3 but their masked update never reaches the server; `silent` sites
    deliver their masked update but not their step-4 answer. Returns the sum of the survivors' updates
    (within the quantization error) and how many survived; PrivacyError when the round cannot be unmasked.
    """
    setup = setup_round(session, list(updates), params, graph_seed)
    states, adverts = {}, {}
    for site in setup.sites:
        states[site], adverts[site] = advertise(setup, site)
    shared = {site: share_keys(states[site], {v: adverts[v] for v in states[site].neighbours}) for site in setup.sites}
    inbox: dict[str, dict[str, bytes]] = {site: {} for site in setup.sites}
    for message in shared.values():
        for recipient, blob in message.encrypted_shares.items():
            inbox[recipient][message.site] = blob
    masked = {}
    for site in setup.sites:
        vector = mask(states[site], quantize(updates[site], params, rng), inbox[site])
        if site not in dropped:
            masked[site] = vector
    survivors = sorted(masked)
    gone = sorted(set(setup.sites) - set(masked))
    reveals = [reveal(states[site], survivors, gone) for site in survivors if site not in silent]
    commitments = {site: message.commitment for site, message in shared.items()}
    total = unmask(setup, adverts, commitments, masked, reveals)
    return dequantize_sum(total, len(survivors), params), len(survivors)
