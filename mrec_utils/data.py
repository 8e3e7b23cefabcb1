"""MovieLens releases: find, verify, download and parse them into tidy pandas frames; item text.

>>> ml = load_movielens()                      # ml-latest-small by default
>>> item_text(ml.items, ml.tags).loc[1]
'Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy. Tags: pixar, fun.'

Where the data comes from: the first of ``data_dir``, ``$MREC_DATA_DIR`` and the user cache
(``$MREC_CACHE_DIR``, else ``~/.cache/mrec_utils``) that holds the extracted folder ``<name>/`` or
the official archive ``<name>.zip`` (read in place, never extracted or written to). Every file read
is checked against the SHA-256 and size in :data:`RELEASES` (remembered per path, size and mtime).
Without a copy, the archive is downloaded from GroupLens into the cache (a temporary file,
verified, then renamed). Releases without recorded checksums load with an :class:`UnverifiedDataWarning`.

Schema, the same for every release:

* ``ratings``: ``user_id`` int64, ``item_id`` int64, ``rating`` float64 (0.5-5 in half stars for
  ml-latest-*, 1-5 for ml-100k/1m), ``timestamp`` datetime64[ns, UTC]; in file order.
* ``items``: ``item_id``, ``title`` (without the trailing "(1995)"), ``year`` Int64 (<NA> if none;
  ml-100k falls back to its release date), ``genres`` list[str] (the release's own names; "(no
  genres listed)" and ml-100k's "unknown" become []).
* ``tags`` (ml-latest-small, ml-25m, ml-32m, else None): ``user_id``, ``item_id``, ``tag``, ``timestamp``.
* ``users`` (ml-100k, ml-1m, else None): ``user_id``, ``gender`` "M"/"F", ``age`` (ml-1m: the age-group
  code, its lower bound, :data:`ML1M_AGE_GROUPS`), ``occupation`` (ml-1m: decoded with
  :data:`ML1M_OCCUPATIONS`), ``zip`` str, ``occupation_code`` Int64 (ml-1m only).

Errors say what to do: :class:`DataNotFoundError` (a FileNotFoundError), :class:`ChecksumError`,
:class:`MalformedFileError` (names the file and line) and :class:`CorruptArchiveError` (ValueErrors).
Cite Harper & Konstan (2015), The MovieLens Datasets: History and Context, ACM TiiS 5(4), and respect
each release's license (only ml-latest-small may be redistributed).
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

BASE_URL = "https://files.grouplens.org/datasets/movielens/"
DEFAULT_RELEASE = "ml-latest-small"


class DataNotFoundError(FileNotFoundError):
    """No usable copy of a release (or of one of its files) was found."""


class ChecksumError(ValueError):
    """A file's SHA-256 or size differs from the value recorded in :data:`RELEASES`."""


class MalformedFileError(ValueError):
    """A data file does not follow its release's format; ``file`` and ``line`` (1-based) say where."""

    def __init__(self, message: str, file: str = "", line: int | None = None):
        super().__init__(message)
        self.file, self.line = file, line


class CorruptArchiveError(ValueError):
    """A ``.zip`` archive cannot be read (truncated, not a zip, or a member fails its CRC)."""


class UnverifiedDataWarning(UserWarning):
    """A release was loaded whose content cannot be checked against recorded checksums."""


# ============================================================================ registry
@dataclass(frozen=True)
class FileSpec:
    """One member of a release archive: file name, byte size and SHA-256 (None = not recorded)."""

    name: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Release:
    """A MovieLens release. ``layout``: ``"latest"`` (UTF-8 CSV with header), ``"100k"`` (u.data
    tab-separated, u.item/u.user/u.genre ``|``-separated latin-1) or ``"1m"`` (``::``-separated
    latin-1). ``files``: the members this package knows, with sizes and checksums where established."""

    name: str
    url: str
    folder: str
    layout: str
    ratings_file: str
    items_file: str
    tags_file: str | None
    users_file: str | None
    files: tuple[FileSpec, ...]
    genre_file: str | None = None
    description: str = ""

    @property
    def archive_name(self) -> str:
        return f"{self.name}.zip"

    @property
    def read_files(self) -> tuple[str, ...]:
        """The members :func:`load_movielens` reads (and verifies), in reading order."""
        names = (self.ratings_file, self.items_file, self.genre_file, self.tags_file, self.users_file)
        return tuple(n for n in names if n is not None)

    def file(self, name: str) -> FileSpec:
        """The :class:`FileSpec` of member ``name`` (size and checksum None if not recorded)."""
        return next((f for f in self.files if f.name == name), FileSpec(name))

    @property
    def verified(self) -> bool:
        """True when every file the loader reads has a recorded SHA-256."""
        return all(self.file(n).sha256 is not None for n in self.read_files)


