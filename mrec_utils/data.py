"""MovieLens releases: find, verify, download and parse them into tidy pandas frames.

Example::

    from mrec_utils.data import load_movielens, item_text
    ml = load_movielens()                      # ml-latest-small by default
    item_text(ml.items, ml.tags).loc[1]
    # 'Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy. Tags: pixar, fun.'

Where the data comes from
-------------------------
For a release ``name`` (see :data:`RELEASES` / :func:`available_releases`) the loader looks, in
this order, in

1. the ``data_dir`` argument,
2. the folder named by the environment variable ``MREC_DATA_DIR``,
3. the user cache: ``MREC_CACHE_DIR`` if set, else ``~/.cache/mrec_utils``,

and takes the first folder that holds either the extracted folder ``<name>/`` (with the files of
the official archive) or the official archive ``<name>.zip``. Members are read straight out of the
zip; nothing is ever extracted or written next to the data (it may be read-only). Each file that is
read is checked against the SHA-256 and byte size recorded in :data:`RELEASES`; a successful check
is remembered in-process per (path, size, mtime), so repeated loads do not hash again.

If no copy is found and ``download=True`` the official archive is fetched from GroupLens into the
user cache (to a temporary file in the same folder, verified, then atomically renamed), so an
interrupted or corrupt download never leaves a file that looks valid. Releases whose checksums are
not recorded (ml-1m, ml-25m, ml-32m) load with an :class:`UnverifiedDataWarning`.

Schema (the same for every release)
-----------------------------------
``MovieLens.ratings`` -- one row per rating, shape (n_ratings, 4), in file order:

    user_id    int64
    item_id    int64                 the release's movie id
    rating     float64               0.5-5.0 in half stars (ml-latest-*), 1-5 (ml-100k, ml-1m)
    timestamp  datetime64[ns, UTC]   from Unix seconds

``MovieLens.items`` -- one row per movie, shape (n_items, 4):

    item_id    int64
    title      str                   the title without the trailing "(1995)" and surrounding spaces
    year       Int64 (nullable)      that year; <NA> when the title has none (ml-100k falls back to
                                     the year of its release date). Ranges such as "(2006-2007)"
                                     are left in the title, with year <NA>.
    genres     object (list[str])    "(no genres listed)" (ml-latest) and the "unknown" flag
                                     (ml-100k) become []; ml-100k genres follow u.genre order.
                                     Genre names are the release's own ("Children" in ml-latest,
                                     "Children's" in ml-100k and ml-1m).

``MovieLens.tags`` -- ml-latest-small, ml-25m, ml-32m; ``None`` otherwise; shape (n_tags, 4):

    user_id int64, item_id int64, tag str (as typed by the user), timestamp datetime64[ns, UTC]

``MovieLens.users`` -- ml-100k and ml-1m; ``None`` otherwise; shape (n_users, 6):

    user_id          int64
    gender           str     "M" or "F"
    age              int64   ml-100k: age in years. ml-1m: the age-group code, which GroupLens
                             chose to be the group's lower bound (1 = "under 18", 18 = 18-24,
                             25 = 25-34, 35 = 35-44, 45 = 45-49, 50 = 50-55, 56 = 56+).
    occupation       str     ml-100k: the occupation as published ("technician", "none", ...).
                             ml-1m: the code decoded with the ml-1m README (:data:`ML1M_OCCUPATIONS`).
    zip              str     as published (not always a US ZIP code)
    occupation_code  Int64   ml-1m: the published code 0-20; ml-100k: <NA> (it publishes names only)

Errors say what to do: :class:`DataNotFoundError` (a ``FileNotFoundError``: no copy found and no
download, or a file missing from a folder / archive), :class:`ChecksumError` (a ``ValueError``),
:class:`MalformedFileError` (a ``ValueError`` naming the file and line) and
:class:`CorruptArchiveError` (a ``ValueError``: the zip cannot be read).

Please cite F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and
Context. ACM TiiS 5, 4: 19:1-19:19, and respect each release's license (only ml-latest-small may be
redistributed).
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
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "FileSpec",
    "Release",
    "RELEASES",
    "MovieLens",
    "available_releases",
    "load_movielens",
    "item_text",
    "cache_dir",
    "search_dirs",
    "ML1M_OCCUPATIONS",
    "ML1M_AGE_GROUPS",
    "DataNotFoundError",
    "ChecksumError",
    "MalformedFileError",
    "CorruptArchiveError",
    "UnverifiedDataWarning",
]

BASE_URL = "https://files.grouplens.org/datasets/movielens/"
DEFAULT_RELEASE = "ml-latest-small"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class DataNotFoundError(FileNotFoundError):
    """No usable copy of a release (or of one of its files) was found."""


class ChecksumError(ValueError):
    """A file's SHA-256 or size differs from the value recorded in :data:`RELEASES`."""


class MalformedFileError(ValueError):
    """A data file does not follow its release's format. ``file`` and ``line`` (1-based) say where."""

    def __init__(self, message: str, file: str = "", line: int | None = None):
        super().__init__(message)
        self.file = file
        self.line = line


