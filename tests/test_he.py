"""fedgrid.he with real TenSEAL contexts: the weighted mean through ciphertexts, and every refusal.

Most tests use N=4096 (4096 values per ciphertext: two per complex slot) so that small tensor sets still span several
ciphertexts and the suite stays fast; the size test uses the default parameters and the MLP's shape.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct

import numpy as np
import pytest

from fedgrid import he, tensors
from fedgrid.errors import EncryptionError, PayloadError, ProjectFileError
from fedgrid.he import ckks
from fedgrid.he.stream import Reader, read_ciphertext, read_header

SMALL = he.HEParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(56, 40))
SHAPES = {"fc1.weight": (60, 70), "fc1.bias": (60,), "fc2.weight": (4, 60), "fc2.bias": (4,)}  # 4,504 values
WEIGHTS = [60000.0, 1200.0, 350.0, 64.0]
FP32_HALF_ULP = 6e-8  # rounding of a result in (-1, 1) to float32


@pytest.fixture(scope="module")
def contexts() -> tuple[he.HEContext, he.HEContext]:
    secret, public = he.create_contexts(SMALL)
    return he.HEContext.load(secret, expect_secret_key=True), he.HEContext.load(public, expect_secret_key=False)


@pytest.fixture(scope="module")
def site_ctx(contexts: tuple[he.HEContext, he.HEContext]) -> he.HEContext:
    return contexts[0]


@pytest.fixture(scope="module")
def server_ctx(contexts: tuple[he.HEContext, he.HEContext]) -> he.HEContext:
    return contexts[1]


def make_update(seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {name: (rng.standard_normal(shape) * 0.1).astype(np.float32) for name, shape in shapes.items()}
    arrays["bn.num_batches_tracked"] = np.array(3000 + 2**seed, dtype=np.int64)  # above max_abs_value: shifted
    return arrays


def weighted_mean(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {
        name: sum(u[name].astype(np.float64) * w for u, w in zip(updates, weights, strict=True)) / total
        for name in updates[0]
    }


def encrypt(ctx: he.HEContext, arrays: dict[str, np.ndarray], weight: float) -> bytes:
    return b"".join(he.encrypt_update(ctx, arrays, weight))


def pieces(data: bytes, size: int) -> list[bytes]:
    """The same bytes cut differently, as the transport may deliver them."""
    return [data[i : i + size] for i in range(0, len(data), size)]


def records(stream: bytes) -> list[tuple[bytes, bytes]]:
    """Parse the documented stream format: magic, then (tag, uint32 length, body) records."""
    assert stream[:5] == b"FGHE\x02"
    out, pos = [], 5
    while pos < len(stream):
        (length,) = struct.unpack_from("<I", stream, pos + 1)
        out.append((stream[pos : pos + 1], stream[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    return out


def reframe(recs: list[tuple[bytes, bytes]]) -> bytes:
    """Build a well-framed stream with a correct digest around (possibly forged) records."""
    body = b"FGHE\x02" + b"".join(tag + struct.pack("<I", len(data)) + data for tag, data in recs if tag != b"E")
    return body + b"E" + struct.pack("<I", 32) + hashlib.sha256(body).digest()


def assert_mean(result: dict[str, np.ndarray], expected: dict[str, np.ndarray], tolerance: float) -> None:
    assert list(result) == sorted(expected)
    for name, want in expected.items():
        got = result[name]
        assert got.shape == want.shape
        if got.dtype.kind == "f":
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance, err_msg=name)
        else:
            assert got.dtype == np.int64 and got == np.rint(want), name


# -- the weighted mean -------------------------------------------------------------------------------


def test_round_trip_gives_the_weighted_mean(site_ctx: he.HEContext, server_ctx: he.HEContext) -> None:
    updates = [make_update(seed) for seed in range(4)]
    streams = [encrypt(site_ctx, u, w) for u, w in zip(updates, WEIGHTS, strict=True)]
    total = he.EncryptedSum(server_ctx)

    total.add(pieces(streams[0], 1000), what="site-1")  # re-chunked pieces
    total.add(io.BytesIO(streams[1]), what="site-2")  # a spooled file
    total.add(streams[2], what="site-3")  # all at once
    total.add(he.encrypt_update(site_ctx, updates[3], WEIGHTS[3]), what="site-4")  # straight from the encoder
    mean = he.decrypt_mean(site_ctx, pieces(b"".join(total.serialize()), 777))

    assert total.count == 4 and total.total_weight == sum(WEIGHTS)
    # Tolerance: the parameters' own estimate of the largest CKKS error at this total weight (the
    # encryption and decryption noise over the scale, divided by the total weight, with about two
    # bits of margin; bench/he_codec.py measures it) plus float32 rounding of the result (half an
    # ulp: < 6e-8 for |values| < 1). Far below the 1e-6 we promise.
    tolerance = SMALL.error_bound(sum(WEIGHTS)) + FP32_HALF_ULP
    assert tolerance < 1e-7
    assert_mean(mean, weighted_mean(updates, WEIGHTS), tolerance)


def test_one_batch_per_site_is_still_within_1e_6(site_ctx: he.HEContext, server_ctx: he.HEContext) -> None:
    updates = [make_update(seed) for seed in range(4)]
    weights = [64.0] * 4  # the smallest realistic round: one batch each; the error bound grows as 1/total
    total = he.EncryptedSum(server_ctx)
    for update, weight in zip(updates, weights, strict=True):
        total.add(he.encrypt_update(site_ctx, update, weight))
    mean = he.decrypt_mean(site_ctx, total.serialize())
    tolerance = SMALL.error_bound(sum(weights)) + FP32_HALF_ULP  # as above: 5.4e-7 at a total weight of 256
    assert tolerance < 1e-6
    assert_mean(mean, weighted_mean(updates, weights), tolerance)


def test_every_site_decrypts_the_same_model() -> None:
    """Decryption noise (against key recovery) is keyed by the secret context and the stream."""
    secret, _ = he.create_contexts(SMALL)
    site_a, site_b = he.HEContext.load(secret), he.HEContext.load(secret)  # two sites' kits, same file
    update = make_update(5)
    stream = encrypt(site_a, update, 50.0)
    first, again = he.decrypt_mean(site_a, stream), he.decrypt_mean(site_b, pieces(stream, 999))
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    exact = {name: np.asarray(v, dtype=np.float64) for name, v in update.items()}
    assert_mean(first, exact, SMALL.error_bound(50.0) + FP32_HALF_ULP)


def test_single_update_decrypts_to_itself(site_ctx: he.HEContext) -> None:
    update = make_update(7)
    arrays, weight = he.decrypt_update(site_ctx, encrypt(site_ctx, update, 123.0))
    assert weight == 123.0
    assert_mean(arrays, {k: v.astype(np.float64) for k, v in update.items()}, 1e-6)


def test_encryption_streams_in_pieces_and_checks_input_before_the_first(site_ctx: he.HEContext) -> None:
    stream = he.encrypt_update(site_ctx, make_update(0), 10.0)
    first = next(stream)
    assert first.startswith(b"FGHE\x02H") and b"fc1.weight" in first  # the header piece: layout, no values
    rest = list(stream)
    assert len(rest) == 3  # two ciphertexts (2,255 values, 2,048 per ciphertext), then the end record

    with pytest.raises(PayloadError, match="fc1.bias.*NaN"):
        he.encrypt_update(site_ctx, {**make_update(0), "fc1.bias": np.full(60, np.nan, np.float32)}, 10.0)
    with pytest.raises(PayloadError, match="fc1.weight.*max_abs_value"):
        he.encrypt_update(site_ctx, {**make_update(0), "fc1.weight": np.full((60, 70), 300, np.float32)}, 10.0)
    for weight in (0.0, -5.0, float("nan"), SMALL.max_total_weight * 2):
        with pytest.raises(PayloadError, match="sample count"):
            he.encrypt_update(site_ctx, make_update(0), weight)


# -- the server cannot read ------------------------------------------------------------------------


def test_server_context_holds_no_secret_key(site_ctx: he.HEContext, server_ctx: he.HEContext) -> None:
    assert site_ctx.has_secret_key and not server_ctx.has_secret_key
    total = he.EncryptedSum(server_ctx)
    total.add(encrypt(site_ctx, make_update(0), 5.0))
    aggregate = b"".join(total.serialize())

    with pytest.raises(EncryptionError, match="no secret key"):
        he.decrypt_mean(server_ctx, [aggregate])
    with pytest.raises(EncryptionError, match="cannot encrypt"):
        he.encrypt_update(server_ctx, make_update(0), 5.0)
    # Not just our guard: the server's context file holds no key SEAL could decrypt with.
    reader = Reader([aggregate], "aggregate")
    read_header(reader, server_ctx)
    read_ciphertext(reader, server_ctx, 0)  # the ciphertexts load and add there, and that is all
    assert server_ctx.engine.decryptor is None and server_ctx.engine.encryptor is None
    with pytest.raises(ValueError, match="secret key is not valid"):
        ckks.seal.Decryptor(server_ctx.engine.context, ckks.seal.SecretKey())


def test_server_refuses_a_context_file_with_a_secret_key() -> None:
    secret, public = he.create_contexts(SMALL)
    with pytest.raises(EncryptionError, match="never have"):
        he.HEContext.load(secret, expect_secret_key=False)
    with pytest.raises(EncryptionError, match="holds no secret key"):
        he.HEContext.load(public, expect_secret_key=True)
    assert len(public) < 1000 < len(secret)  # parameters only, against a secret key


def test_encrypted_bytes_do_not_contain_the_plaintext(site_ctx: he.HEContext) -> None:
    update = make_update(3)
    stream = encrypt(site_ctx, update, 1.0)
    for name, array in update.items():
        if array.dtype != np.float32:
            continue
        for raw in (array.tobytes(), array.astype(np.float64).tobytes()):
            window = 16  # four float32 values, two float64 values in a row
            runs = {raw[i : i + window] for i in range(0, len(raw) - window + 1, 4)}
            assert not any(run in stream for run in runs), name


# -- refusals leave the sum untouched --------------------------------------------------------------


def good_sum(site_ctx: he.HEContext, server_ctx: he.HEContext) -> tuple[he.EncryptedSum, list, list]:
    updates, weights = [make_update(10), make_update(11)], [300.0, 700.0]
    total = he.EncryptedSum(server_ctx)
    total.add(encrypt(site_ctx, updates[0], weights[0]))
    return total, updates, weights


def finish_and_check(total: he.EncryptedSum, site_ctx: he.HEContext, updates: list, weights: list) -> None:
    """After refusals: the sum still holds exactly the first good update, and takes the second."""
    assert total.count == 1 and total.total_weight == weights[0]
    total.add(encrypt(site_ctx, updates[1], weights[1]))
    assert_mean(he.decrypt_mean(site_ctx, total.serialize()), weighted_mean(updates, weights), 1e-6)


def test_update_from_another_context_is_refused(site_ctx: he.HEContext, server_ctx: he.HEContext) -> None:
    total, updates, weights = good_sum(site_ctx, server_ctx)
    other_secret, _ = he.create_contexts(SMALL)  # same parameters, another provisioning run
    other_params_secret, _ = he.create_contexts(
        he.HEParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(56, 40), scale_bits=27, max_abs_value=128)
    )
    for other in (other_secret, other_params_secret):
        stream = encrypt(he.HEContext.load(other), make_update(12), 100.0)
        with pytest.raises(EncryptionError, match="site-9: encrypted with HE context"):
            total.add(stream, what="site-9")
        # Forge our context id into its header: the parameter fingerprint still tells (or, with equal
        # parameters, the ciphertexts load but the sum would be garbage: the id is what protects it).
        recs = records(stream)
        header = json.loads(recs[0][1])
        header["context_id"] = site_ctx.context_id
        forged = reframe([(b"H", json.dumps(header).encode()), *recs[1:]])
        if other is other_params_secret:
            with pytest.raises(EncryptionError, match="other HE parameters"):
                total.add(forged)
    finish_and_check(total, site_ctx, updates, weights)


def test_corrupted_ciphertexts_are_refused(site_ctx: he.HEContext, server_ctx: he.HEContext) -> None:
    total, updates, weights = good_sum(site_ctx, server_ctx)
    stream = encrypt(site_ctx, make_update(13), 100.0)
    recs = records(stream)
    header, first, second = recs[0], recs[1], recs[2]
    assert [tag for tag, _ in recs] == [b"H", b"C", b"C", b"E"]

    flipped = bytearray(stream)
    flipped[len(stream) // 2] ^= 0x40
    with pytest.raises(PayloadError):
        total.add(bytes(flipped))  # caught by the ciphertext check or the digest, whichever comes first

    garbage = np.random.default_rng(0).bytes(len(second[1]))
    with pytest.raises(PayloadError, match="ciphertext 1 is corrupt or not valid"):
        total.add(reframe([header, first, (b"C", garbage), (b"E", b"")]))

    other_ring = he.HEParams(
        poly_modulus_degree=4096, coeff_mod_bit_sizes=(50, 50), max_abs_value=16, max_total_weight=1 << 14
    )  # valid TenSEAL bytes, another prime
    foreign = records(encrypt(he.HEContext.load(he.create_contexts(other_ring)[0]), make_update(13), 100.0))[1][1]
    with pytest.raises(PayloadError, match="ciphertext 0 is corrupt or not valid"):
        total.add(reframe([header, (b"C", foreign), second, (b"E", b"")]))

    plain, rescaled = ckks.seal.Plaintext(), ckks.seal.Ciphertext()  # a valid ciphertext at another scale
    site_ctx.engine.encoder.encode([0.5] * SMALL.slots, 2.0**30, plain)
    site_ctx.engine.encryptor.encrypt_symmetric(plain, rescaled)
    for odd in (ckks.SealFiles.save(rescaled),):
        with pytest.raises(PayloadError, match="ciphertext 0 does not have the expected form"):
            total.add(reframe([header, (b"C", odd), second, (b"E", b"")]))

    with pytest.raises(PayloadError, match="expected the ciphertext 1 record"):
        total.add(reframe([header, first, (b"E", b"")]))  # a ciphertext missing
    finish_and_check(total, site_ctx, updates, weights)


def test_a_change_seal_accepts_is_caught_by_the_streams_own_digest(
    site_ctx: he.HEContext, server_ctx: he.HEContext
) -> None:
    """An encrypted update carries no transfer digest: its end record is what the server checks."""
    total, updates, weights = good_sum(site_ctx, server_ctx)
    stream = encrypt(site_ctx, make_update(13), 100.0)
    (h, header), first, second, (_, end) = records(stream)
    swapped = reframe([(h, header), second, first])[: -32] + end  # two valid ciphertexts swapped, old digest
    with pytest.raises(PayloadError, match="digest mismatch"):
        total.add(swapped)
    finish_and_check(total, site_ctx, updates, weights)


def test_a_model_is_decrypted_only_under_the_name_its_sender_gave(
    site_ctx: he.HEContext, server_ctx: he.HEContext
) -> None:
    """A global model is named by the digest its stream ends with (the task header carries it, no transfer
    digest): another stream under that name is refused before anything is returned."""
    total, _, _ = good_sum(site_ctx, server_ctx)
    aggregate = b"".join(total.serialize())
    name = aggregate[-32:]
    assert name == hashlib.sha256(aggregate[: -(32 + 5)]).digest()  # the end record: tag, length, digest
    assert he.decrypt_mean(site_ctx, aggregate, digest=name).keys() == make_update(0).keys()
    other = encrypt(site_ctx, make_update(5), 9.0)
    with pytest.raises(PayloadError, match="not the one its sender named"):
        he.decrypt_mean(site_ctx, other, digest=name)


def test_truncated_or_padded_streams_are_refused(site_ctx: he.HEContext, server_ctx: he.HEContext) -> None:
    total, updates, weights = good_sum(site_ctx, server_ctx)
    stream = encrypt(site_ctx, make_update(14), 100.0)
    for cut in (3, 40, len(stream) // 2, len(stream) - 37, len(stream) - 1):
        with pytest.raises(PayloadError, match="ends early"):
            total.add(pieces(stream[:cut], 4096))
    with pytest.raises(PayloadError, match="after the end record"):
        total.add([stream, b"\x00"])
    with pytest.raises(PayloadError, match="not a fedgrid encrypted stream"):
        total.add(b"PK\x03\x04" + stream[4:])
    big = he.HEContext.load(he.create_contexts(he.HEParams())[0])  # N=8192: a full ciphertext twice the bound
    plain, full = ckks.seal.Plaintext(), ckks.seal.Ciphertext()
    big.engine.encoder.encode([0.5] * big.params.slots, 2.0**big.params.scale_bits, plain)
    big.engine.encryptor.encrypt_symmetric(plain, full)
    oversized = ckks.SealFiles.save(full)
    with pytest.raises(PayloadError, match="above the limit"):
        total.add(reframe([records(stream)[0], (b"C", oversized), (b"E", b"")]))
    huge = b"FGHE\x02H" + struct.pack("<I", 1 << 30)
    with pytest.raises(PayloadError, match="above the limit"):
        total.add(huge)  # the length is refused before anything is allocated
    finish_and_check(total, site_ctx, updates, weights)


def test_layout_mismatches_are_refused(site_ctx: he.HEContext, server_ctx: he.HEContext) -> None:
    total, updates, weights = good_sum(site_ctx, server_ctx)
    reshaped = {**make_update(15), "fc1.weight": np.zeros((70, 60), np.float32)}
    with pytest.raises(PayloadError, match="'fc1.weight' has shape \\(70, 60\\), the first update has \\(60, 70\\)"):
        total.add(encrypt(site_ctx, reshaped, 10.0))
    missing = make_update(15)
    del missing["fc2.bias"]
    with pytest.raises(PayloadError, match="missing fc2.bias"):
        total.add(encrypt(site_ctx, missing, 10.0))
    retyped = {**make_update(15), "fc2.bias": np.zeros(4, np.float64)}
    with pytest.raises(PayloadError, match="dtype float64"):
        total.add(encrypt(site_ctx, retyped, 10.0))
    finish_and_check(total, site_ctx, updates, weights)

    with pytest.raises(PayloadError, match="'fc1.weight' has shape \\(70, 60\\), this site's model has"):
        he.decrypt_mean(site_ctx, encrypt(site_ctx, reshaped, 10.0), layout=tensors.layout_of(make_update(0)))

    expected = he.EncryptedSum(server_ctx, tensors.layout_of(make_update(0)))
    with pytest.raises(PayloadError, match="unexpected extra"):
        expected.add(encrypt(site_ctx, {**make_update(0), "extra": np.zeros(3, np.float32)}, 10.0))
    assert expected.count == 0
    expected.add(encrypt(site_ctx, make_update(0), 10.0))
    assert expected.layout == tensors.layout_of(make_update(0))


def test_total_weight_above_the_limit_is_refused(site_ctx: he.HEContext, server_ctx: he.HEContext) -> None:
    total = he.EncryptedSum(server_ctx)
    half = SMALL.max_total_weight * 0.6
    total.add(encrypt(site_ctx, make_update(0), half))
    with pytest.raises(PayloadError, match="above he.max_total_weight"):
        total.add(encrypt(site_ctx, make_update(1), half))
    assert total.count == 1 and total.total_weight == half
    with pytest.raises(PayloadError, match="no encrypted update"):
        he.EncryptedSum(server_ctx).serialize()


# -- context files ---------------------------------------------------------------------------------


def test_context_files_identify_their_pair() -> None:
    secret, public = he.create_contexts(SMALL)
    site, server = he.HEContext.load(secret), he.HEContext.load(public)
    assert site.context_id == server.context_id and len(site.context_id) == 32
    assert site.params == server.params == SMALL
    assert he.HEContext.load(he.create_contexts(SMALL)[1]).context_id != server.context_id

    with pytest.raises(EncryptionError, match="bad magic"):
        he.HEContext.load(b"not a context")
    with pytest.raises(EncryptionError, match="truncated|out of bounds"):
        he.HEContext.load(public[:-10])
    with pytest.raises(EncryptionError, match="unexpected bytes"):
        he.HEContext.load(public + b"x")


# -- parameters ------------------------------------------------------------------------------------

WHERE = "project.yml: he"


def test_default_parameters_are_accepted() -> None:
    params = he.HEParams.from_dict({"enabled": True}, where=WHERE)
    assert params == he.HEParams()
    assert he.HEParams.from_dict(params.to_dict(), where=WHERE) == params
    assert params.data_bits == 56 and sum(params.coeff_mod_bit_sizes) <= he.MAX_COEFF_BITS[8192]
    assert params.error_bound(100) < 2e-6
    flare_style = {
        "poly_modulus_degree": 8192,
        "coeff_mod_bit_sizes": [60, 40, 40],
        "scale_bits": 40,
        "encryption": "asymmetric",
    }
    assert he.HEParams.from_dict(flare_style, where=WHERE).data_bits == 100


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"poly_modulus_degree": 5000}, "poly_modulus_degree"),
        ({"poly_modulus_degree": 2048}, "poly_modulus_degree"),
        ({"poly_modulus_degree": True}, "poly_modulus_degree"),
        ({"coeff_mod_bit_sizes": [56]}, "coeff_mod_bit_sizes"),
        ({"coeff_mod_bit_sizes": "56,56"}, "coeff_mod_bit_sizes"),
        ({"coeff_mod_bit_sizes": [56, 61]}, "coeff_mod_bit_sizes[1]"),
        ({"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [56, 56]}, "128-bit security"),  # 112 > 109
        ({"coeff_mod_bit_sizes": [60, 60, 60, 40]}, "128-bit security"),  # 220 > 218
        ({"scale_bits": 54}, "scale_bits 54 is too large"),
        ({"scale_bits": 30}, "max_abs_value"),  # no headroom left for the weighted sum
        ({"max_total_weight": 1e9}, "max_total_weight"),
        ({"max_abs_value": 1 << 12}, "max_abs_value"),
        ({"scale_bits": 22}, "scale_bits 22 is too small"),
        ({"scale_bits": 26.5}, "scale_bits"),
        ({"max_abs_value": -1}, "max_abs_value"),
        ({"max_total_weight": "many"}, "max_total_weight"),
        ({"encryption": "rsa"}, "encryption"),
        ({"enabled": "yes"}, "enabled"),
        ({"poly_degree": 8192}, "unknown key 'poly_degree'"),
    ],
)
def test_bad_parameters_are_refused_naming_the_key(values: dict, key: str) -> None:
    with pytest.raises(ProjectFileError) as caught:
        he.HEParams.from_dict({"enabled": True, **values}, where=WHERE)
    message = str(caught.value)
    assert message.startswith(f"{WHERE}: ") and key in message and "\n" not in message


def test_a_non_mapping_is_refused() -> None:
    with pytest.raises(ProjectFileError, match="expected a mapping"):
        he.HEParams.from_dict([8192], where=WHERE)  # type: ignore[arg-type]


# -- size ------------------------------------------------------------------------------------------


def test_encrypted_mlp_update_is_at_most_2x_its_float32_bytes() -> None:
    """The 669,706-parameter MLP (784-512-512-10) with the default parameters: 1.90x measured, two values per
    slot in one 56-bit prime, each fresh ciphertext in SEAL's seeded form (a full one would make it 3.8x)."""
    secret, public = he.create_contexts(he.HEParams())
    site = he.HEContext.load(secret)
    rng = np.random.default_rng(0)
    shapes = {
        "fc1.weight": (512, 784),
        "fc1.bias": (512,),
        "fc2.weight": (512, 512),
        "fc2.bias": (512,),
        "fc3.weight": (10, 512),
        "fc3.bias": (10,),
    }
    update = {name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in shapes.items()}
    plain = sum(a.nbytes for a in update.values())
    assert plain == 669_706 * 4
    encrypted = sum(len(piece) for piece in he.encrypt_update(site, update, 60000))
    assert encrypted <= 2 * plain, f"{encrypted / plain:.2f}x"
