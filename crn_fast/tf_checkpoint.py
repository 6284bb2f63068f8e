"""A reader and writer for TensorFlow V2 checkpoints (tensor bundles), without TensorFlow.

A checkpoint ``model.ckpt`` is ``model.ckpt.index`` plus ``model.ckpt.data-SSSSS-of-NNNNN``.
The index is a LevelDB-style sorted table: each key is a variable name and each value a
serialised ``BundleEntryProto`` (dtype, shape, shard, offset, size, crc32c) that says where the
variable's raw little-endian bytes lie in a data shard. The empty key holds a ``BundleHeaderProto``.

Only what the tensor-bundle format uses is implemented: uncompressed table blocks and
the proto fields below. Everything else is reported as a :class:`CheckpointError`.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_LEN = 48  # two BlockHandles padded to 40 bytes + 8-byte magic
BLOCK_TRAILER_LEN = 5  # compression type byte + crc32c

# tensorflow/core/framework/types.proto
TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
             9: np.int64, 10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
NP_TO_TF = {np.dtype(v): k for k, v in TF_DTYPES.items()}


# ---------------------------------------------------------------- varints and protos
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CheckpointError("varint longer than 64 bits")


def _enc_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _proto_fields(buf: bytes):
    """Yield (field_number, wire_type, value) of a serialised protobuf message."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise CheckpointError("truncated protobuf message")
        yield field, wire, val


def _enc_field(field: int, wire: int, payload) -> bytes:
    key = _enc_varint(field << 3 | wire)
    if wire == 0:
        return key + _enc_varint(payload)
    if wire == 2:
        return key + _enc_varint(len(payload)) + payload
    return key + payload  # fixed32 / fixed64 bytes


@dataclass(frozen=True)
class BundleEntry:
    name: str
    dtype: int
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None

    @classmethod
    def parse(cls, name: str, buf: bytes) -> "BundleEntry":
        dtype, shape, shard, offset, size, crc = 0, [], 0, 0, 0, None
        for f, w, v in _proto_fields(buf):
            if f == 1 and w == 0:
                dtype = v
            elif f == 2 and w == 2:
                for sf, sw, sv in _proto_fields(v):
                    if sf == 2 and sw == 2:  # Dim
                        size_ = 0
                        for df, dw, dv in _proto_fields(sv):
                            if df == 1 and dw == 0:
                                size_ = dv
                        shape.append(size_)
            elif f == 3 and w == 0:
                shard = v
            elif f == 4 and w == 0:
                offset = v
            elif f == 5 and w == 0:
                size = v
            elif f == 6 and w == 5:
                crc = struct.unpack("<I", v)[0]
            elif f == 7:
                raise CheckpointError(f"variable {name!r} is stored as slices, which is not supported")
        return cls(name, dtype, tuple(shape), shard, offset, size, crc)

    def serialise(self) -> bytes:
        dims = b"".join(_enc_field(2, 2, _enc_field(1, 0, d)) for d in self.shape)
        out = _enc_field(1, 0, self.dtype) + _enc_field(2, 2, dims)
        if self.shard_id:
            out += _enc_field(3, 0, self.shard_id)
        if self.offset:
            out += _enc_field(4, 0, self.offset)
        out += _enc_field(5, 0, self.size)
        if self.crc32c is not None:
            out += _enc_field(6, 5, struct.pack("<I", self.crc32c))
        return out


# ---------------------------------------------------------------- crc32c (Castagnoli)
def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()
_PURE_PYTHON_CRC_LIMIT = 8 << 20


def _fast_crc32c():
    for mod, fn in (("google_crc32c", "value"), ("crc32c", "crc32c")):
        try:
            m = __import__(mod)
            return getattr(m, fn)
        except (ImportError, AttributeError):
            continue
    return None


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data``: every tensor is checked. ``google-crc32c`` (a dependency of crn_fast)
    does it at ~14 GB/s (the 1024p checkpoint's 400 MB in 0.03 s); without it a pure-Python loop
    does the same, at about 5 MB/s, with a warning for large tensors."""
    fast = _fast_crc32c()
    if fast is not None:
        return int(fast(data)) & 0xFFFFFFFF
    if len(data) > _PURE_PYTHON_CRC_LIMIT:
        import warnings
        warnings.warn(f"checking a {len(data) >> 20} MiB tensor's CRC32C in pure Python (slow): "
                      f"pip install google-crc32c", RuntimeWarning, stacklevel=2)
    crc = 0xFFFFFFFF
    t = _CRC_TABLE
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """LevelDB/TF checksum masking, applied to every stored crc32c."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------- sorted table
def _read_block(data: bytes, offset: int, size: int, path: Path) -> bytes:
    end = offset + size
    if end + BLOCK_TRAILER_LEN > len(data):
        raise CheckpointError(f"{path}: block at {offset}+{size} runs past the end of the file (truncated?)")
    if data[end] != 0:
        raise CheckpointError(f"{path}: compressed table blocks (type {data[end]}) are not supported")
    return data[offset:end]


def _block_entries(block: bytes, path: Path):
    if len(block) < 4:
        raise CheckpointError(f"{path}: table block too short")
    num_restarts = struct.unpack("<I", block[-4:])[0]
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise CheckpointError(f"{path}: corrupt table block")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        if shared > len(key) or pos + non_shared + vlen > limit:
            raise CheckpointError(f"{path}: corrupt table entry")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + vlen]
        pos += vlen


