"""Tests of mrec_utils.data on small fixtures in each release's official format, plus real data.

Fixture checksums: the registry entry is swapped (monkeypatch.setitem) for one whose FileSpecs
hold the fixture's own sizes and SHA-256s; the real entries are checked separately.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from mrec_utils import data as D

# --------------------------------------------------------------------------------------------
# Fixtures in the official formats
# --------------------------------------------------------------------------------------------
CRLF = "\r\n"

LATEST = {
    "ratings.csv": CRLF.join([
        "userId,movieId,rating,timestamp",
        "1,1,4.0,964982703",
        "1,2,3.5,964981247",
        "2,1,5.0,1445714994",
        "2,3,0.5,1445714996",
        "3,4,2.0,1445715207",
    ]) + CRLF,
    "movies.csv": CRLF.join([
        "movieId,title,genres",
        "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy",
        '2,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama|Fantasy',
        "3,Runaway Brain (1995) ,Animation|Comedy|Sci-Fi",
        "4,Babylon 5,(no genres listed)",
    ]) + CRLF,
    "tags.csv": CRLF.join([
        "userId,movieId,tag,timestamp",
        "1,1,pixar,1445714994",
        "1,1,PIXAR ,1445714995",  # same user, same tag after lower/strip: counts once
        "2,1,Pixar,1445714996",
        "2,1,fun,1445714997",
        "3,1,animation,1445714998",
        '3,2,"dark, surreal",1445714999',
    ]) + CRLF,
}

GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def _flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES_100K)


ML100K = {
    "u.data": "\n".join(["196\t242\t3\t881250949", "186\t302\t3\t891717742",
                         "22\t377\t1\t878887116", "196\t377\t5\t881250950"]) + "\n",
    "u.item": "\n".join([
        f"242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/M/title-exact?Kolya%20(1996)|{_flags('Comedy')}",
        f"302|Café Society (1995)|01-Jan-1995||http://x|{_flags('Drama', 'Action', 'Romance')}",
        "377|No Year Here|01-Jan-1994||http://x|" + _flags("Children's", "Comedy"),
        f"267|unknown|||http://x|{_flags('unknown')}",
    ]) + "\n",
    "u.user": "\n".join(["196|49|M|writer|55105", "186|39|F|executive|00000",
                         "22|25|M|writer|40206"]) + "\n",
    "u.genre": "".join(f"{g}|{i}\n" for i, g in enumerate(GENRES_100K)) + "\n",
}

ML1M = {
    "ratings.dat": "\n".join(["1::1193::5::978300760", "1::661::3::978302109",
                              "2::1193::4::978298413"]) + "\n",
    "movies.dat": "\n".join(["1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
                             "661::Misérables, Les (1995)::Drama|Musical"]) + "\n",
    "users.dat": "\n".join(["1::F::1::10::48067", "2::M::56::16::70072"]) + "\n",
}

FIXTURES = {"ml-latest-small": (LATEST, "utf-8"), "ml-100k": (ML100K, "latin-1"), "ml-1m": (ML1M, "latin-1")}


def fixture_bytes(name: str, **overrides: bytes) -> dict[str, bytes]:
    files, enc = FIXTURES[name]
    out = {k: v.encode(enc) for k, v in files.items()}
    out.update(overrides)
    return out


def use_fixture_checksums(monkeypatch, name: str, files: dict[str, bytes]) -> D.Release:
    """Swap the registry entry for one whose checksums are those of ``files``."""
    specs = tuple(D.FileSpec(k, len(v), hashlib.sha256(v).hexdigest()) for k, v in files.items())
    rel = dataclasses.replace(D.RELEASES[name], files=specs)
    monkeypatch.setitem(D.RELEASES, name, rel)
    return rel


def write_folder(root: Path, name: str, files: dict[str, bytes]) -> Path:
    folder = root / D.RELEASES[name].folder
    folder.mkdir(parents=True)
    for k, v in files.items():
        (folder / k).write_bytes(v)
    return folder


def zip_bytes(name: str, files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for k, v in files.items():
            zf.writestr(f"{D.RELEASES[name].folder}/{k}", v)
    return buf.getvalue()


def write_zip(root: Path, name: str, files: dict[str, bytes], **kw) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.zip"
    path.write_bytes(zip_bytes(name, files, **kw))
    return path


def write(root: Path, name: str, files: dict[str, bytes], form: str) -> Path:
    return write_folder(root, name, files) if form == "folder" else write_zip(root, name, files)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root (and root itself) -> (mode, size, mtime_ns)."""
    out = {".": (root.stat().st_mode, 0, root.stat().st_mtime_ns)}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


class FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes, fail_after: int | None = None):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}
        self.fail_after = fail_after

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(n if self.fail_after is None else min(n, self.fail_after))


def serve(monkeypatch, payload: bytes | None, fail_after: int | None = None) -> list[str]:
    """Make urllib.request.urlopen serve ``payload`` (or fail when None); returns requested URLs."""
    urls: list[str] = []

    def fake_urlopen(req, timeout=None):
        urls.append(req.full_url if hasattr(req, "full_url") else str(req))
        if payload is None:
            raise urllib.error.URLError("network is unreachable")
        return FakeResponse(payload, fail_after)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return urls


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test sees the real MREC_DATA_DIR or writes to the real user cache."""
    monkeypatch.delenv("MREC_DATA_DIR", raising=False)
    monkeypatch.setenv("MREC_CACHE_DIR", str(tmp_path / "cache"))
    serve(monkeypatch, None)  # no accidental network access
    return tmp_path / "cache"


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
def test_registry_keeps_the_published_checksums():
    assert D.available_releases() == ["ml-latest-small", "ml-100k", "ml-1m", "ml-25m", "ml-32m"]
    small = D.RELEASES["ml-latest-small"]
    assert small.url == "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
    assert small.file("ratings.csv") == D.FileSpec(
        "ratings.csv", 2483723, "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646")
    assert small.file("tags.csv").sha256 == "92a9f8bb7916dceef6151209845788c3643f794dfa79d1feaec7121b5960399d"
    k100 = D.RELEASES["ml-100k"]
    assert k100.file("u.item") == D.FileSpec(
        "u.item", 236344, "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701")
    assert k100.file("u.genre").size == 202 and k100.verified and small.verified
    for name in ("ml-1m", "ml-25m", "ml-32m"):
        rel = D.RELEASES[name]
        assert not rel.verified
        assert rel.url == f"https://files.grouplens.org/datasets/movielens/{name}.zip"
        assert all(f.sha256 is None for f in rel.files)
    with pytest.raises(dataclasses.FrozenInstanceError):
        small.url = "http://example.com"  # type: ignore[misc]


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as exc:
        D.load_movielens("ml-10k", tmp_path)
    for name in D.available_releases():
        assert name in str(exc.value)
    with pytest.raises(TypeError):
        D.load_movielens(100, tmp_path)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Parsing each format, as folder and as zip
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["folder", "zip"])
def test_latest_format(monkeypatch, tmp_path, form):
    files = fixture_bytes("ml-latest-small")
    use_fixture_checksums(monkeypatch, "ml-latest-small", files)
    write(tmp_path / "d", "ml-latest-small", files, form)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified release loads without warnings
        ml = D.load_movielens(data_dir=tmp_path / "d")
    assert ml.verified and ml.users is None and ml.name == "ml-latest-small"
    r = ml.ratings
    assert list(r.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert r["rating"].dtype == "float64" and r["user_id"].dtype == "int64"
    assert str(r["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert r["rating"].tolist() == [4.0, 3.5, 5.0, 0.5, 2.0]
    assert r["timestamp"].iloc[0] == pd.Timestamp(964982703, unit="s", tz="UTC")
    it = ml.items.set_index("item_id")
    assert str(ml.items["year"].dtype) == "Int64" and ml.items["genres"].dtype == object
    assert it.loc[2, "title"] == "City of Lost Children, The (Cité des enfants perdus, La)"
    assert it.loc[2, "year"] == 1995
    assert it.loc[3, "title"] == "Runaway Brain" and it.loc[3, "year"] == 1995  # trailing space
    assert it.loc[4, "title"] == "Babylon 5" and pd.isna(it.loc[4, "year"]) and it.loc[4, "genres"] == []
    assert it.loc[1, "genres"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    t = ml.tags
    assert list(t.columns) == ["user_id", "item_id", "tag", "timestamp"] and len(t) == 6
    assert t["tag"].iloc[-1] == "dark, surreal" and str(t["timestamp"].dtype) == "datetime64[ns, UTC]"


@pytest.mark.parametrize("form", ["folder", "zip"])
def test_100k_format(monkeypatch, tmp_path, form):
    files = fixture_bytes("ml-100k")
    assert "Café".encode("latin-1") in files["u.item"]
    use_fixture_checksums(monkeypatch, "ml-100k", files)
    write(tmp_path, "ml-100k", files, form)
    ml = D.load_movielens("ml-100k", tmp_path)
    assert ml.tags is None and len(ml.ratings) == 4
    assert ml.ratings["rating"].dtype == "float64" and ml.ratings["rating"].tolist() == [3, 3, 1, 5]
    it = ml.items.set_index("item_id")
    assert it.loc[302, "title"] == "Café Society" and it.loc[302, "year"] == 1995
    assert it.loc[302, "genres"] == ["Action", "Drama", "Romance"]  # u.genre order, not file order
    assert it.loc[377, "genres"] == ["Children's", "Comedy"]
    assert it.loc[377, "title"] == "No Year Here" and it.loc[377, "year"] == 1994  # from release date
    assert it.loc[267, "genres"] == [] and pd.isna(it.loc[267, "year"])
    u = ml.users
    assert list(u.columns) == ["user_id", "gender", "age", "occupation", "zip", "occupation_code"]
    assert u["age"].dtype == "int64" and u["age"].tolist() == [49, 39, 25]
    assert u["occupation"].tolist() == ["writer", "executive", "writer"]
    assert u["zip"].tolist() == ["55105", "00000", "40206"]  # leading zeros kept
    assert u["occupation_code"].isna().all() and str(u["occupation_code"].dtype) == "Int64"


@pytest.mark.parametrize("form", ["folder", "zip"])
def test_1m_format_and_unverified_warning(tmp_path, form):
    files = fixture_bytes("ml-1m")
    write(tmp_path, "ml-1m", files, form)
    with pytest.warns(D.UnverifiedDataWarning, match="unverified"):
        ml = D.load_movielens("ml-1m", tmp_path)
    assert not ml.verified
    assert ml.ratings["item_id"].tolist() == [1193, 661, 1193]
    assert str(ml.ratings["timestamp"].dtype) == "datetime64[ns, UTC]"
    it = ml.items.set_index("item_id")
    assert it.loc[661, "title"] == "Misérables, Les" and it.loc[661, "genres"] == ["Drama", "Musical"]
    u = ml.users
    assert list(u.columns) == ["user_id", "gender", "age", "occupation", "zip", "occupation_code"]
    assert u["age"].tolist() == [1, 56] and u["age"].dtype == "int64"
    assert u["occupation"].tolist() == ["K-12 student", "self-employed"]
    assert u["occupation_code"].tolist() == [10, 16]
    assert D.ML1M_OCCUPATIONS[0] == "other or not specified" and D.ML1M_OCCUPATIONS[20] == "writer"
    assert len(D.ML1M_OCCUPATIONS) == 21


def test_same_users_schema_for_100k_and_1m(monkeypatch, tmp_path):
    f100 = fixture_bytes("ml-100k")
    use_fixture_checksums(monkeypatch, "ml-100k", f100)
    write_folder(tmp_path, "ml-100k", f100)
    write_folder(tmp_path, "ml-1m", fixture_bytes("ml-1m"))
    a = D.load_movielens("ml-100k", tmp_path).users
    with pytest.warns(D.UnverifiedDataWarning):
        b = D.load_movielens("ml-1m", tmp_path).users
    assert list(a.columns) == list(b.columns)
    assert [str(t) for t in a.dtypes] == [str(t) for t in b.dtypes]


# --------------------------------------------------------------------------------------------
# Damaged data
# --------------------------------------------------------------------------------------------
def test_checksum_mismatch_names_file_expected_and_actual(monkeypatch, tmp_path):
    files = fixture_bytes("ml-latest-small")
    rel = use_fixture_checksums(monkeypatch, "ml-latest-small", files)
    tampered = files["ratings.csv"].replace(b"4.0", b"4.5")  # same size, different content
    write_folder(tmp_path, "ml-latest-small", {**files, "ratings.csv": tampered})
    with pytest.raises(D.ChecksumError) as exc:
        D.load_movielens(data_dir=tmp_path)
    msg = str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert "ratings.csv" in msg and rel.file("ratings.csv").sha256 in msg
    assert hashlib.sha256(tampered).hexdigest() in msg
    # a truncated file is reported with both sizes
    write_folder(tmp_path / "t", "ml-latest-small", {**files, "tags.csv": files["tags.csv"][:-20]})
    n = len(files["tags.csv"])
    with pytest.raises(D.ChecksumError, match=f"tags.csv .* has {n - 20:,} bytes, expected {n:,}"):
        D.load_movielens(data_dir=tmp_path / "t")


def test_real_checksums_reject_fixture_data(tmp_path):
    write_zip(tmp_path, "ml-100k", fixture_bytes("ml-100k"))
    with pytest.raises(D.ChecksumError, match="u.data"):
        D.load_movielens("ml-100k", tmp_path)


def test_corrupted_zip(monkeypatch, tmp_path):
    files = fixture_bytes("ml-latest-small")
    use_fixture_checksums(monkeypatch, "ml-latest-small", files)
    (tmp_path / "ml-latest-small.zip").write_bytes(zip_bytes("ml-latest-small", files)[:300])
    with pytest.raises(D.CorruptArchiveError, match="ml-latest-small.zip"):
        D.load_movielens(data_dir=tmp_path)
    # a member whose bytes were altered inside an intact zip structure fails its CRC
    raw = zip_bytes("ml-latest-small", files, method=zipfile.ZIP_STORED)
    assert raw.count(b"964982703") == 1
    (tmp_path / "ml-latest-small.zip").write_bytes(raw.replace(b"964982703", b"964982704"))
    with pytest.raises(D.CorruptArchiveError, match="download"):
        D.load_movielens(data_dir=tmp_path)


@pytest.mark.parametrize("form", ["folder", "zip"])
def test_missing_file_names_file_and_place(monkeypatch, tmp_path, form):
    files = fixture_bytes("ml-latest-small")
    use_fixture_checksums(monkeypatch, "ml-latest-small", files)
    partial = {k: v for k, v in files.items() if k != "tags.csv"}
    where = write(tmp_path, "ml-latest-small", partial, form)
    with pytest.raises(D.DataNotFoundError) as exc:
        D.load_movielens(data_dir=tmp_path, download=False)
    assert isinstance(exc.value, FileNotFoundError)
    assert "tags.csv" in str(exc.value) and str(where) in str(exc.value)


@pytest.mark.parametrize("name,file,bad,line", [
    ("ml-latest-small", "ratings.csv", b"x", 4),        # not an integer
    ("ml-latest-small", "ratings.csv", b"extra", 3),    # too many fields
    ("ml-latest-small", "movies.csv", b"short", 4),     # too few fields (no genres)
    ("ml-100k", "u.data", b"tab", 2),
    ("ml-100k", "u.item", b"flag", 3),
    ("ml-1m", "users.dat", b"code", 2),
])
def test_malformed_line_reports_file_and_line(monkeypatch, tmp_path, name, file, bad, line):
    files = fixture_bytes(name)
    lines = files[file].split(b"\n")
    i = line - 1
    if bad == b"x":
        lines[i] = b"x" + lines[i][1:]
    elif bad == b"extra":
        lines[i] = lines[i].replace(b"\r", b"") + b",99\r"
    elif bad == b"short":
        lines[i] = b'2,"City of Lost Children, The (1995)"\r'
    elif bad == b"tab":
        lines[i] = lines[i].replace(b"\t", b" ", 1)
    elif bad == b"flag":
        lines[i] = lines[i][:-1] + b"2"
    elif bad == b"code":
        lines[i] = b"2::M::56::21::70072"
    files[file] = b"\n".join(lines)
    use_fixture_checksums(monkeypatch, name, files)
    write_folder(tmp_path, name, files)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", D.UnverifiedDataWarning)
        with pytest.raises(D.MalformedFileError) as exc:
            D.load_movielens(name, tmp_path)
    assert exc.value.file == file and exc.value.line == line
    assert file in str(exc.value) and f"line {line}" in str(exc.value)


def test_wrong_header_is_reported(monkeypatch, tmp_path):
    files = fixture_bytes("ml-latest-small")
    files["tags.csv"] = files["tags.csv"].replace(b"userId,movieId", b"movieId,userId", 1)
    use_fixture_checksums(monkeypatch, "ml-latest-small", files)
    write_folder(tmp_path, "ml-latest-small", files)
    with pytest.raises(D.MalformedFileError, match="tags.csv.*line 1.*header"):
        D.load_movielens(data_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# Locations, read-only data, caching
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["folder", "zip"])
def test_read_only_folder_is_left_untouched(monkeypatch, tmp_path, form):
    files = fixture_bytes("ml-latest-small")
    use_fixture_checksums(monkeypatch, "ml-latest-small", files)
    root = tmp_path / "ro"
    write(root, "ml-latest-small", files, form)
    for p in sorted(root.rglob("*"), reverse=True):
        p.chmod(0o555 if p.is_dir() else 0o444)
    root.chmod(0o555)
    try:
        before = snapshot(root)
        ml = D.load_movielens(data_dir=root)
        ml2 = D.load_movielens(data_dir=root)
        after = snapshot(root)
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(0o755)
    assert len(ml.ratings) == len(ml2.ratings) == 5
    assert after == before
    assert not (tmp_path / "cache").exists()  # nothing was downloaded or cached either


def test_resolution_order_explicit_env_cache(monkeypatch, tmp_path, isolated_env):
    files = fixture_bytes("ml-latest-small")
    use_fixture_checksums(monkeypatch, "ml-latest-small", files)
    explicit = write_folder(tmp_path / "explicit", "ml-latest-small", files)
    env = write_zip(tmp_path / "env", "ml-latest-small", files)
    cached = write_zip(isolated_env, "ml-latest-small", files)
    monkeypatch.setenv("MREC_DATA_DIR", str(tmp_path / "env"))
    assert D.load_movielens(data_dir=tmp_path / "explicit").source == str(explicit)
    assert D.load_movielens().source == str(env)
    assert D.load_movielens(data_dir=tmp_path / "empty").source == str(env)
    monkeypatch.delenv("MREC_DATA_DIR")
    assert D.load_movielens().source == str(cached)
    assert D.search_dirs(tmp_path / "x") == [tmp_path / "x", isolated_env]
    # data_dir may also point at the extracted folder itself
    assert D.load_movielens(data_dir=explicit).source == str(explicit)


def test_verification_is_cached_per_path_size_mtime(monkeypatch, tmp_path):
    files = fixture_bytes("ml-latest-small")
    use_fixture_checksums(monkeypatch, "ml-latest-small", files)
    folder = write_folder(tmp_path, "ml-latest-small", files)
    D.load_movielens(data_dir=tmp_path)
    calls = []
    real = D._sha256
    monkeypatch.setattr(D, "_sha256", lambda b: calls.append(len(b)) or real(b))
    D.load_movielens(data_dir=tmp_path)
    assert calls == []  # nothing hashed again
    st = (folder / "tags.csv").stat()
    os.utime(folder / "tags.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    D.load_movielens(data_dir=tmp_path)
    assert calls == [len(files["tags.csv"])]  # only the touched file is hashed again


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------
def test_offline_without_copy_says_url_file_and_where(tmp_path, isolated_env):
    url = "https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"
    with pytest.raises(D.DataNotFoundError) as exc:
        D.load_movielens(data_dir=tmp_path / "mine")
    msg = str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)
    assert url in msg and "'ml-latest-small.zip'" in msg and "MREC_DATA_DIR" in msg
    assert str(tmp_path / "mine") in msg and str(isolated_env) in msg
    assert list(isolated_env.iterdir()) == []  # no temporary file left behind
    with pytest.raises(D.DataNotFoundError, match="download=False"):
        D.load_movielens(data_dir=tmp_path, download=False)


def test_download_good_archive(monkeypatch, tmp_path, isolated_env):
    files = fixture_bytes("ml-latest-small")
    use_fixture_checksums(monkeypatch, "ml-latest-small", files)
    urls = serve(monkeypatch, zip_bytes("ml-latest-small", files))
    ml = D.load_movielens(data_dir=tmp_path / "empty")
    assert urls == ["https://files.grouplens.org/datasets/movielens/ml-latest-small.zip"]
    assert sorted(p.name for p in isolated_env.iterdir()) == ["ml-latest-small.zip"]
    assert ml.source == str(isolated_env / "ml-latest-small.zip") and len(ml.ratings) == 5
    serve(monkeypatch, None)
    assert len(D.load_movielens().ratings) == 5  # found in the cache, no second download


@pytest.mark.parametrize("damage", ["checksum", "truncated", "interrupted"])
def test_download_failure_leaves_nothing(monkeypatch, tmp_path, isolated_env, damage):
    files = fixture_bytes("ml-latest-small")
    use_fixture_checksums(monkeypatch, "ml-latest-small", files)
    good = zip_bytes("ml-latest-small", files)
    if damage == "checksum":
        bad = {**files, "movies.csv": files["movies.csv"].replace(b"Toy", b"Joy")}
        serve(monkeypatch, zip_bytes("ml-latest-small", bad))
        expected = D.ChecksumError
    elif damage == "truncated":
        serve(monkeypatch, good[: len(good) // 2])
        expected = D.CorruptArchiveError
    else:
        serve(monkeypatch, good, fail_after=100)
        expected = D.DataNotFoundError
    with pytest.raises(expected):
        D.load_movielens(data_dir=tmp_path / "empty")
    assert isolated_env.is_dir() and list(isolated_env.iterdir()) == []


# --------------------------------------------------------------------------------------------
# item_text
# --------------------------------------------------------------------------------------------
def _items() -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": [1, 2, 4],
        "title": ["Toy Story", "Airplane!", "Babylon 5"],
        "year": pd.array([1995, pd.NA, pd.NA], dtype="Int64"),
        "genres": [["Animation", "Comedy"], ["Comedy"], []],
    })


def test_item_text_counts_users_and_breaks_ties_alphabetically():
    tags = pd.DataFrame({
        "user_id": [1, 1, 2, 2, 3, 4, 4, 4, 5, 5],
        "item_id": [1, 1, 1, 1, 1, 1, 1, 1, 2, 2],
        "tag": ["pixar", "PIXAR ", "Pixar", "fun", "animation", "zany", "Zany", "ZANY", "Spoof", "spoof"],
    })
    text = D.item_text(_items(), tags)
    assert text.index.name == "item_id" and text.index.tolist() == [1, 2, 4]
    # pixar: users 1, 2 -> 2; animation, fun, zany: 1 user each (user 4 typed zany 3 times)
    # -> alphabetical, first two kept
    assert text.loc[1] == "Toy Story (1995). Genres: Animation, Comedy. Tags: pixar, animation, fun."
    assert text.loc[2] == "Airplane! Genres: Comedy. Tags: spoof."
    assert text.loc[4] == "Babylon 5."
    assert D.item_text(_items(), tags, max_tags=1).loc[1].endswith("Tags: pixar.")
    assert D.item_text(_items(), tags, max_tags=0).loc[1] == "Toy Story (1995). Genres: Animation, Comedy."
    # deterministic whatever the row order of tags
    assert D.item_text(_items(), tags.iloc[::-1]).equals(text)
    assert D.item_text(_items()).loc[1] == "Toy Story (1995). Genres: Animation, Comedy."


def test_item_text_matches_a_plain_loop_on_fixture(monkeypatch, tmp_path):
    files = fixture_bytes("ml-latest-small")
    use_fixture_checksums(monkeypatch, "ml-latest-small", files)
    write_zip(tmp_path, "ml-latest-small", files)
    ml = D.load_movielens(data_dir=tmp_path)
    text = D.item_text(ml.items, ml.tags, max_tags=2)
    counts: dict[tuple[int, str], set[int]] = {}
    for u, i, t in zip(ml.tags["user_id"], ml.tags["item_id"], ml.tags["tag"]):
        counts.setdefault((i, t.strip().lower()), set()).add(u)
    for i in ml.items["item_id"]:
        ranked = sorted((-len(us), t) for (j, t), us in counts.items() if j == i)[:2]
        if ranked:
            assert text.loc[i].endswith("Tags: " + ", ".join(t for _, t in ranked) + ".")
        else:
            assert "Tags:" not in text.loc[i]
    assert text.loc[1] == ("Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, "
                           "Fantasy. Tags: pixar, animation.")


def test_item_text_rejects_bad_input():
    with pytest.raises(ValueError, match="genres"):
        D.item_text(_items().drop(columns="genres"))
    with pytest.raises(ValueError, match="tag"):
        D.item_text(_items(), pd.DataFrame({"item_id": [1]}))
    with pytest.raises(TypeError, match="list"):
        D.item_text(_items().assign(genres="Comedy|Drama"))


# --------------------------------------------------------------------------------------------
# Real data (MREC_DATA_DIR)
# --------------------------------------------------------------------------------------------
def test_real_ml_latest_small(movielens_dir):
    t0 = time.perf_counter()
    ml = D.load_movielens("ml-latest-small", movielens_dir)
    seconds = time.perf_counter() - t0
    assert seconds < 1.5, f"loading took {seconds:.2f} s"
    assert ml.verified
    assert ml.ratings["user_id"].nunique() == 610
    assert len(ml.items) == 9742 and len(ml.ratings) == 100836 and len(ml.tags) == 3683
    assert dict(ml.ratings.dtypes.astype(str)) == {
        "user_id": "int64", "item_id": "int64", "rating": "float64", "timestamp": "datetime64[ns, UTC]"}
    assert str(ml.items["item_id"].dtype) == "int64" and str(ml.items["year"].dtype) == "Int64"
    assert pd.api.types.is_string_dtype(ml.items["title"]) and ml.items["genres"].dtype == object
    assert all(isinstance(g, list) for g in ml.items["genres"])
    assert sum(g == [] for g in ml.items["genres"]) == 34  # "(no genres listed)"
    assert ml.items["year"].isna().sum() == 13
    assert not ml.items["title"].str.contains(r"\(\d{4}\)\s*$|\s$").any()
    assert ml.ratings["rating"].between(0.5, 5.0).all()
    assert ml.ratings["timestamp"].min().year == 1996
    text = D.item_text(ml.items, ml.tags)
    assert text.loc[1] == ("Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, "
                           "Fantasy. Tags: pixar, fun.")
    assert text.index.is_unique and len(text) == 9742