def _release(name: str, layout: str, files, description: str, **kw) -> Release:
    specs = tuple(FileSpec(*f) if isinstance(f, tuple) else FileSpec(f) for f in files)
    latest = dict(ratings_file="ratings.csv", items_file="movies.csv", tags_file="tags.csv", users_file=None)
    return Release(name=name, url=f"{BASE_URL}{name}.zip", folder=name, layout=layout, files=specs,
                   description=description, **{**(latest if layout == "latest" else {}), **kw})


RELEASES: dict[str, Release] = {r.name: r for r in (
    _release("ml-latest-small", "latest", (
        ("ratings.csv", 2483723, "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646"),
        ("movies.csv", 494431, "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07"),
        ("tags.csv", 118660, "92a9f8bb7916dceef6151209845788c3643f794dfa79d1feaec7121b5960399d"),
        ("links.csv", 197979, "97ad18e4e56a09363c65676b6cb3482ce3e2cea2372a24620c1599c843325f31"),
        ("README.txt", 8342, "63d22ac138e80fae37021797ed8e1b9424b5239dc576a137422adf783ae3f404"),
    ), "610 users, 9,742 movies, 100,836 ratings, 3,683 tags (2018); redistributable"),
    _release("ml-100k", "100k", (
        ("u.data", 1979173, "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"),
        ("u.item", 236344, "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701"),
        ("u.user", 22628, "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c"),
        ("u.genre", 202, "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb"),
        ("u.occupation", 193, "cd5fbec9afe345d993a62fc7817df1a4a9079c4feb267b3118763b8fd942137d"),
        ("u.info", 36, "5b0a40b2e47a729ee6203063f6dcf8790c2e63f5a18663e6ee318a72c5f3c27b"),
    ), "943 users, 1,682 movies, 100,000 ratings with demographics (1998)", ratings_file="u.data",
        items_file="u.item", tags_file=None, users_file="u.user", genre_file="u.genre"),
    _release("ml-1m", "1m", ("ratings.dat", "movies.dat", "users.dat", "README"),
             "6,040 users, ~3,900 movies, 1,000,209 ratings with demographics (2003); unverified",
             ratings_file="ratings.dat", items_file="movies.dat", tags_file=None, users_file="users.dat"),
    _release("ml-25m", "latest", ("ratings.csv", "movies.csv", "tags.csv", "links.csv", "genome-scores.csv",
                                  "genome-tags.csv", "README.txt"),
             "162,541 users, 62,423 movies, 25,000,095 ratings, 1,093,360 tags (2019); unverified"),
    _release("ml-32m", "latest", ("ratings.csv", "movies.csv", "tags.csv", "links.csv", "README.txt"),
             "200,948 users, 87,585 movies, 32,000,204 ratings, 2,000,072 tags (2023); unverified"),
)}
"""Known releases by name. Entries are frozen; tests may swap an entry, never edit one in place."""

#: ml-1m ``users.dat`` occupation codes, from the ml-1m README.
ML1M_OCCUPATIONS: dict[int, str] = {
    0: "other or not specified", 1: "academic/educator", 2: "artist", 3: "clerical/admin", 4: "college/grad student",
    5: "customer service", 6: "doctor/health care", 7: "executive/managerial", 8: "farmer", 9: "homemaker",
    10: "K-12 student", 11: "lawyer", 12: "programmer", 13: "retired", 14: "sales/marketing", 15: "scientist",
    16: "self-employed", 17: "technician/engineer", 18: "tradesman/craftsman", 19: "unemployed", 20: "writer"}

#: ml-1m ``users.dat`` age-group codes (each code is the group's lower bound; 1 = under 18).
ML1M_AGE_GROUPS: dict[int, str] = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55",
                                   56: "56+"}


def available_releases() -> list[str]:
    """Names of the releases :func:`load_movielens` knows, default first."""
    return list(RELEASES)