def read_index(index_path: str | os.PathLike) -> tuple[int, dict[str, BundleEntry]]:
    """Parse ``*.index``; returns (num_shards, {name: BundleEntry})."""
    path = Path(index_path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint index {path}: {e.strerror or e}") from None
    if len(data) < FOOTER_LEN or struct.unpack("<Q", data[-8:])[0] != TABLE_MAGIC:
        raise CheckpointError(f"{path} is not a TensorFlow checkpoint index (no table magic number)")
    footer = data[-FOOTER_LEN:]
    _, p = _varint(footer, 0)
    _, p = _varint(footer, p)
    idx_off, p = _varint(footer, p)
    idx_size, p = _varint(footer, p)
    entries: dict[str, BundleEntry] = {}
    num_shards = 1
    for _, handle in _block_entries(_read_block(data, idx_off, idx_size, path), path):
        off, q = _varint(handle, 0)
        size, _ = _varint(handle, q)
        for key, value in _block_entries(_read_block(data, off, size, path), path):
            if key == b"":
                for f, w, v in _proto_fields(value):
                    if f == 1 and w == 0:
                        num_shards = v
                    elif f == 2 and w == 0 and v != 0:
                        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
                continue
            name = key.decode("utf-8", errors="replace")
            entries[name] = BundleEntry.parse(name, value)
    return num_shards, entries


def folder_checkpoints(folder: Path) -> list[Path]:
    """The checkpoint prefixes a TF training folder holds: the one its ``checkpoint`` state file
    names (``model_checkpoint_path: "model.ckpt"``, TF's latest) if it is there, else each
    ``*.index`` in it."""
    state = folder / "checkpoint"
    if state.is_file():
        m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state.read_text(errors="replace"), re.M)
        if m:  # often an absolute path on the machine that trained it: then the same name here
            named = folder / Path(m.group(1))
            for prefix in (named, folder / named.name):
                if prefix.with_name(prefix.name + ".index").is_file():
                    return [prefix]
    return sorted(i.with_name(i.name[: -len(".index")]) for i in folder.glob("*.index"))


