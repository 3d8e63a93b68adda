"""Archive uploads cost bounded work: decompression stops at the upload limit (skipped members included),
and a zip's entry count and directory size are checked before zipfile reads its directory."""

from __future__ import annotations

import bz2
import io
import lzma
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from test_store import CONFIG, weights

from service.errors import InvalidUploadError, UploadTooLargeError
from service.store import AdapterStore
from service.store_upload import MAX_ARCHIVE_ENTRIES, MAX_ZIP_DIRECTORY_BYTES, TAR_FRAMING_BYTES

LIMIT = 8 << 20  # max_bytes of the staging call: a refusal must come after about this much, not the whole bomb
JUNK = 128 << 20  # zeros in the bomb: 16x the limit, a few hundred bytes to a few hundred KB compressed
BOUND_S = 3.0  # generous for a loaded 2-core machine; reading the whole bomb took seconds before
FLAT = {"adapter_config.json": CONFIG, "adapter_model.safetensors": weights(1)}
COMPRESSORS: dict[str, tuple[str, Callable[[], object]]] = {
    "bz2": (".tar.bz2", lambda: bz2.BZ2Compressor(9)),
    "gz": (".tar.gz", lambda: zlib.compressobj(9, zlib.DEFLATED, 31)),  # wbits 31: gzip framing
    "xz": (".tar.xz", lambda: lzma.LZMACompressor(preset=1)),
    "xz named .tar": (".tar", lambda: lzma.LZMACompressor(preset=1)),  # tarfile's "r:*" sniffs compression
}


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(tarfile.GNU_FORMAT)


def compressed_tar(make_compressor: Callable[[], object], junk_bytes: int, junk_first: bool = True) -> bytes:
    """A tar holding `junk_bytes` of zeros and the two adapter files, streamed through one compressor
    (one compressed stream, as `tar cjf` writes it) without ever holding the junk in memory."""
    compressor = make_compressor()
    out: list[bytes] = []

    def junk() -> None:
        out.append(compressor.compress(_header("junk.bin", junk_bytes)))
        chunk = bytes(1 << 20)
        for start in range(0, junk_bytes, len(chunk)):
            out.append(compressor.compress(chunk[: junk_bytes - start]))
        out.append(compressor.compress(bytes(-junk_bytes % 512)))

    if junk_first:
        junk()
    for name, data in FLAT.items():
        out.append(compressor.compress(_header(name, len(data)) + data + bytes(-len(data) % 512)))
    if not junk_first:
        junk()
    out.append(compressor.compress(bytes(1024)) + compressor.flush())
    return b"".join(out)


def upload(name: str, data: bytes) -> list[tuple[str, io.BytesIO]]:
    return [(name, io.BytesIO(data))]


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "store")