class CorruptArchiveError(ValueError):
    """A ``.zip`` archive cannot be read (truncated, not a zip, or a member fails its CRC)."""


class UnverifiedDataWarning(UserWarning):
    """A release was loaded whose content cannot be checked against recorded checksums."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileSpec:
    """One member of a release archive: its file name, byte size and SHA-256 (``None`` = unknown)."""

    name: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Release:
    """A MovieLens release: where it lives, how its archive is laid out and how to check it.

    ``layout`` is one of ``"latest"`` (UTF-8 CSV with header: ratings.csv, movies.csv, tags.csv),
    ``"100k"`` (u.data tab-separated; u.item, u.user, u.genre ``|``-separated latin-1) or ``"1m"``
    (``::``-separated latin-1 .dat files). ``files`` lists the archive members this package knows
    about, with sizes and checksums where they are established.
    """

    name: str
    url: str
    folder: str
    layout: str
    ratings_file: str
    items_file: str
    tags_file: str | None
    users_file: str | None
    files: tuple[FileSpec, ...]
    archive_size: int | None = None
    genre_file: str | None = None
    description: str = ""

    @property
    def archive_name(self) -> str:
        """File name of the official archive, e.g. ``"ml-100k.zip"``."""
        return f"{self.name}.zip"

    @property
    def read_files(self) -> tuple[str, ...]:
        """The members :func:`load_movielens` reads (and verifies), in reading order."""
        names = [self.ratings_file, self.items_file, self.genre_file, self.tags_file, self.users_file]
        return tuple(n for n in names if n is not None)

    def file(self, name: str) -> FileSpec:
        """The :class:`FileSpec` of member ``name`` (size/checksum ``None`` if not recorded)."""
        for f in self.files:
            if f.name == name:
                return f
        return FileSpec(name)

    @property
    def verified(self) -> bool:
        """True when every file the loader reads has a recorded SHA-256."""
        return all(self.file(n).sha256 is not None for n in self.read_files)


def _release(name: str, **kw) -> Release:
    return Release(name=name, url=f"{BASE_URL}{name}.zip", folder=name, **kw)


RELEASES: dict[str, Release] = {
    r.name: r
    for r in (
        _release(
            "ml-latest-small",
            layout="latest",
            ratings_file="ratings.csv",
            items_file="movies.csv",
            tags_file="tags.csv",
            users_file=None,
            files=(
                FileSpec("ratings.csv", 2483723, "aa289ca83157595d0df6aea1be6a4ded676ddc4385472e8313a8ed9805352646"),
                FileSpec("movies.csv", 494431, "5a5f32dd9bb3797b8e728a1b98958789d2b13f294a69fdfbc5727f8a9611aa07"),
                FileSpec("tags.csv", 118660, "92a9f8bb7916dceef6151209845788c3643f794dfa79d1feaec7121b5960399d"),
                FileSpec("links.csv", 197979, "97ad18e4e56a09363c65676b6cb3482ce3e2cea2372a24620c1599c843325f31"),
                FileSpec("README.txt", 8342, "63d22ac138e80fae37021797ed8e1b9424b5239dc576a137422adf783ae3f404"),
            ),
            description="610 users, 9,742 movies, 100,836 ratings, 3,683 tags (2018); redistributable",
        ),
        _release(
            "ml-100k",
            layout="100k",
            ratings_file="u.data",
            items_file="u.item",
            tags_file=None,
            users_file="u.user",
            genre_file="u.genre",
            files=(
                FileSpec("u.data", 1979173, "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"),
                FileSpec("u.item", 236344, "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701"),
                FileSpec("u.user", 22628, "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c"),
                FileSpec("u.genre", 202, "9757e0d3e6b298159a80dd48eaf938114690e911e39af97a76949ef1663610bb"),
                FileSpec("u.occupation", 193, "cd5fbec9afe345d993a62fc7817df1a4a9079c4feb267b3118763b8fd942137d"),
                FileSpec("u.info", 36, "5b0a40b2e47a729ee6203063f6dcf8790c2e63f5a18663e6ee318a72c5f3c27b"),
            ),
            description="943 users, 1,682 movies, 100,000 ratings with demographics (1998)",
        ),
        _release(
            "ml-1m",
            layout="1m",
            ratings_file="ratings.dat",
            items_file="movies.dat",
            tags_file=None,
            users_file="users.dat",
            files=(FileSpec("ratings.dat"), FileSpec("movies.dat"), FileSpec("users.dat"), FileSpec("README")),
            description="6,040 users, ~3,900 movies, 1,000,209 ratings with demographics (2003); unverified",
        ),
        _release(
            "ml-25m",
            layout="latest",
            ratings_file="ratings.csv",
            items_file="movies.csv",
            tags_file="tags.csv",
            users_file=None,
            files=tuple(
                FileSpec(n)
                for n in ("ratings.csv", "movies.csv", "tags.csv", "links.csv",
                          "genome-scores.csv", "genome-tags.csv", "README.txt")
            ),
            description="162,541 users, 62,423 movies, 25,000,095 ratings, 1,093,360 tags (2019); unverified",
        ),
        _release(
            "ml-32m",
            layout="latest",
            ratings_file="ratings.csv",
            items_file="movies.csv",
            tags_file="tags.csv",
            users_file=None,
            files=tuple(FileSpec(n) for n in ("ratings.csv", "movies.csv", "tags.csv", "links.csv", "README.txt")),
            description="200,948 users, 87,585 movies, 32,000,204 ratings, 2,000,072 tags (2023); unverified",
        ),
    )
}
"""Known releases by name. Entries are frozen; tests may swap an entry, never edit one in place."""

#: ml-1m ``users.dat`` occupation codes, from the ml-1m README.
ML1M_OCCUPATIONS: dict[int, str] = {
    0: "other or not specified", 1: "academic/educator", 2: "artist", 3: "clerical/admin",
    4: "college/grad student", 5: "customer service", 6: "doctor/health care",
    7: "executive/managerial", 8: "farmer", 9: "homemaker", 10: "K-12 student", 11: "lawyer",
    12: "programmer", 13: "retired", 14: "sales/marketing", 15: "scientist", 16: "self-employed",
    17: "technician/engineer", 18: "tradesman/craftsman", 19: "unemployed", 20: "writer",
}

#: ml-1m ``users.dat`` age-group codes (each code is the group's lower bound; 1 = under 18).
ML1M_AGE_GROUPS: dict[int, str] = {
    1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+",
}


def available_releases() -> list[str]:
    """Names of the releases :func:`load_movielens` knows, default first."""
    return list(RELEASES)


def _get_release(name: str) -> Release:
    if not isinstance(name, str):
        raise TypeError(f"name must be a release name (str), got {type(name).__name__}; "
                        f"valid names: {', '.join(available_releases())}")
    try:
        return RELEASES[name]
    except KeyError:
        raise ValueError(f"unknown MovieLens release {name!r}; valid names: "
                         f"{', '.join(available_releases())}") from None


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------
@dataclass
class MovieLens:
    """A loaded release in the schema of the module docstring.

    ``source`` is the folder or zip that was read; ``verified`` says whether every file read was
    checked against a recorded SHA-256.
    """

    name: str
    ratings: pd.DataFrame
    items: pd.DataFrame
    tags: pd.DataFrame | None = None
    users: pd.DataFrame | None = None
    source: str = ""
    verified: bool = False

    def __repr__(self) -> str:
        parts = [f"{len(self.ratings):,} ratings", f"{self.ratings['user_id'].nunique():,} users",
                 f"{len(self.items):,} items"]
        if self.tags is not None:
            parts.append(f"{len(self.tags):,} tags")
        if self.users is not None:
            parts.append(f"{len(self.users):,} user profiles")
        return f"MovieLens({self.name!r}: {', '.join(parts)}; verified={self.verified})"


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """The user cache: ``$MREC_CACHE_DIR`` if set, else ``~/.cache/mrec_utils`` (not created here)."""
    env = os.environ.get("MREC_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mrec_utils"


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for a release, in priority order: ``data_dir``, ``$MREC_DATA_DIR``, cache."""
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path (str or os.PathLike) or None, "
                        f"got {type(data_dir).__name__}")
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get("MREC_DATA_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(cache_dir())
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


@dataclass(frozen=True)
class _Source:
    kind: str  # "folder" | "zip"
    path: Path


def _folder_missing(folder: Path, release: Release) -> list[str]:
    return [f for f in release.read_files if not (folder / f).is_file()]


def _find_local(release: Release, dirs: Sequence[Path]) -> _Source | None:
    """First copy of ``release`` in ``dirs``: a complete folder, else the zip, else a partial folder
    (which raises, naming the missing file)."""
    for d in dirs:
        folder, archive = d / release.folder, d / release.archive_name
        if not folder.is_dir() and d.name == release.folder and (d / release.ratings_file).is_file():
            folder = d  # data_dir points at the extracted folder itself
        if folder.is_dir() and not _folder_missing(folder, release):
            return _Source("folder", folder)
        if archive.is_file():
            return _Source("zip", archive)
        if folder.is_dir():
            missing = _folder_missing(folder, release)
            raise DataNotFoundError(
                f"{missing[0]!r} is missing from the folder {folder} (release {release.name!r} needs "
                f"{', '.join(release.read_files)}). Extract the complete {release.archive_name} from "
                f"{release.url} there, or put the zip itself in {d} instead of the folder.")
    return None


# --------------------------------------------------------------------------------------------
# Reading and verifying raw bytes
# --------------------------------------------------------------------------------------------
_VERIFIED: set[tuple] = set()  # (path, member, size, mtime_ns, sha256) checked in this process


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_bytes(data: bytes, spec: FileSpec, where: str) -> None:
    if spec.size is not None and len(data) != spec.size:
        raise ChecksumError(
            f"{spec.name} in {where} has {len(data):,} bytes, expected {spec.size:,} "
            f"(sha256 expected {spec.sha256}, actual {_sha256(data)}). The file is truncated or a "
            f"different version: replace it with the one from the official archive.")
    if spec.sha256 is not None:
        actual = _sha256(data)
        if actual != spec.sha256:
            raise ChecksumError(
                f"checksum mismatch for {spec.name} in {where}: expected sha256 {spec.sha256}, "
                f"actual {actual}. The file is corrupt or a different version: replace it with "
                f"the one from the official archive.")


def _zip_member(zf: zipfile.ZipFile, release: Release, fname: str, path: Path) -> str:
    names = set(zf.namelist())
    for cand in (f"{release.folder}/{fname}", fname):
        if cand in names:
            return cand
    raise DataNotFoundError(
        f"{fname!r} is missing from the archive {path} (expected member "
        f"'{release.folder}/{fname}'). The archive is not the official {release.archive_name}: "
        f"delete it and download {release.url} again.")


def _read_files(release: Release, src: _Source) -> dict[str, bytes]:
    """Bytes of every file in ``release.read_files``, each checked against its FileSpec."""
    out: dict[str, bytes] = {}
    if src.kind == "folder":
        for fname in release.read_files:
            p = src.path / fname
            if not p.is_file():
                raise DataNotFoundError(f"{fname!r} is missing from the folder {src.path}; extract "
                                        f"the complete {release.archive_name} from {release.url}.")
            data = p.read_bytes()
            _verify_cached(data, release.file(fname), p, "", str(src.path))
            out[fname] = data
        return out
    path = src.path
    st = path.stat()
    if release.archive_size is not None and st.st_size != release.archive_size:
        raise ChecksumError(
            f"{path} has {st.st_size:,} bytes, expected {release.archive_size:,} for "
            f"{release.archive_name}: delete it and download {release.url} again.")
    try:
        with zipfile.ZipFile(path) as zf:
            for fname in release.read_files:
                member = _zip_member(zf, release, fname, path)
                data = zf.read(member)
                _verify_cached(data, release.file(fname), path, member, str(path))
                out[fname] = data
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise CorruptArchiveError(
            f"{path} is not a readable zip archive ({err}). Delete it and download "
            f"{release.url} again (or put the extracted folder '{release.folder}/' there).") from err
    return out


def _verify_cached(data: bytes, spec: FileSpec, path: Path, member: str, where: str) -> None:
    if spec.sha256 is None and spec.size is None:
        return
    st = path.stat()
    key = (str(path.resolve()), member, st.st_size, st.st_mtime_ns, spec.size, spec.sha256)
    if key in _VERIFIED:
        return
    _check_bytes(data, spec, where)
    _VERIFIED.add(key)


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------
def _not_found_message(release: Release, dirs: Sequence[Path], reason: str) -> str:
    searched = "\n".join(f"  - {d}{'' if d.is_dir() else ' (does not exist)'}" for d in dirs)
    return (
        f"MovieLens release {release.name!r} was not found locally{reason}.\n"
        f"Download {release.url} and put the file '{release.archive_name}' (or the folder "
        f"'{release.folder}/' extracted from it) into one of the folders searched:\n{searched}\n"
        f"or set the environment variable MREC_DATA_DIR to the folder that holds it "
        f"(or pass data_dir=...).")


def _validate_archive(tmp: Path, release: Release) -> None:
    """Check a freshly downloaded archive before it gets its final name."""
    if release.archive_size is not None and tmp.stat().st_size != release.archive_size:
        raise ChecksumError(
            f"the download of {release.url} has {tmp.stat().st_size:,} bytes, expected "
            f"{release.archive_size:,}; nothing was kept. Try again, or download it by hand.")
    try:
        with zipfile.ZipFile(tmp) as zf:
            for fname in release.read_files:
                member = _zip_member(zf, release, fname, tmp)
                spec = release.file(fname)
                if spec.sha256 is None and spec.size is None:
                    continue  # unverified release: the member exists; its CRC is checked on reading
                _check_bytes(zf.read(member), spec, f"the download of {release.url}")
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise CorruptArchiveError(
            f"the download of {release.url} is not a valid zip archive ({err}); nothing was kept. "
            f"Try again, or download it by hand.") from err


def _download(release: Release, dest_dir: Path, progress: bool = True) -> Path:
    """Fetch ``release.url`` to ``dest_dir/<name>.zip`` via a verified temporary file."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / release.archive_name
    fd, tmp_name = tempfile.mkstemp(prefix=f".{release.archive_name}.", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(release.url, headers={"User-Agent": "mrec_utils"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                headers = getattr(resp, "headers", None)
                length = headers.get("Content-Length") if headers is not None else None
                total = int(length) if length and str(length).isdigit() else None
                bar = None
                if progress and (total is None or total > 8 * 2**20):
                    from tqdm.auto import tqdm

                    bar = tqdm(total=total, unit="B", unit_scale=True, leave=False,
                               desc=release.archive_name)
                try:
                    while chunk := resp.read(2**20):
                        out.write(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
                finally:
                    if bar is not None:
                        bar.close()
        _validate_archive(tmp, release)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
def _int(s: str) -> object:
    return int(s.strip())


def _float(s: str) -> object:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError
    return v


def _flag(s: str) -> object:
    if s.strip() not in ("0", "1"):
        raise ValueError
    return int(s)


def _codes(allowed: Sequence[int]) -> Callable[[str], object]:
    def conv(s: str) -> object:
        v = int(s.strip())
        if v not in allowed:
            raise ValueError
        return v
    return conv


def _gender(s: str) -> object:
    if s not in ("M", "F"):
        raise ValueError
    return s


def _text(s: str) -> object:
    return s


def _nonempty(s: str) -> object:
    if not s.strip():
        raise ValueError
    return s


_WHAT = {_int: "an integer", _float: "a finite number", _flag: "a 0/1 flag", _gender: "M or F",
         _text: "text", _nonempty: "non-empty text"}
_DTYPE = {_int: "int64", _float: "float64", _flag: "int8", _gender: "str", _text: "str",
          _nonempty: "str"}


@dataclass(frozen=True)
class _Table:
    """How one data file is laid out: separator, header, and a converter per column."""

    sep: str
    columns: tuple[tuple[str, Callable[[str], object]], ...]
    header: tuple[str, ...] | None = None
    encoding: str = "utf-8"
    quoted: bool = False  # CSV quoting ("..." around fields with commas)


_ML1M_AGES = tuple(ML1M_AGE_GROUPS)
_ML1M_OCC = tuple(ML1M_OCCUPATIONS)

_TABLES: dict[tuple[str, str], _Table] = {
    ("latest", "ratings"): _Table(",", (("user_id", _int), ("item_id", _int), ("rating", _float),
                                        ("timestamp", _int)),
                                  header=("userId", "movieId", "rating", "timestamp"), quoted=True),
    ("latest", "items"): _Table(",", (("item_id", _int), ("title", _nonempty), ("genres", _nonempty)),
                                header=("movieId", "title", "genres"), quoted=True),
    ("latest", "tags"): _Table(",", (("user_id", _int), ("item_id", _int), ("tag", _text),
                                     ("timestamp", _int)),
                               header=("userId", "movieId", "tag", "timestamp"), quoted=True),
    ("100k", "ratings"): _Table("\t", (("user_id", _int), ("item_id", _int), ("rating", _float),
                                       ("timestamp", _int)), encoding="latin-1"),
    ("100k", "items"): _Table("|", (("item_id", _int), ("title", _nonempty), ("release_date", _text),
                                    ("video_release_date", _text), ("url", _text))
                              + tuple((f"g{i}", _flag) for i in range(19)), encoding="latin-1"),
    ("100k", "users"): _Table("|", (("user_id", _int), ("age", _int), ("gender", _gender),
                                    ("occupation", _nonempty), ("zip", _nonempty)), encoding="latin-1"),
    ("100k", "genres"): _Table("|", (("genre", _nonempty), ("index", _int)), encoding="latin-1"),
    ("1m", "ratings"): _Table("::", (("user_id", _int), ("item_id", _int), ("rating", _float),
                                     ("timestamp", _int)), encoding="latin-1"),
    ("1m", "items"): _Table("::", (("item_id", _int), ("title", _nonempty), ("genres", _nonempty)),
                            encoding="latin-1"),
    ("1m", "users"): _Table("::", (("user_id", _int), ("gender", _gender),
                                   ("age", _codes(_ML1M_AGES)), ("occupation_code", _codes(_ML1M_OCC)),
                                   ("zip", _nonempty)), encoding="latin-1"),
}


class _BadRow(Exception):
    def __init__(self, line: int, reason: str):
        super().__init__(reason)
        self.line, self.reason = line, reason


def _rows(text: str, table: _Table) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) for each non-blank row."""
    if table.quoted:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        start = 1
        try:
            for row in reader:
                if row:
                    yield start, row
                start = reader.line_num + 1
        except csv.Error as err:
            raise _BadRow(start, f"unreadable CSV ({err})") from err
        return
    for i, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield i, line.split(table.sep)


def _find_bad_line(data: bytes, table: _Table) -> tuple[int, str] | None:
    """Slow line-by-line check; returns (line, reason) of the first row that breaks ``table``."""
    try:
        text = data.decode("utf-8-sig" if table.encoding == "utf-8" else table.encoding)
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        return line, f"bytes that are not valid {table.encoding} ({err.reason})"
    n = len(table.columns)
    rows = _rows(text, table)
    try:
        if table.header is not None:
            first = next(rows, None)
            if first is None:
                return 1, f"the file is empty; expected the header {','.join(table.header)}"
            if tuple(first[1]) != table.header:
                return first[0], (f"expected the header {','.join(table.header)!r}, "
                                  f"found {','.join(first[1])!r}")
        for line, fields in rows:
            if len(fields) != n:
                return line, f"expected {n} fields separated by {table.sep!r}, found {len(fields)}"
            for k, ((col, conv), value) in enumerate(zip(table.columns, fields), 1):
                try:
                    conv(value)
                except ValueError:
                    what = _WHAT.get(conv, "one of the documented codes")
                    return line, f"field {k} ({col}) is {value!r}, expected {what}"
    except _BadRow as bad:
        return bad.line, bad.reason
    return None


def _raise_malformed(fname: str, where: str, table: _Table, data: bytes, cause: Exception | None) -> None:
    bad = _find_bad_line(data, table)
    if bad is None and cause is None:
        return
    if bad is None:
        raise MalformedFileError(f"{fname} in {where} could not be parsed ({cause}). Replace it with "
                                 f"the file from the official archive.", file=fname) from cause
    line, reason = bad
    raise MalformedFileError(
        f"{fname} in {where}, line {line}: {reason}. The file does not follow the MovieLens format; "
        f"replace it with the file from the official archive.", file=fname, line=line) from cause


def _parse(data: bytes, table: _Table, fname: str, where: str) -> pd.DataFrame:
    """Parse ``data`` with pandas (fast path); on any problem locate the bad line and raise."""
    names = [c for c, _ in table.columns]
    dtypes = {c: _DTYPE.get(conv, "int64") for c, conv in table.columns}
    buf, sep, engine = data, table.sep, "c"
    if len(sep) > 1:  # "::" -- map to a byte absent from the file so the fast C parser can be used
        if b"\t" not in data:
            buf, sep = data.replace(sep.encode(), b"\t"), "\t"
        else:
            engine = "python"
    cause: Exception | None = None
    df = None
    try:
        if table.header is not None:
            first = data.split(b"\n", 1)[0].rstrip(b"\r").decode(table.encoding, "replace").lstrip("\ufeff")
            if tuple(first.split(table.sep)) != table.header:
                raise ValueError("unexpected header")
        df = pd.read_csv(
            io.BytesIO(buf), sep=sep, header=0 if table.header is not None else None, names=names,
            dtype=dtypes, encoding=table.encoding, na_filter=False, engine=engine,
            quoting=csv.QUOTE_MINIMAL if table.quoted else csv.QUOTE_NONE,
        )
    except Exception as err:  # noqa: BLE001 - any parser failure is reported with its line
        cause = err
    if df is not None and _looks_wrong(df, table):
        df = None
    if df is None:
        _raise_malformed(fname, where, table, data, cause or ValueError("invalid values"))
    return df


def _looks_wrong(df: pd.DataFrame, table: _Table) -> bool:
    """Cheap vectorised checks for what the C parser lets through (short rows, bad codes)."""
    for col, conv in table.columns:
        s = df[col]
        if s.isna().any():
            return True
        if conv is _float and not np.isfinite(s.to_numpy()).all():
            return True
        if conv is _flag and not s.isin((0, 1)).all():
            return True
        if conv in (_nonempty,) and (s.str.strip() == "").any():
            return True
        if conv is _gender and not s.isin(("M", "F")).all():
            return True
        if conv not in _WHAT and not s.isin(_ML1M_AGES if col == "age" else _ML1M_OCC).all():
            return True
    return False


def _to_utc(seconds: pd.Series) -> pd.Series:
    return pd.to_datetime(seconds, unit="s", utc=True).astype("datetime64[ns, UTC]")


_YEAR_RE = r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$"


def _split_title(titles: pd.Series) -> tuple[pd.Series, pd.Series]:
    parts = titles.str.extract(_YEAR_RE)
    title = parts["title"].where(parts["year"].notna(), titles.str.strip())
    year = pd.to_numeric(parts["year"]).astype("Int64")
    return title.astype(str), year


def _ratings_frame(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": df["user_id"].astype("int64"),
        "item_id": df["item_id"].astype("int64"),
        "rating": df["rating"].astype("float64"),
        "timestamp": _to_utc(df["timestamp"]),
    })


