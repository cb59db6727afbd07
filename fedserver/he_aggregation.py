"""Aggregation of encrypted updates: the server adds CKKS ciphertexts with a context that holds no key.

Each site sends n·x encrypted (its update scaled by its sample count); the running encrypted sum
Σ n·x and the plaintext Σ n go back to the sites, which decrypt and divide. Nothing here can decrypt:
the server's context is loaded with `expect_secret_key=False`, which refuses a file holding a secret key.
"""

from __future__ import annotations

from pathlib import Path

from fedgrid import he, tensors
from fedgrid.errors import PayloadError
from fedgrid.files import write_atomic
from fedgrid.transfer import CKKS_FORMAT
from fedserver.grid import Result
from fedserver.model import CKKS_EXPANSION, MEMORY_LIMIT, Model


def load_context(context: bytes) -> he.HEContext:
    """The job's keyless context, loaded once per job: building SEAL's tables takes ~20 ms of CPU."""
    return he.HEContext.load(context, expect_secret_key=False, where="server he_context.bin")


class EncryptedAggregator:
    """Folds encrypted updates one at a time (memory O(model)); refuses one that does not fit whole."""

    payload_format = CKKS_FORMAT
    grace = 0.0

    def __init__(self, ctx: he.HEContext, layout: tensors.Layout) -> None:
        self.ctx = ctx
        self._sum = he.EncryptedSum(ctx, layout)

    @property
    def count(self) -> int:
        return self._sum.count

    @property
    def total_weight(self) -> float:
        return self._sum.total_weight

    def add(self, result: Result) -> None:
        what = f"update from {result.site}"
        if result.payload_format != CKKS_FORMAT or not result.has_payload:
            raise PayloadError(
                f"{what}: expected an encrypted ({CKKS_FORMAT}) update in an encrypted job, "
                f"got {result.payload_format or 'none'}"
            )
        with result.open() as stream:
            self._sum.add(stream, what=what)

    async def complete(self) -> None:
        """Nothing beyond the ciphertexts."""

    def finish(self, folder: Path, name: str) -> Model:
        """The encrypted sum: bytes when its model would stay in memory in plaintext (then every worker
        is sent it at once, as a plaintext model), else the file `folder/name`."""
        pieces = list(self._sum.serialize())
        if sum(len(piece) for piece in pieces) <= 2 * CKKS_EXPANSION * MEMORY_LIMIT:
            return Model.in_memory(CKKS_FORMAT, b"".join(pieces), self._sum.total_weight)
        write_atomic(folder / name, pieces)
        del pieces
        return Model.on_disk(CKKS_FORMAT, folder / name, self._sum.total_weight)