def _checkpoint_prefix(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():  # the authors' models/512p: its one checkpoint
        found = folder_checkpoints(p)
        return found[0] if len(found) == 1 else p
    for suffix in (".index",):
        if p.name.endswith(suffix):
            return p.with_name(p.name[: -len(suffix)])
    if ".data-" in p.name:
        return p.with_name(p.name.split(".data-")[0])
    return p


def is_tf_checkpoint(path: str | os.PathLike) -> bool:
    """Does ``path`` name a TF checkpoint (its prefix, its .index or a data shard) rather than a
    file of its own (a file named like the prefix, say model.ckpt beside model.ckpt.index, is
    read as the file it is)?"""
    p = Path(path)
    if p.is_file() and not (p.name.endswith(".index") or ".data-" in p.name):
        return False
    prefix = _checkpoint_prefix(p)
    return prefix.with_name(prefix.name + ".index").is_file()


class TFCheckpoint:
    """Random access to the tensors of a TF V2 checkpoint given its prefix (``.../model.ckpt``)."""

    def __init__(self, path: str | os.PathLike):
        self.prefix = _checkpoint_prefix(path)
        index = self.prefix.with_name(self.prefix.name + ".index")
        if self.prefix.is_dir():
            found = folder_checkpoints(self.prefix)
            raise CheckpointError(f"{self.prefix} is a folder with " + (
                f"{len(found)} TF checkpoints: give one prefix, {' or '.join(map(str, found))}" if found else
                "no TF checkpoint (no *.index file): pass the checkpoint prefix, e.g. '.../model.ckpt' for "
                "model.ckpt.index + model.ckpt.data-00000-of-00001"))
        if not index.exists():
            raise CheckpointError(f"no checkpoint index at {index}: pass the checkpoint prefix, e.g. "
                                  f"'.../model.ckpt' for model.ckpt.index + model.ckpt.data-00000-of-00001")
        self.num_shards, self.entries = read_index(index)

    def shard_path(self, shard_id: int) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard_id:05d}-of-{self.num_shards:05d}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}

    def check_shards(self, names=None) -> None:
        """Fail early, before anything is read or written, if a needed shard is missing or short."""
        names = list(self.entries) if names is None else names
        ends: dict[int, int] = {}
        for n in names:
            e = self.entries[n]
            ends[e.shard_id] = max(ends.get(e.shard_id, 0), e.offset + e.size)
        for shard, end in sorted(ends.items()):
            p = self.shard_path(shard)
            if not p.exists():
                raise CheckpointError(f"missing data shard {p} (the index {self.prefix.name}.index refers to it)")
            have = p.stat().st_size
            if have < end:
                raise CheckpointError(f"data shard {p} is {have} bytes but the index needs {end}: truncated download?")

    def read(self, name: str, verify_crc: bool = True) -> np.ndarray:
        if name not in self.entries:
            raise CheckpointError(f"{self.prefix}: no variable {name!r}")
        e = self.entries[name]
        if e.dtype not in TF_DTYPES:
            raise CheckpointError(f"{name}: unsupported TensorFlow dtype enum {e.dtype}")
        dtype = np.dtype(TF_DTYPES[e.dtype]).newbyteorder("<")
        expect = int(np.prod(e.shape, dtype=np.int64)) * dtype.itemsize
        if expect != e.size:
            raise CheckpointError(f"{name}: index says {e.size} bytes but shape {list(e.shape)} of "
                                  f"{dtype.name} needs {expect}")
        path = self.shard_path(e.shard_id)
        try:
            with open(path, "rb") as f:
                f.seek(e.offset)
                raw = f.read(e.size)
        except OSError as err:
            raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
        if len(raw) != e.size:
            raise CheckpointError(f"{path} ends before variable {name!r} (truncated download?)")
        if verify_crc and e.crc32c is not None:
            got = crc32c(raw)
            if mask_crc(got) != e.crc32c:
                raise CheckpointError(f"{name}: checksum mismatch in {path} (corrupt file)")
        return np.frombuffer(raw, dtype=dtype).reshape(e.shape).astype(dtype.newbyteorder("="))


# ---------------------------------------------------------------- writer
def _table_block(items: list[tuple[bytes, bytes]]) -> bytes:
    # One restart point per entry: keys are stored whole, which any reader accepts.
    out, restarts = bytearray(), []
    for k, v in items:
        restarts.append(len(out))
        out += _enc_varint(0) + _enc_varint(len(k)) + _enc_varint(len(v)) + k + v
    for r in restarts or [0]:
        out += struct.pack("<I", r)
    out += struct.pack("<I", len(restarts or [0]))
    return bytes(out)


def write_checkpoint(prefix: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` as a single-shard TF V2 checkpoint at ``prefix`` (.index + .data)."""
    prefix = Path(prefix)
    data = bytearray()
    items: list[tuple[bytes, bytes]] = []
    header = _enc_field(1, 0, 1) + _enc_field(3, 2, _enc_field(1, 0, 1))  # num_shards=1, version{producer=1}
    items.append((b"", header))
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype not in NP_TO_TF:
            raise CheckpointError(f"{name}: dtype {arr.dtype} cannot be written to a TF checkpoint")
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        crc = crc32c(raw)
        entry = BundleEntry(name, NP_TO_TF[arr.dtype], arr.shape, 0, len(data), len(raw),
                            mask_crc(crc))
        items.append((name.encode(), entry.serialise()))
        data += raw
    block = _table_block(items)
    index = bytearray(block) + b"\x00" + struct.pack("<I", mask_crc(crc32c(block + b"\x00")))
    meta_off = len(index)
    meta = _table_block([])
    index += meta + b"\x00" + struct.pack("<I", mask_crc(crc32c(meta + b"\x00")))
    idx_off = len(index)
    last_key = items[-1][0] + b"\x00"
    idx_block = _table_block([(last_key, _enc_varint(0) + _enc_varint(len(block)))])
    index += idx_block + b"\x00" + struct.pack("<I", mask_crc(crc32c(idx_block + b"\x00")))
    footer = (_enc_varint(meta_off) + _enc_varint(len(meta)) + _enc_varint(idx_off) + _enc_varint(len(idx_block)))
    footer = footer.ljust(40, b"\x00") + struct.pack("<Q", TABLE_MAGIC)
    index += footer
    prefix.with_name(prefix.name + ".data-00000-of-00001").write_bytes(bytes(data))
    prefix.with_name(prefix.name + ".index").write_bytes(bytes(index))