def _items_frame(item_id: pd.Series, titles: pd.Series, genres: list[list[str]],
                 fallback_year: pd.Series | None = None) -> pd.DataFrame:
    title, year = _split_title(titles)
    if fallback_year is not None:
        year = year.fillna(fallback_year)
    return pd.DataFrame({
        "item_id": item_id.astype("int64"),
        "title": title,
        "year": year.astype("Int64"),
        "genres": pd.Series(genres, index=item_id.index, dtype=object),
    })


def _split_genres(genres: pd.Series) -> list[list[str]]:
    return [[] if g == "(no genres listed)" else g.split("|") for g in genres.tolist()]


def _load_latest(release: Release, raw: dict[str, bytes], where: str) -> MovieLens:
    r = _parse(raw[release.ratings_file], _TABLES["latest", "ratings"], release.ratings_file, where)
    m = _parse(raw[release.items_file], _TABLES["latest", "items"], release.items_file, where)
    t = _parse(raw[release.tags_file], _TABLES["latest", "tags"], release.tags_file, where)
    tags = pd.DataFrame({
        "user_id": t["user_id"].astype("int64"),
        "item_id": t["item_id"].astype("int64"),
        "tag": t["tag"].astype(str),
        "timestamp": _to_utc(t["timestamp"]),
    })
    items = _items_frame(m["item_id"], m["title"], _split_genres(m["genres"]))
    return MovieLens(release.name, _ratings_frame(r), items, tags=tags)


