"""Shard reading with positions, and regions read in place: what a seekable, fast stream rests on."""
import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from vlpt.data.samples import BadSample, DecodeSettings, all_finite, decode_regions, read_npz
from vlpt.data.tar_reader import read_tar_samples, shard_samples


def _shard(path, n=12, long_names=False):
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            key = ("dir/" + "x" * 120 if long_names else "") + f"k{i:03d}"
            w.write({"__key__": key, "txt": f"caption {i}", "json": b"{}", "regions.npz": b"\0" * (37 * i)})
    return path


def _plain(raw):
    return {k: bytes(v) if isinstance(v, (bytes, bytearray)) else v for k, v in raw.items() if k != "__url__"}


@pytest.mark.parametrize("long_names", [False, True])
def test_samples_and_positions_match_webdataset_and_seek(tmp_path, long_names):
    path = _shard(tmp_path / "s.tar", long_names=long_names)  # pax headers for the long names
    reference = [_plain({k: v for k, v in r.items() if k != "__local_path__"})
                 for r in wds.tarfile_to_samples()(iter([{"url": str(path)}]))]
    samples = list(shard_samples(str(path), pytest.fail))
    assert [_plain(s.raw) for s in samples] == reference
    assert samples[0].start == 0 and all(a.end == b.start for a, b in zip(samples, samples[1:]))
    for i in (1, 5, 11):  # from any sample boundary: the rest of the shard, nothing before it
        rest = list(shard_samples(str(path), pytest.fail, start=samples[i].start))
        assert [_plain(s.raw) for s in rest] == reference[i:]
    assert list(shard_samples(str(path), pytest.fail, start=samples[-1].end)) == []
    # a remote shard (here through a pipe) is read from its start, the bytes before the position skipped
    piped = list(shard_samples(f"pipe:cat {path}", pytest.fail, start=samples[5].start))
    assert [_plain(s.raw) for s in piped] == reference[5:]
    assert all(isinstance(v, bytes) for r in read_tar_samples(str(path), pytest.fail) for k, v in r.items()
               if not k.startswith("__"))


def test_a_header_that_fails_its_checksum_ends_the_shard_and_is_counted(tmp_path):
    path = _shard(tmp_path / "s.tar")
    at = list(shard_samples(str(path), pytest.fail))[4].start
    data = bytearray(path.read_bytes())
    header = at
    if data[at + 156:at + 157] == b"x":  # the member's own header, after its pax header and records
        header += 512 + -(-int(data[at + 124:at + 135], 8) // 512) * 512
    data[header + 1] ^= 0x20  # one letter of the name: the header still parses, its checksum fails
    path.write_bytes(bytes(data))
    errors = []
    keys = [s.raw["__key__"] for s in shard_samples(str(path), lambda r, d="": errors.append(r))]
    assert keys == [f"k{i:03d}" for i in range(4)] and errors == ["bad_tar"]


def test_a_cut_inside_a_member_drops_its_partial_sample_and_counts_it_once(tmp_path):
    path = _shard(tmp_path / "s.tar")
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name == "k006.regions.npz"][0]
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])
    errors = []
    keys = [s.raw["__key__"] for s in shard_samples(str(path), lambda r, d="": errors.append(r))]
    assert keys == [f"k{i:03d}" for i in range(6)]  # k006 lost its regions: not yielded as a partial sample
    assert errors == ["bad_tar"]


def test_a_shard_without_its_end_blocks_is_counted(tmp_path):
    path = _shard(tmp_path / "s.tar", n=3)
    samples = list(shard_samples(str(path), pytest.fail))
    path.write_bytes(path.read_bytes()[: samples[-1].end])  # cut exactly at a member boundary
    errors = []
    assert len(list(shard_samples(str(path), lambda r, d="": errors.append(r)))) == 3
    assert errors == ["bad_tar"]


def _npz(writer, arrays):
    buf = io.BytesIO()
    writer(buf, **arrays)
    return bytearray(buf.getvalue())


def test_regions_are_read_in_place_from_plain_and_compressed_npz():
    rng = np.random.default_rng(0)
    arrays = {"features": rng.random((36, 64)).astype(np.float16), "boxes": rng.random((36, 4)).astype(np.float32),
              "conf": rng.random(36).astype(np.float32), "fortran": np.asfortranarray(rng.random((3, 5)))}
    for writer in (np.savez, np.savez_compressed):
        data = _npz(writer, arrays)
        out = read_npz(data)
        assert sorted(out) == sorted(arrays)
        for k, v in arrays.items():
            assert out[k].dtype == v.dtype and np.array_equal(out[k], v), k
        in_place = np.shares_memory(out["features"], np.frombuffer(data, np.uint8))
        assert in_place == (writer is np.savez)  # a stored member is a view; a compressed one is decoded
        assert out["features"].flags.writeable
    decoded = decode_regions(_npz(np.savez, arrays), DecodeSettings(feature_dim=64))
    assert decoded["features"].dtype == np.float16  # half stays half


def test_object_arrays_and_broken_npz_are_bad_regions():
    data = _npz(np.savez, {"features": np.array([{"code": 1}], dtype=object), "boxes": np.zeros((1, 4))})
    for bad in (data, data[: len(data) // 2], bytearray(b"PK\x05\x06" + bytes(18))):
        with pytest.raises(BadSample) as e:
            decode_regions(bad, DecodeSettings(feature_dim=None))
        assert e.value.reason == "bad_regions"


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_all_finite_reads_inf_and_nan_of_either_sign(dtype):
    big = np.finfo(dtype).max
    assert all_finite(np.array([0.0, -0.0, big, -big, np.finfo(dtype).tiny], dtype=dtype))
    assert all_finite(np.zeros((0, 3), dtype=dtype))
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        a = np.zeros((4, 5), dtype=dtype)
        a[2, 3] = bad
        assert not all_finite(a) and not all_finite(a.T), bad
