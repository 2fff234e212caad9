"""The snapshot codec: a policy's state as data (never pickle), checksummed and optionally signed.

Frame layout (one Kafka message value on the snapshots topic)::

    b"RLS1" | header length (uint32, big-endian) | header (JSON, schemas.Snapshot) | body

The body is the arrays listed in ``header.arrays``, each little-endian, C order, back to back.
``header.sha256`` is the sha256 of the body: equal checksums mean equal learner states.
With a key, ``header.signature`` is HMAC-SHA256 over the header without its signature and the
body; a router with a key refuses a snapshot that is unsigned or wrongly signed.

>>> from router.policy import make_policy
>>> policy = make_policy("decomposed-ts", arms=["a", "b"], dim=8, tau=0.01)
>>> frame = encode_snapshot(policy, version=1, outcomes_offset=-1, key=b"secret")
>>> decoded = decode_snapshot(frame, key=b"secret")
>>> decoded.header.version, decoded.policy().arms
(1, ['a', 'b'])
>>> decode_snapshot(frame, key=b"other")
Traceback (most recent call last):
...
router.snapshot.SnapshotError: bad_signature: the HMAC does not match the configured key
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

import numpy as np
import orjson

from router.policy import DecomposedPolicy, PooledDecomposedPolicy, RoutingPolicy
from schemas import ArraySpec, Snapshot
from schemas.settings import Settings

MAGIC = b"RLS1"
_LENGTH = struct.Struct(">I")
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024

#: Policy classes that snapshots may name; nothing else is ever constructed from a snapshot.
_POLICY_CLASSES: dict[str, type[RoutingPolicy]] = {
    "pooled-ucb": PooledDecomposedPolicy,
    "pooled-ts": PooledDecomposedPolicy,
    "decomposed-ts": DecomposedPolicy,
    "decomposed-ucb": DecomposedPolicy,
}


class SnapshotError(ValueError):
    """A snapshot that must not be applied; ``reason`` is a machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class DecodedSnapshot:
    header: Snapshot
    arrays: dict[str, np.ndarray]

    def policy(self, seed: int | None = None) -> RoutingPolicy:
        """The policy this snapshot holds (a fresh object: swap it in atomically)."""
        cls = _POLICY_CLASSES[self.header.policy]
        policy = cls.from_state(self.header.arms, self.header.dim, self.header.params,
                                self.arrays, self.header.n_updates, seed=seed)
        policy.name = self.header.policy
        return policy


def _signature(key: bytes, header: Snapshot, body_sha256: str) -> str:
    unsigned = orjson.dumps(header.model_dump(mode="json", exclude={"signature"}),
                            option=orjson.OPT_SORT_KEYS)
    return hmac.new(key, unsigned + body_sha256.encode(), hashlib.sha256).hexdigest()


def encode_snapshot(policy: RoutingPolicy, version: int, outcomes_offset: int,
                    key: bytes | None = None, created_at: float | None = None) -> bytes:
    """Encode ``policy``'s state as a snapshot frame."""
    specs, chunks = [], []
    for name, array in policy.arrays().items():
        dtype = "<i8" if np.issubdtype(array.dtype, np.integer) else "<f8"
        data = np.ascontiguousarray(array, dtype=dtype)
        specs.append(ArraySpec(name=name, dtype=dtype, shape=list(data.shape)))
        chunks.append(data.tobytes())
    body = b"".join(chunks)
    header = Snapshot(
        version=version, policy=policy.name, arms=policy.arms, dim=policy.dim,
        outcomes_offset=outcomes_offset, n_updates=policy.n_updates, params=policy.params(),
        arrays=specs, sha256=hashlib.sha256(body).hexdigest(),
        **({"created_at": created_at} if created_at is not None else {}),
    )
    if key is not None:
        header = header.model_copy(update={"signature": _signature(key, header, header.sha256)})
    head = orjson.dumps(header.model_dump(mode="json", exclude_none=True))
    return MAGIC + _LENGTH.pack(len(head)) + head + body


def verification_keys(settings: Settings) -> tuple[bytes, ...]:
    """The keys a snapshot may be signed with: the current one and, during a rotation, the previous.

    Empty when no key is configured (snapshots are then checked by their sha256 only).
    """
    if not settings.snapshot_key:
        return ()
    return tuple(k.encode() for k in (settings.snapshot_key, settings.snapshot_previous_key) if k)


def decode_snapshot(frame: bytes | None, key: bytes | tuple[bytes, ...] | None = None) -> DecodedSnapshot:
    """Decode and verify a frame; raise :class:`SnapshotError` if it must not be applied.

    ``key`` is the signing key, or several accepted keys (see :func:`verification_keys`).
    """
    if frame is None or len(frame) < 8 or frame[:4] != MAGIC:
        raise SnapshotError("bad_frame", "not a routeloop snapshot frame")
    if len(frame) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError("too_large", f"{len(frame)} bytes")
    (head_len,) = _LENGTH.unpack_from(frame, 4)
    if 8 + head_len > len(frame):
        raise SnapshotError("bad_frame", "header runs past the end of the frame")
    try:
        header = Snapshot.model_validate(orjson.loads(frame[8 : 8 + head_len]))
    except ValueError as exc:  # orjson.JSONDecodeError and pydantic's ValidationError
        raise SnapshotError("bad_header", str(exc).splitlines()[0]) from None
    body = memoryview(frame)[8 + head_len :]
    if hashlib.sha256(body).hexdigest() != header.sha256:
        raise SnapshotError("bad_checksum", "the body does not match its sha256")
    keys = (key,) if isinstance(key, bytes) else tuple(key or ())
    if keys:
        if header.signature is None:
            raise SnapshotError("unsigned", "a key is configured and the snapshot is not signed")
        if not any(hmac.compare_digest(header.signature, _signature(k, header, header.sha256)) for k in keys):
            raise SnapshotError("bad_signature", "the HMAC does not match the configured key")
    if header.policy not in _POLICY_CLASSES:
        raise SnapshotError("unknown_policy", header.policy)
    arrays, offset = {}, 0
    for spec in header.arrays:
        count = int(np.prod(spec.shape, dtype=np.int64))
        nbytes = count * 8
        if offset + nbytes > len(body):
            raise SnapshotError("bad_frame", f"array {spec.name} runs past the end of the body")
        arrays[spec.name] = np.frombuffer(body, dtype=spec.dtype, count=count, offset=offset).reshape(spec.shape)
        offset += nbytes
    if offset != len(body):
        raise SnapshotError("bad_frame", f"{len(body) - offset} trailing bytes")
    return DecodedSnapshot(header=header, arrays=arrays)
