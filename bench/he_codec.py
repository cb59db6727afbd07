"""What CKKS encryption costs an update of the 670K-parameter MLP (784-512-512-10), and how exact it is.

    python bench/he_codec.py [--sites 4] [--repeat 3] [--sweep] [--no-concurrent | --concurrent-only]

For fedgrid's default parameters and, in the same run, TenSEAL's CKKS vectors as NVIDIA FLARE uses them
(one value per slot, N=8192, primes [60, 40, 40], scale 2^40, public-key encryption), it
prints the parameters, the plaintext float32 bytes against the encrypted update's bytes, the
aggregate's bytes, the seconds to encrypt one update, to fold one update into the server's sum, to
serialize the aggregate and to decrypt it, and the largest absolute error of the decrypted mean
against the float64 weighted mean (for realistic sample counts, and for one batch of 64 per site).

Timings are CPU seconds of one process (best of --repeat), so that other load on the machine does not
blur them. Then, unless --no-concurrent, the same four site processes run at once on this machine's
cores, as in a one-machine trial: the wall time of the encryption phase (all sites encrypting), the
server's work on the last update and the aggregate, and the decryption phase (all sites decrypting),
against the same phases with plaintext safetensors. --sweep adds the parameter alternatives the
defaults were chosen from.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedgrid import he, tensors  # noqa: E402

LAYERS = [(784, 512), (512, 512), (512, 10)]
REALISTIC_COUNTS = [60000, 15000, 6000, 1000]


def mlp_update(seed: int) -> dict[str, np.ndarray]:
    """A state dict shaped like the MLP, with values like a trained one (weights ~0.1, Kaiming-like)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for index, (fan_in, fan_out) in enumerate(LAYERS, start=1):
        bound = 1.0 / np.sqrt(fan_in)
        arrays[f"fc{index}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32) * 2.5
        arrays[f"fc{index}.bias"] = rng.uniform(-bound, bound, fan_out).astype(np.float32)
    return arrays


def cpu_best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Best CPU time of `repeat` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.process_time()
        result = fn()
        best = min(best, time.process_time() - start)
    return best, result


def weighted_mean(sites: list[dict[str, np.ndarray]], counts: list[int]) -> dict[str, np.ndarray]:
    total = float(sum(counts))
    return {
        name: sum(site[name].astype(np.float64) * n for site, n in zip(sites, counts, strict=True)) / total
        for name in sites[0]
    }


def measure(
    label: str,
    params: he.HEParams,
    sites: list[dict[str, np.ndarray]],
    counts: list[int],
    repeat: int,
) -> dict[str, float]:
    plain_bytes = sum(a.nbytes for a in sites[0].values())
    start = time.process_time()
    secret, public = he.create_contexts(params)
    keygen = time.process_time() - start
    site_ctx = he.HEContext.load(secret, expect_secret_key=True)
    server_ctx = he.HEContext.load(public, expect_secret_key=False)
    print(f"\n== {label}: {params.describe()}")
    print(f"   context files: site {len(secret):,} B, server {len(public):,} B (created in {keygen:.2f} s)")

    figures: dict[str, float] = {}
    for weights, name in ((counts, "realistic"), ([64] * len(sites), "one batch")):
        enc_times, updates = [], []
        for site, n in zip(sites, weights, strict=True):
            seconds, pieces = cpu_best(lambda site=site, n=n: list(he.encrypt_update(site_ctx, site, n)), repeat)
            enc_times.append(seconds)
            updates.append(b"".join(pieces))
        add_times = []
        total = he.EncryptedSum(server_ctx, tensors.layout_of(sites[0]))
        for update in updates:
            start = time.process_time()
            total.add([update])
            add_times.append(time.process_time() - start)
        ser_time, aggregate = cpu_best(lambda total=total: b"".join(total.serialize()), repeat)
        dec_time, mean = cpu_best(lambda aggregate=aggregate: he.decrypt_mean(site_ctx, [aggregate]), repeat)
        reference = weighted_mean(sites, weights)
        error = max(float(np.abs(mean[k].astype(np.float64) - reference[k]).max()) for k in reference)
        fp32_floor = max(float(np.abs(reference[k].astype(np.float32) - reference[k]).max()) for k in reference)
        if name == "realistic":
            update_bytes = float(np.mean([len(u) for u in updates]))
            print(f"   plaintext update  {plain_bytes:>12,} B (float32)")
            print(f"   encrypted update  {update_bytes:>12,.0f} B   ratio {update_bytes / plain_bytes:.2f}x")
            print(f"   aggregate         {len(aggregate):>12,} B   ratio {len(aggregate) / plain_bytes:.2f}x")
            print(
                f"   encrypt {np.mean(enc_times):.3f} s/update   server add {np.mean(add_times):.3f} s/update   "
                f"aggregate serialize {ser_time:.3f} s   decrypt {dec_time:.3f} s   (CPU s)"
            )
            figures.update(
                ratio=update_bytes / plain_bytes,
                enc=float(np.mean(enc_times)),
                add=float(np.mean(add_times)),
                ser=ser_time,
                dec=dec_time,
            )
        print(
            f"   max |error| of the mean, {name} counts {weights} (total {sum(weights)}): {error:.2e}   "
            f"(estimate bound {params.error_bound(sum(weights)):.1e}; float32 rounding alone {fp32_floor:.1e})"
        )
        figures[f"err_{name}"] = error
    return figures


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence what C++ code writes to standard output."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def measure_tenseal_vectors(sites: list[dict[str, np.ndarray]], counts: list[int], repeat: int) -> None:
    """The baseline as NVIDIA FLARE uses TenSEAL: its documented API, one CKKS vector per layer (real
    slots: one value per slot), N=8192, primes [60, 40, 40], scale 2^40, public-key encryption."""
    import tenseal as ts

    plain_bytes = sum(a.nbytes for a in sites[0].values())
    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40])
    context.global_scale = 2.0**40
    server = ts.context_from(context.serialize(save_secret_key=False))
    print("\n== baseline: TenSEAL's CKKS vectors as FLARE uses them: N=8192, primes 60+40+40, scale 2^40, public key")

    def encrypt(site: dict[str, np.ndarray], n: int) -> list[bytes]:
        with quiet_stdout():  # TenSEAL prints a warning per vector larger than one ciphertext
            return [ts.ckks_vector(context, (site[k].ravel() * n).tolist()).serialize() for k in sorted(site)]

    enc_times, updates = [], []
    for site, n in zip(sites, counts, strict=True):
        seconds, update = cpu_best(lambda site=site, n=n: encrypt(site, n), repeat)
        enc_times.append(seconds)
        updates.append(update)
    start = time.process_time()
    total = [ts.ckks_vector_from(server, part) for part in updates[0]]
    for update in updates[1:]:
        total = [a + ts.ckks_vector_from(server, part) for a, part in zip(total, update, strict=True)]
    add_time = (time.process_time() - start) / len(updates)
    ser_time, aggregate = cpu_best(lambda: [v.serialize() for v in total], repeat)
    dec_time, _ = cpu_best(lambda: [ts.ckks_vector_from(context, part).decrypt() for part in aggregate], repeat)
    update_bytes = float(np.mean([sum(map(len, u)) for u in updates]))
    print(f"   plaintext update  {plain_bytes:>12,} B (float32)")
    print(f"   encrypted update  {update_bytes:>12,.0f} B   ratio {update_bytes / plain_bytes:.2f}x")
    print(
        f"   encrypt {np.mean(enc_times):.3f} s/update   server add {add_time:.3f} s/update   "
        f"aggregate serialize {ser_time:.3f} s   decrypt {dec_time:.3f} s   (CPU s)"
    )