def _load_100k(release: Release, raw: dict[str, bytes], where: str) -> MovieLens:
    r = _parse(raw[release.ratings_file], _TABLES["100k", "ratings"], release.ratings_file, where)
    g = _parse(raw[release.genre_file], _TABLES["100k", "genres"], release.genre_file, where)
    if len(g) != 19 or g["index"].tolist() != list(range(19)):
        raise MalformedFileError(
            f"{release.genre_file} in {where} must list 19 genres numbered 0-18 (found {len(g)}); "
            f"replace it with the file from the official archive.", file=release.genre_file)
    m = _parse(raw[release.items_file], _TABLES["100k", "items"], release.items_file, where)
    names = g["genre"].astype(str).tolist()
    flags = m[[f"g{i}" for i in range(19)]].to_numpy(dtype=bool)
    genres = [[names[j] for j in np.flatnonzero(row) if names[j] != "unknown"] for row in flags]
    release_year = pd.to_datetime(m["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    items = _items_frame(m["item_id"], m["title"], genres, release_year.astype("Int64"))
    u = _parse(raw[release.users_file], _TABLES["100k", "users"], release.users_file, where)
    users = pd.DataFrame({
        "user_id": u["user_id"].astype("int64"),
        "gender": u["gender"].astype(str),
        "age": u["age"].astype("int64"),
        "occupation": u["occupation"].astype(str),
        "zip": u["zip"].astype(str),
        "occupation_code": pd.array([pd.NA] * len(u), dtype="Int64"),
    })
    return MovieLens(release.name, _ratings_frame(r), items, users=users)


def _load_1m(release: Release, raw: dict[str, bytes], where: str) -> MovieLens:
    r = _parse(raw[release.ratings_file], _TABLES["1m", "ratings"], release.ratings_file, where)
    m = _parse(raw[release.items_file], _TABLES["1m", "items"], release.items_file, where)
    items = _items_frame(m["item_id"], m["title"], _split_genres(m["genres"]))
    u = _parse(raw[release.users_file], _TABLES["1m", "users"], release.users_file, where)
    users = pd.DataFrame({
        "user_id": u["user_id"].astype("int64"),
        "gender": u["gender"].astype(str),
        "age": u["age"].astype("int64"),
        "occupation": u["occupation_code"].map(ML1M_OCCUPATIONS).astype(str),
        "zip": u["zip"].astype(str),
        "occupation_code": u["occupation_code"].astype("Int64"),
    })
    return MovieLens(release.name, _ratings_frame(r), items, users=users)


_LOADERS = {"latest": _load_latest, "100k": _load_100k, "1m": _load_1m}


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def load_movielens(name: str = DEFAULT_RELEASE, data_dir: str | os.PathLike | None = None, *,
                   download: bool = True, progress: bool = True) -> MovieLens:
    """Load a MovieLens release as tidy DataFrames (schema in the module docstring).

    Args:
        name: a key of :data:`RELEASES` (``available_releases()``); default ``"ml-latest-small"``.
        data_dir: folder holding ``<name>.zip`` or the extracted ``<name>/``; searched before
            ``$MREC_DATA_DIR`` and the user cache (:func:`cache_dir`).
        download: fetch the official archive into the user cache when no local copy exists.
        progress: show a progress bar for large downloads.

    Returns:
        :class:`MovieLens` with ``ratings`` (n_ratings, 4), ``items`` (n_items, 4), ``tags``
        (n_tags, 4) or None, ``users`` (n_users, 6) or None.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names).
        DataNotFoundError: no copy found and none could be downloaded (says the URL, the file name
            and where to put it), or a file is missing from a folder or archive.
        ChecksumError, MalformedFileError, CorruptArchiveError: the data is damaged.
    """
    release = _get_release(name)
    if not isinstance(download, bool):
        raise TypeError(f"download must be True or False, got {download!r}")
    dirs = search_dirs(data_dir)
    src = _find_local(release, dirs)
    if src is None:
        if not download:
            raise DataNotFoundError(_not_found_message(release, dirs, " and download=False"))
        try:
            path = _download(release, cache_dir(), progress=progress)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise DataNotFoundError(_not_found_message(
                release, dirs, f" and downloading {release.url} failed ({err})")) from err
        src = _Source("zip", path)
    if not release.verified:
        warnings.warn(
            f"{release.name}: no SHA-256 checksums are recorded for this release in "
            f"mrec_utils.data.RELEASES, so the content read from {src.path} is unverified.",
            UnverifiedDataWarning, stacklevel=2)
    raw = _read_files(release, src)
    ml = _LOADERS[release.layout](release, raw, str(src.path))
    ml.source = str(src.path)
    ml.verified = release.verified
    return ml


# --------------------------------------------------------------------------------------------
# Item text
# --------------------------------------------------------------------------------------------
def _top_tags(tags: pd.DataFrame, max_tags: int) -> dict[int, list[str]]:
    """item_id -> up to ``max_tags`` normalised tags, most users first, ties alphabetical."""
    if max_tags == 0 or len(tags) == 0:
        return {}
    cols = ["item_id", "tag"] + (["user_id"] if "user_id" in tags.columns else [])
    t = tags[cols].dropna(subset=["tag"]).copy()
    t["tag"] = (t["tag"].astype(str).str.replace(r"\s+", " ", regex=True).str.strip().str.lower())
    t = t[t["tag"] != ""]
    if "user_id" in t.columns:
        t = t.drop_duplicates(["item_id", "tag", "user_id"])
    counts = t.groupby(["item_id", "tag"], sort=False).size().rename("n").reset_index()
    counts = counts.sort_values(["item_id", "n", "tag"], ascending=[True, False, True], kind="stable")
    top = counts.groupby("item_id", sort=False).head(max_tags)
    return top.groupby("item_id", sort=False)["tag"].agg(list).to_dict()


def item_text(items: pd.DataFrame, tags: pd.DataFrame | None = None, max_tags: int = 3) -> pd.Series:
    """One line of text per movie, for language models: title, year, genres and top tags.

    ``"Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy. Tags: pixar, fun."``
    Parts without data are left out (no year, no genres, no tags). Tags are lower-cased and
    whitespace-normalised, counted once per user (per row when ``tags`` has no ``user_id``), and the
    ``max_tags`` most frequent are kept, ties broken alphabetically. Deterministic.

    Args:
        items: frame with ``item_id``, ``title``, ``genres`` (lists) and optionally ``year``,
            as :func:`load_movielens` returns; shape (n_items, >=3).
        tags: optional frame with ``item_id``, ``tag`` and optionally ``user_id``.
        max_tags: how many tags per movie (>= 0).

    Returns:
        Series of str, shape (n_items,), indexed by ``item_id`` in the order of ``items``.
    """
    if not isinstance(items, pd.DataFrame):
        raise TypeError(f"items must be a pandas DataFrame (MovieLens.items), got {type(items).__name__}")
    missing = [c for c in ("item_id", "title", "genres") if c not in items.columns]
    if missing:
        raise ValueError(f"items lacks column(s) {missing}; pass MovieLens.items from load_movielens()")
    if items["item_id"].duplicated().any():
        dup = items.loc[items["item_id"].duplicated(), "item_id"].iloc[0]
        raise ValueError(f"items has duplicate item_id values (e.g. {dup}); each movie must appear once")
    if isinstance(max_tags, bool) or not isinstance(max_tags, (int, np.integer)) or max_tags < 0:
        raise ValueError(f"max_tags must be an integer >= 0, got {max_tags!r}")
    top: dict[int, list[str]] = {}
    if tags is not None:
        if not isinstance(tags, pd.DataFrame):
            raise TypeError(f"tags must be a pandas DataFrame (MovieLens.tags) or None, "
                            f"got {type(tags).__name__}")
        lacking = [c for c in ("item_id", "tag") if c not in tags.columns]
        if lacking:
            raise ValueError(f"tags lacks column(s) {lacking}; pass MovieLens.tags from load_movielens()")
        top = _top_tags(tags, int(max_tags))
    years = items["year"].tolist() if "year" in items.columns else [None] * len(items)
    texts = []
    for item_id, title, year, genres in zip(items["item_id"].tolist(), items["title"].tolist(),
                                            years, items["genres"].tolist()):
        if isinstance(genres, (list, tuple, np.ndarray)):
            genres = [str(g) for g in genres]
        elif genres is None or (isinstance(genres, float) and math.isnan(genres)):
            genres = []
        else:
            raise TypeError(f"genres of item {item_id} is {type(genres).__name__}, expected a list of "
                            f"str (as load_movielens returns)")
        title = "" if title is None or title is pd.NA else str(title).strip()
        head = f"{title} ({int(year)})" if year is not None and not pd.isna(year) else title
        text = head if head.endswith((".", "!", "?")) else f"{head}."
        if genres:
            text += f" Genres: {', '.join(genres)}."
        if item_id in top:
            text += f" Tags: {', '.join(top[item_id])}."
        texts.append(text)
    return pd.Series(texts, index=pd.Index(items["item_id"].to_numpy(), name="item_id"),
                     name="text", dtype=object)