@dataclass
class MovieLens:
    """A loaded release (module docstring); ``source`` is the folder or zip read, ``verified`` whether
    every file read was checked against a recorded SHA-256."""

    name: str
    ratings: pd.DataFrame
    items: pd.DataFrame
    tags: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    source: str = ""
    verified: bool = False

    def __repr__(self) -> str:
        parts = [f"{len(self.ratings):,} ratings", f"{self.ratings['user_id'].nunique():,} users", f"{len(self.items):,} items"]
        parts += [f"{len(self.tags):,} tags"] if self.tags is not None else []
        parts += [f"{len(self.users):,} user profiles"] if self.users is not None else []
        return f"MovieLens({self.name!r}: {', '.join(parts)}; verified={self.verified})"


# ============================================================================ finding and reading
def cache_dir() -> Path:
    """The user cache: ``$MREC_CACHE_DIR`` if set, else ``~/.cache/mrec_utils`` (not created here)."""
    env = os.environ.get("MREC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mrec_utils"


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for a release, in order: ``data_dir``, ``$MREC_DATA_DIR``, the cache."""
    dirs = [Path(d).expanduser() for d in (data_dir, os.environ.get("MREC_DATA_DIR")) if d] + [cache_dir()]
    return list(dict.fromkeys(dirs))


def _find_local(release: Release, dirs: Sequence[Path]) -> tuple[str, Path] | None:
    """``("folder" | "zip", path)`` of the first copy in ``dirs``: a complete folder, else the zip; a partial folder
    raises, naming the missing file."""
    for d in dirs:
        folder, archive = d / release.folder, d / release.archive_name
        if not folder.is_dir() and d.name == release.folder and (d / release.ratings_file).is_file():
            folder = d  # data_dir points at the extracted folder itself
        missing = [f for f in release.read_files if not (folder / f).is_file()] if folder.is_dir() else None
        if missing == []:
            return "folder", folder
        if archive.is_file():
            return "zip", archive
        if missing:
            raise DataNotFoundError(
                f"{missing[0]!r} is missing from the folder {folder} (release {release.name!r} needs "
                f"{', '.join(release.read_files)}). Extract the complete {release.archive_name} from "
                f"{release.url} there, or put the zip itself in {d} instead of the folder.")
    return None


_VERIFIED: set[tuple] = set()  # files checked in this process: (path, member, size, mtime, spec)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_bytes(data: bytes, spec: FileSpec, where: str) -> None:
    if spec.size is not None and len(data) != spec.size:
        raise ChecksumError(f"{spec.name} in {where} has {len(data):,} bytes, expected {spec.size:,} (sha256 "
                            f"expected {spec.sha256}, actual {_sha256(data)}). The file is truncated or a different "
                            "version: replace it with the one from the official archive.")
    if spec.sha256 is not None and (actual := _sha256(data)) != spec.sha256:
        raise ChecksumError(f"checksum mismatch for {spec.name} in {where}: expected sha256 {spec.sha256}, actual "
                            f"{actual}. The file is corrupt or a different version: replace it with the one from "
                            "the official archive.")


def _verify(data: bytes, spec: FileSpec, path: Path, member: str, where: str) -> None:
    """Check ``data`` once per (path, member, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), member, st.st_size, st.st_mtime_ns, spec)
    if (spec.sha256 is not None or spec.size is not None) and key not in _VERIFIED:
        _check_bytes(data, spec, where)
        _VERIFIED.add(key)


def _zip_member(zf: zipfile.ZipFile, release: Release, fname: str, path: Path) -> str:
    names = set(zf.namelist())
    for cand in (f"{release.folder}/{fname}", fname):
        if cand in names:
            return cand
    raise DataNotFoundError(f"{fname!r} is missing from the archive {path} (expected member '{release.folder}/"
                            f"{fname}'). The archive is not the official {release.archive_name}: delete it and "
                            f"download {release.url} again.")


def _read_files(release: Release, kind: str, path: Path) -> dict[str, bytes]:
    """Bytes of every file in ``release.read_files``, each checked against its FileSpec."""
    if kind == "folder":
        out = {f: (path / f).read_bytes() for f in release.read_files}
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                out = {f: zf.read(_zip_member(zf, release, f, path)) for f in release.read_files}
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
            msg = f"{path} is not a readable zip archive ({err}). Delete it and download {release.url} again "
            raise CorruptArchiveError(msg + f"(or put the extracted folder '{release.folder}/' there).") from err
    for f, data in out.items():  # a folder's file, or a member of the zip
        _verify(data, release.file(f), path / f if kind == "folder" else path, "" if kind == "folder" else f, str(path))
    return out