# -- four sites at once ----------------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _worker_init(secret: bytes, sites: list[dict[str, np.ndarray]]) -> None:
    _STATE["ctx"] = he.HEContext.load(secret) if secret else None
    _STATE["sites"] = sites


def _site_encrypt(job: tuple[int, int, bool, Any]) -> tuple[int, float, float, bytes]:
    index, count, encrypted, barrier = job
    barrier.wait()
    start = time.perf_counter()
    if encrypted:
        data = b"".join(he.encrypt_update(_STATE["ctx"], _STATE["sites"][index], count))
    else:
        data = tensors.encode(_STATE["sites"][index])
    return index, start, time.perf_counter(), data


def _site_decrypt(job: tuple[bytes, bool, Any]) -> tuple[float, float]:
    payload, encrypted, barrier = job
    barrier.wait()
    start = time.perf_counter()
    if encrypted:
        he.decrypt_mean(_STATE["ctx"], [payload])
    else:
        tensors.decode(payload)
    return start, time.perf_counter()


def concurrent_round(params: he.HEParams | None, sites: list[dict[str, np.ndarray]], counts: list[int]) -> dict:
    """Wall seconds of the phases of a round that encryption changes, every site a process on this machine.

    Without params: the plaintext path (safetensors, fedserver's WeightedMean) for comparison.
    """
    secret, public = he.create_contexts(params) if params else (b"", b"")
    n = len(sites)
    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager, ctx.Pool(n, _worker_init, (secret, sites)) as pool:
        barrier = manager.Barrier(n)
        jobs = [(i, counts[i], params is not None, barrier) for i in range(n)]
        pool.map(_site_encrypt, jobs, chunksize=1)  # warm up
        uploads = sorted(pool.map(_site_encrypt, jobs, chunksize=1), key=lambda u: u[2])  # in arrival order
        encrypt_wall = max(u[2] for u in uploads) - min(u[1] for u in uploads)

        layout = tensors.layout_of(sites[0])
        if params:
            total = he.EncryptedSum(he.HEContext.load(public, expect_secret_key=False), layout)
            fold: Callable[[int, bytes], None] = lambda i, data: total.add([data])  # noqa: E731
            finish: Callable[[], bytes] = lambda: b"".join(total.serialize())  # noqa: E731
        else:
            from fedgrid.tensor_file import ArraySource
            from fedserver.aggregation import WeightedMean

            mean = WeightedMean(layout)
            fold = lambda i, data: mean.add(ArraySource(tensors.decode(data)), counts[i], f"site {i}")  # noqa: E731
            finish = lambda: tensors.encode(mean.result())  # noqa: E731
        for index, _, _, data in uploads[:-1]:
            fold(index, data)
        start = time.perf_counter()  # the last upload is the only one on the critical path
        fold(uploads[-1][0], uploads[-1][3])
        aggregate = finish()
        server_last = time.perf_counter() - start

        jobs = [(aggregate, params is not None, barrier) for _ in range(n)]
        pool.map(_site_decrypt, jobs, chunksize=1)  # warm up
        downloads = pool.map(_site_decrypt, jobs, chunksize=1)
        decrypt_wall = max(end for _, end in downloads) - min(start for start, _ in downloads)
    return {
        "encrypt": encrypt_wall,
        "server": server_last,
        "decrypt": decrypt_wall,
        "total": encrypt_wall + server_last + decrypt_wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sweep", action="store_true", help="also measure the alternatives the defaults came from")
    parser.add_argument("--no-concurrent", action="store_true", help="skip the four-processes-at-once phase")
    parser.add_argument("--concurrent-only", action="store_true", help="only the four-processes-at-once phase")
    args = parser.parse_args()

    sites = [mlp_update(seed) for seed in range(args.sites)]
    counts = (REALISTIC_COUNTS * args.sites)[: args.sites]
    print(
        f"model: MLP {'-'.join(str(i) for i, _ in LAYERS)}-10, {sum(a.size for a in sites[0].values()):,} "
        f"parameters, {args.sites} sites, {os.cpu_count()} cores; TenSEAL {he.TENSEAL_VERSION}"
    )

    configs = [("fedgrid default", he.HEParams())]
    if args.sweep:
        configs += [
            (
                "public-key encryption",
                he.HEParams(encryption="asymmetric", scale_bits=29, max_abs_value=64, max_total_weight=2**18),
            ),
            ("N=4096", he.HEParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(56, 53))),
            ("N=16384", he.HEParams(poly_modulus_degree=16384)),
            ("60-bit data prime", he.HEParams(coeff_mod_bit_sizes=(60, 60), scale_bits=30)),
            (
                "52-bit data prime",
                he.HEParams(coeff_mod_bit_sizes=(52, 52), scale_bits=25, max_abs_value=64, max_total_weight=2**17),
            ),
        ]
    for label, params in [] if args.concurrent_only else configs:
        try:
            params.validate(label)
        except Exception as exc:  # noqa: BLE001 - a sweep row that the validator refuses is a finding too
            print(f"\n== {label}: refused by validation: {exc}")
            continue
        measure(label, params, sites, counts, args.repeat)
    if not args.concurrent_only:
        measure_tenseal_vectors(sites, counts, args.repeat)

    if not args.no_concurrent:
        print(
            f"\n== {args.sites} sites as processes at once on {os.cpu_count()} cores (wall s; "
            "encrypt = every site encrypting, server = fold the last update + serialize, decrypt = every site)"
        )
        plain = concurrent_round(None, sites, counts)
        print(
            f"   plaintext safetensors   encode {plain['encrypt']:.3f}  server {plain['server']:.3f}  "
            f"decode {plain['decrypt']:.3f}  total {plain['total']:.3f}"
        )
        for label, params in configs[:1]:
            phases = concurrent_round(params, sites, counts)
            print(
                f"   {label:<30} encrypt {phases['encrypt']:.3f}  server {phases['server']:.3f}  "
                f"decrypt {phases['decrypt']:.3f}  total {phases['total']:.3f}  "
                f"(+{phases['total'] - plain['total']:.2f} s per round over plaintext)"
            )


if __name__ == "__main__":
    main()