@pytest.mark.parametrize("junk_first", [True, False], ids=["junk-before-files", "junk-after-files"])
@pytest.mark.parametrize("kind", COMPRESSORS)
def test_tar_bomb_is_refused_after_reading_about_the_limit(store, kind, junk_first) -> None:
    suffix, make = COMPRESSORS[kind]
    bomb = compressed_tar(make, JUNK, junk_first)
    assert len(bomb) < LIMIT // 8  # small on the wire: only the decompressed size gives it away
    start = time.perf_counter()
    with pytest.raises(UploadTooLargeError) as info:
        store.stage_files(upload(f"a{suffix}", bomb), LIMIT)
    assert time.perf_counter() - start < BOUND_S
    assert "extracted archive" in info.value.message
    # Decompression stopped at the limit: the other ~120 MiB of zeros were never produced.
    assert LIMIT < info.value.details["read_bytes"] <= LIMIT + TAR_FRAMING_BYTES + 1
    assert not any(store.staging.iterdir())


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_tar_under_the_limit_is_accepted(store, kind) -> None:
    """Junk members are skipped; files plus tar framing up to the limit are fine."""
    suffix, make = COMPRESSORS[kind]
    staged = store.stage_files(upload(f"a{suffix}", compressed_tar(make, 1 << 20)), LIMIT)
    assert {p.name: p.read_bytes() for p in staged.path.iterdir()} == FLAT
    staged.discard()
    padded = {**FLAT, "adapter_model.safetensors": bytes(LIMIT - len(CONFIG))}  # files total exactly LIMIT
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:bz2") as tf:
        for name, data in padded.items():
            info = tarfile.TarInfo(f"adapter/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    store.stage_files(upload("a.tar.bz2", buf.getvalue()), LIMIT).discard()


def test_truncated_compressed_tar_is_invalid(store) -> None:
    data = compressed_tar(COMPRESSORS["bz2"][1], 1 << 20)
    with pytest.raises(InvalidUploadError, match="cannot read"):
        store.stage_files(upload("a.tar.bz2", data[: len(data) // 2]), LIMIT)
    assert not any(store.staging.iterdir())


def test_tar_with_many_members_stops_at_the_member_limit(store) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for i in range(5_000):
            tf.addfile(tarfile.TarInfo(f"f{i}"), io.BytesIO(b""))
    with pytest.raises(InvalidUploadError, match="entries"):
        store.stage_files(upload("a.tgz", buf.getvalue()), LIMIT)
    assert not any(store.staging.iterdir())


# ---- zip: the directory is bounded before zipfile reads it --------------------------------------------------


@pytest.fixture
def zipfile_spy(monkeypatch) -> Callable[[], list]:
    """Call it once the test's archives are built: from then on, records every zipfile.ZipFile constructed."""

    def install() -> list:
        opened: list = []
        real = zipfile.ZipFile

        def spy(*args, **kwargs):
            opened.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(zipfile, "ZipFile", spy)
        return opened

    return install


@pytest.fixture(scope="module")
def zip_200k() -> bytes:
    """200k empty entries (zip64 end records: the classic record says 0xFFFF), ~17 MB."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in FLAT.items():
            zf.writestr(name, data)
        for i in range(200_000):
            zf.writestr(str(i), b"")
    return buf.getvalue()


def test_zip_with_200k_entries_is_refused_before_its_directory_is_read(store, zip_200k, zipfile_spy) -> None:
    opened = zipfile_spy()
    start = time.perf_counter()
    with pytest.raises(InvalidUploadError) as info:
        store.stage_files(upload("a.zip", zip_200k), 64 << 20)
    assert time.perf_counter() - start < BOUND_S
    assert info.value.details == {"max_entries": MAX_ARCHIVE_ENTRIES, "entries": 200_002}
    assert "200002 entries" in info.value.message
    assert opened == []  # refused from the end record alone: no ZipInfo per entry was ever built
    assert not any(store.staging.iterdir())


def test_zip_entry_count_and_directory_size_checked_from_the_end_record(store, zipfile_spy) -> None:
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(MAX_ARCHIVE_ENTRIES + 1):
            zf.writestr(str(i), b"")
    with pytest.raises(InvalidUploadError, match=rf"has {MAX_ARCHIVE_ENTRIES + 1} entries"):
        store.stage_files(upload("a.zip", many.getvalue()), LIMIT)
    long_names = io.BytesIO()
    with zipfile.ZipFile(long_names, "w") as zf:  # few entries, huge names: the directory size is bounded too
        for i in range(3):
            zf.writestr(f"{i}" * (MAX_ZIP_DIRECTORY_BYTES // 3 + 1), b"")
    opened = zipfile_spy()
    with pytest.raises(InvalidUploadError, match="directory"):
        store.stage_files(upload("a.zip", long_names.getvalue()), LIMIT)
    assert opened == []
    assert not any(store.staging.iterdir())


def test_zip_with_a_comment_is_accepted(store, zipfile_spy) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in FLAT.items():
            zf.writestr(name, data)
        zf.comment = b"x" * 60_000  # the end record is then searched for, as zipfile does
    opened = zipfile_spy()
    staged = store.stage_files(upload("a.zip", buf.getvalue()), LIMIT)
    assert {p.name for p in staged.path.iterdir()} == set(FLAT)
    assert len(opened) == 1