def _not_found_message(release: Release, dirs: Sequence[Path], reason: str) -> str:
    searched = "\n".join(f"  - {d}{'' if d.is_dir() else ' (does not exist)'}" for d in dirs)
    return (f"MovieLens release {release.name!r} was not found locally{reason}.\nDownload {release.url} and put the "
            f"file '{release.archive_name}' (or the folder '{release.folder}/' extracted from it) into one of the "
            f"folders searched:\n{searched}\nor set the environment variable MREC_DATA_DIR to the folder that holds "
            "it (or pass data_dir=...).")


def _download(release: Release, dest_dir: Path, progress: bool = True) -> Path:
    """Fetch ``release.url`` to ``dest_dir/<name>.zip`` through a temporary file that is verified first."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{release.archive_name}.", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(release.url, headers={"User-Agent": "mrec_utils"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                length = str((getattr(resp, "headers", None) or {}).get("Content-Length", ""))
                total = int(length) if length.isdigit() else None
                from tqdm.auto import tqdm

                with tqdm(total=total, unit="B", unit_scale=True, leave=False, desc=release.archive_name,
                          disable=not progress or (total is not None and total <= 8 * 2**20)) as bar:
                    while chunk := resp.read(2**20):
                        out.write(chunk)
                        bar.update(len(chunk))
        try:
            with zipfile.ZipFile(tmp) as zf:  # verify before the archive gets its final name
                for f in release.read_files:
                    member, spec = _zip_member(zf, release, f, tmp), release.file(f)
                    if spec.sha256 is not None or spec.size is not None:  # unverified: CRC checked on reading
                        _check_bytes(zf.read(member), spec, f"the download of {release.url}")
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise CorruptArchiveError(f"the download of {release.url} is not a valid zip archive ({err}); nothing "
                                      "was kept. Try again, or download it by hand.") from err
        os.replace(tmp, dest_dir / release.archive_name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest_dir / release.archive_name


# ============================================================================ parsing
#: column kinds: dtype for pandas, the allowed values (None: any) and what a reader must fix
_KINDS = {"int": ("int64", None, "an integer"), "float": ("float64", None, "a finite number"),
          "flag": ("int8", (0, 1), "a 0/1 flag"), "gender": ("str", ("M", "F"), "M or F"),
          "text": ("str", None, "text"), "nonempty": ("str", None, "non-empty text"),
          "age": ("int64", tuple(ML1M_AGE_GROUPS), "one of the documented codes"),
          "occupation": ("int64", tuple(ML1M_OCCUPATIONS), "one of the documented codes")}


@dataclass(frozen=True)
class _Table:
    """How one data file is laid out: separator, ``(column, kind)`` pairs, header, encoding, quoting."""

    sep: str
    columns: tuple[tuple[str, str], ...]
    header: tuple[str, ...] | None = None
    encoding: str = "utf-8"
    quoted: bool = False


_RATINGS = (("user_id", "int"), ("item_id", "int"), ("rating", "float"), ("timestamp", "int"))
_TABLES = {
    ("latest", "ratings"): _Table(",", _RATINGS, ("userId", "movieId", "rating", "timestamp"), quoted=True),
    ("latest", "items"): _Table(",", (("item_id", "int"), ("title", "nonempty"), ("genres", "nonempty")),
                                ("movieId", "title", "genres"), quoted=True),
    ("latest", "tags"): _Table(",", (("user_id", "int"), ("item_id", "int"), ("tag", "text"), ("timestamp", "int")),
                               ("userId", "movieId", "tag", "timestamp"), quoted=True),
    ("100k", "ratings"): _Table("\t", _RATINGS, encoding="latin-1"),
    ("100k", "items"): _Table("|", (("item_id", "int"), ("title", "nonempty"), ("release_date", "text"),
                                    ("video_release_date", "text"), ("url", "text"))
                              + tuple((f"g{i}", "flag") for i in range(19)), encoding="latin-1"),
    ("100k", "users"): _Table("|", (("user_id", "int"), ("age", "int"), ("gender", "gender"),
                                    ("occupation", "nonempty"), ("zip", "nonempty")), encoding="latin-1"),
    ("100k", "genres"): _Table("|", (("genre", "nonempty"), ("index", "int")), encoding="latin-1"),
    ("1m", "ratings"): _Table("::", _RATINGS, encoding="latin-1"),
    ("1m", "items"): _Table("::", (("item_id", "int"), ("title", "nonempty"), ("genres", "nonempty")), encoding="latin-1"),
    ("1m", "users"): _Table("::", (("user_id", "int"), ("gender", "gender"), ("age", "age"),
                                   ("occupation_code", "occupation"), ("zip", "nonempty")), encoding="latin-1"),
}


def _valid(kind: str, value: str) -> bool:
    """One field of the slow, line-by-line check."""
    dtype, allowed, _ = _KINDS[kind]
    if dtype == "str":
        return bool(value.strip()) if kind == "nonempty" else allowed is None or value in allowed
    try:
        x = float(value) if dtype == "float64" else int(value.strip())
    except ValueError:
        return False
    return math.isfinite(x) and (allowed is None or x in allowed)


def _first_bad_line(data: bytes, t: _Table) -> tuple[int, str] | None:
    """(line, reason) of the first row that breaks ``t`` (MovieLens fields never span lines)."""
    try:
        text = data.decode("utf-8-sig" if t.encoding == "utf-8" else t.encoding)
    except UnicodeDecodeError as err:
        return data[: err.start].count(b"\n") + 1, f"bytes that are not valid {t.encoding} ({err.reason})"
    rows = [(i, line.rstrip("\r")) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
    if t.header is not None:
        found = rows[0][1] if rows else ""
        if tuple(next(csv.reader([found]), [])) != t.header:
            return 1, f"expected the header {','.join(t.header)!r}, found {found!r}"
        rows = rows[1:]
    for i, line in rows:
        try:
            fields = next(csv.reader([line], strict=True)) if t.quoted else line.split(t.sep)
        except csv.Error as err:
            return i, f"unreadable CSV ({err})"
        if len(fields) != len(t.columns):
            return i, f"expected {len(t.columns)} fields separated by {t.sep!r}, found {len(fields)}"
        for k, ((col, kind), value) in enumerate(zip(t.columns, fields), 1):
            if not _valid(kind, value):
                return i, f"field {k} ({col}) is {value!r}, expected {_KINDS[kind][2]}"
    return None


def _looks_wrong(df: pd.DataFrame, t: _Table) -> bool:
    """Cheap vectorised checks for what the fast parser lets through (short rows, bad codes)."""
    for col, kind in t.columns:
        s, (dtype, allowed, _) = df[col], _KINDS[kind]
        if s.isna().any() or (dtype == "float64" and not np.isfinite(s.to_numpy()).all()) \
                or (allowed is not None and not s.isin(allowed).all()) or (kind == "nonempty" and (s.str.strip() == "").any()):
            return True
    return False


def _parse(data: bytes, t: _Table, fname: str, where: str) -> pd.DataFrame:
    """Parse ``data`` with pandas; on any problem, locate the bad line and raise :class:`MalformedFileError`."""
    buf, sep, engine = data, t.sep, "c"
    if len(sep) > 1:  # "::": map to a byte absent from the file so that the fast C parser can be used
        buf, sep, engine = (data.replace(sep.encode(), b"\t"), "\t", "c") if b"\t" not in data else (data, sep, "python")
    df, cause = None, None
    try:
        first = data.split(b"\n", 1)[0].rstrip(b"\r").decode(t.encoding, "replace").lstrip("\ufeff")
        if t.header is not None and tuple(first.split(t.sep)) != t.header:
            raise ValueError("unexpected header")
        df = pd.read_csv(io.BytesIO(buf), sep=sep, header=0 if t.header else None, names=[c for c, _ in t.columns],
                         dtype={c: _KINDS[k][0] for c, k in t.columns}, encoding=t.encoding, na_filter=False,
                         engine=engine, quoting=csv.QUOTE_MINIMAL if t.quoted else csv.QUOTE_NONE)
    except Exception as err:  # noqa: BLE001 - any parser failure is reported with its line
        cause = err
    if df is not None and not _looks_wrong(df, t):
        return df
    bad = _first_bad_line(data, t)
    if bad is None:
        raise MalformedFileError(f"{fname} in {where} could not be parsed ({cause}). Replace it with the file from "
                                 "the official archive.", file=fname) from cause
    raise MalformedFileError(f"{fname} in {where}, line {bad[0]}: {bad[1]}. The file does not follow the MovieLens "
                             "format; replace it with the file from the official archive.", file=fname, line=bad[0]) from cause


def _events(df: pd.DataFrame, column: str, dtype: type | str) -> pd.DataFrame:
    """Ratings or tags: ``user_id``, ``item_id``, ``column`` as ``dtype`` and the Unix-seconds ``timestamp`` in UTC."""
    timestamp = pd.to_datetime(df["timestamp"], unit="s", utc=True).astype("datetime64[ns, UTC]")
    return pd.DataFrame({"user_id": df["user_id"].astype("int64"), "item_id": df["item_id"].astype("int64"),
                         column: df[column].astype(dtype), "timestamp": timestamp})


def _items_frame(item_id: pd.Series, titles: pd.Series, genres: list[list[str]], fallback_year=None) -> pd.DataFrame:
    parts = titles.str.extract(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
    year = pd.to_numeric(parts["year"]).astype("Int64")
    year = year if fallback_year is None else year.fillna(fallback_year)
    return pd.DataFrame({"item_id": item_id.astype("int64"),
                         "title": parts["title"].where(parts["year"].notna(), titles.str.strip()).astype(str),
                         "year": year.astype("Int64"), "genres": pd.Series(genres, index=item_id.index, dtype=object)})


def _genre_lists(genres: pd.Series) -> list[list[str]]:
    return [[] if g == "(no genres listed)" else g.split("|") for g in genres.tolist()]


def _users_frame(u: pd.DataFrame, occupation: pd.Series, code: pd.Series) -> pd.DataFrame:
    return pd.DataFrame({"user_id": u["user_id"].astype("int64"), "gender": u["gender"].astype(str),
                         "age": u["age"].astype("int64"), "occupation": occupation.astype(str),
                         "zip": u["zip"].astype(str), "occupation_code": code.astype("Int64")})


def _frames(release: Release, raw: dict[str, bytes], where: str) -> MovieLens:
    """Parse the raw files of one release into the common schema."""
    layout = release.layout

    def read(fname: str, table: str) -> pd.DataFrame:
        return _parse(raw[fname], _TABLES[layout, table], fname, where)

    ratings, m = _events(read(release.ratings_file, "ratings"), "rating", "float64"), read(release.items_file, "items")
    if layout == "latest":
        tags = _events(read(release.tags_file, "tags"), "tag", str)
        return MovieLens(release.name, ratings, _items_frame(m["item_id"], m["title"], _genre_lists(m["genres"])), tags=tags)
    u = read(release.users_file, "users")
    if layout == "1m":
        items = _items_frame(m["item_id"], m["title"], _genre_lists(m["genres"]))
        users = _users_frame(u, u["occupation_code"].map(ML1M_OCCUPATIONS), u["occupation_code"])
        return MovieLens(release.name, ratings, items, users=users)
    g = read(release.genre_file, "genres")
    if len(g) != 19 or g["index"].tolist() != list(range(19)):
        raise MalformedFileError(f"{release.genre_file} in {where} must list 19 genres numbered 0-18 (found {len(g)}); "
                                 "replace it with the file from the official archive.", file=release.genre_file)
    names = g["genre"].astype(str).tolist()
    flags = m[[f"g{i}" for i in range(19)]].to_numpy(dtype=bool)
    genres = [[names[j] for j in np.flatnonzero(row) if names[j] != "unknown"] for row in flags]
    year = pd.to_datetime(m["release_date"], format="%d-%b-%Y", errors="coerce").dt.year.astype("Int64")
    users = _users_frame(u, u["occupation"], pd.Series(pd.array([pd.NA] * len(u), dtype="Int64")))
    return MovieLens(release.name, ratings, _items_frame(m["item_id"], m["title"], genres, year), users=users)


def load_movielens(name: str = DEFAULT_RELEASE, data_dir: str | os.PathLike | None = None, *,
                   download: bool = True, progress: bool = True) -> MovieLens:
    """Load a MovieLens release (a key of :data:`RELEASES`) as tidy DataFrames (module docstring). ``data_dir`` (a
    folder with ``<name>.zip`` or ``<name>/``) is searched before ``$MREC_DATA_DIR`` and the user cache; without a copy,
    ``download`` fetches the official archive into the cache. Raises ValueError (unknown name), DataNotFoundError (no
    copy: says the URL and where to put it), ChecksumError, MalformedFileError or CorruptArchiveError (damaged data)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a release name (str), got {type(name).__name__}; valid names: "
                        f"{', '.join(available_releases())}")
    if name not in RELEASES:
        raise ValueError(f"unknown MovieLens release {name!r}; valid names: {', '.join(available_releases())}")
    release, dirs = RELEASES[name], search_dirs(data_dir)
    found = _find_local(release, dirs)
    if found is None:
        if not download:
            raise DataNotFoundError(_not_found_message(release, dirs, " and download=False"))
        try:
            found = "zip", _download(release, cache_dir(), progress=progress)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise DataNotFoundError(_not_found_message(release, dirs, f" and downloading {release.url} failed ({err})")) from err
    kind, path = found
    if not release.verified:
        warnings.warn(f"{release.name}: no SHA-256 checksums are recorded for this release in mrec_utils.data.RELEASES, "
                      f"so the content read from {path} is unverified.", UnverifiedDataWarning, stacklevel=2)
    ml = _frames(release, _read_files(release, kind, path), str(path))
    ml.source, ml.verified = str(path), release.verified
    return ml


# ============================================================================ item text
def _top_tags(tags: pd.DataFrame, max_tags: int) -> dict[int, list[str]]:
    """item_id -> up to ``max_tags`` normalised tags, most users first, ties alphabetical."""
    t = tags[[c for c in ("item_id", "tag", "user_id") if c in tags.columns]].dropna(subset=["tag"])
    t = t.assign(tag=t["tag"].astype(str).str.replace(r"\s+", " ", regex=True).str.strip().str.lower())
    t = t[t["tag"] != ""]
    if "user_id" in t.columns:
        t = t.drop_duplicates(["item_id", "tag", "user_id"])
    counts = t.groupby(["item_id", "tag"], sort=False).size().rename("n").reset_index()
    counts = counts.sort_values(["item_id", "n", "tag"], ascending=[True, False, True], kind="stable")
    return counts.groupby("item_id", sort=False).head(max_tags).groupby("item_id", sort=False)["tag"].agg(list).to_dict()


def item_text(items: pd.DataFrame, tags: pd.DataFrame | None = None, max_tags: int = 3) -> pd.Series:
    """One line of text per movie (str Series indexed by ``item_id``, in the order of ``items``), e.g.
    ``"Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy. Tags: pixar, fun."`` ``items``,
    ``tags``: :attr:`MovieLens.items` and :attr:`MovieLens.tags` (or frames with their columns). Parts without data are
    left out. Tags are lower-cased, whitespace-normalised and counted once per user; the ``max_tags`` most frequent are
    kept, ties alphabetical."""
    for frame, cols, what in ((items, ("item_id", "title", "genres"), "items"), (tags, ("item_id", "tag"), "tags")):
        missing = [] if frame is None else [c for c in cols if c not in frame.columns]
        if missing:
            raise ValueError(f"{what} lacks column(s) {missing}; pass MovieLens.{what} from load_movielens()")
    top = {} if tags is None or max_tags == 0 or len(tags) == 0 else _top_tags(tags, int(max_tags))
    years = items["year"].tolist() if "year" in items.columns else [None] * len(items)
    texts = []
    for item_id, title, year, genres in zip(items["item_id"].tolist(), items["title"].tolist(), years, items["genres"].tolist()):
        if genres is None or (isinstance(genres, float) and math.isnan(genres)):
            genres = []
        elif not isinstance(genres, (list, tuple, np.ndarray)):
            raise TypeError(f"genres of item {item_id} is {type(genres).__name__}, expected a list of str "
                            "(as load_movielens returns)")
        title = "" if title is None or title is pd.NA else str(title).strip()
        head = f"{title} ({int(year)})" if year is not None and not pd.isna(year) else title
        text = head if head.endswith((".", "!", "?")) else f"{head}."
        text += f" Genres: {', '.join(map(str, genres))}." if len(genres) else ""
        texts.append(text + (f" Tags: {', '.join(top[item_id])}." if item_id in top else ""))
    return pd.Series(texts, index=pd.Index(items["item_id"].to_numpy(), name="item_id"), name="text", dtype=object)
