"""Jane Austen's six novels as a small WikiText-style language-modelling corpus.

Source: Debian's ``r-cran-janeaustenr`` package (the R package *janeaustenr*,
Project Gutenberg texts), fetched with ``apt-get download`` so that no network
other than the Debian archive is needed.  Its books live in an R lazy-load
database (``data/Rdata.rdb`` + ``data/Rdata.rdx``) that we decode with the
PyPI package ``rdata``.  Without apt, pass a directory holding either those two
files or six plain-text books (``emma.txt``, ``pride_and_prejudice.txt``, ...).

Default layout (split by whole books, publication order)::

    train.txt  Sense & Sensibility, Pride & Prejudice, Mansfield Park, Emma
    valid.txt  Northanger Abbey
    test.txt   Persuasion

Words seen fewer than ``min_count`` (default 3) times in the *training* books
become ``<unk>`` in every file.  Extra files (e.g. a kNN datastore built from
books the LM never trains on) come from ``extra={"dstore": [...]}``.

Text conventions (WikiText-103-like):

* one paragraph per line, tokens separated by single spaces, no blank lines;
  case is kept;
* chapter/volume headings, "THE END"/"FINIS", the title pages (everything
  before the first heading, which also drops Northanger Abbey's one-paragraph
  "Advertisement") and Northanger Abbey's modern "A NOTE ON THE TEXT" are
  dropped;
* clitics split Moses-style before the apostrophe: ``don't`` -> ``don 't``,
  ``Emma's`` -> ``Emma 's``; a quote-mark apostrophe is its own token;
* intra-word hyphens and digit separators become WikiText joiners:
  ``good-humoured`` -> ``good @-@ humoured``, ``1,000`` -> ``1 @,@ 000``;
* the books' ``--`` em-dash is one token ``--``; other punctuation is split
  off character by character;
* titles and initials keep their period (``Mr.``, ``Mrs.``, ``St.``, ``E.``),
  except ``I.`` which usually ends a sentence;
* ``_underscores_`` marking italics are removed.

CLI: ``python -m knnlm.corpora.austen OUT_DIR [--data-dir DIR] [--min-count N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

PACKAGE = "r-cran-janeaustenr"
# Where the lazy-load data sits inside the extracted .deb.
PACKAGE_DATA_SUBDIR = Path("usr/lib/R/site-library/janeaustenr/data")

# (title, janeaustenr variable name), in publication order.
BOOKS = (
    ("Sense & Sensibility", "sensesensibility"),
    ("Pride & Prejudice", "prideprejudice"),
    ("Mansfield Park", "mansfieldpark"),
    ("Emma", "emma"),
    ("Northanger Abbey", "northangerabbey"),
    ("Persuasion", "persuasion"),
)
BOOK_TITLES = tuple(title for title, _ in BOOKS)
DEFAULT_VALID = "Northanger Abbey"
DEFAULT_TEST = "Persuasion"
UNK = "<unk>"
STAMP_NAME = "austen_corpus.json"
# Bump whenever cleaning/tokenisation changes, so old stamps stop matching.
FORMAT_VERSION = 1

BookNames = Union[str, Sequence[str]]

_NO_APT_HELP = (
    "Pass a local directory instead (data_dir=..., CLI --data-dir DIR) holding either the "
    "janeaustenr package's Rdata.rdb and Rdata.rdx, or six plain-text files named after "
    "the books: sense_and_sensibility.txt, pride_and_prejudice.txt, mansfield_park.txt, "
    "emma.txt, northanger_abbey.txt, persuasion.txt."
)


class AustenSourceError(RuntimeError):
    """The Austen texts could not be obtained or read."""


# --------------------------------------------------------------------------- names


def _book_key(name: str) -> str:
    # "Pride and Prejudice", "pride_and_prejudice", "prideprejudice" -> "prideprejudice"
    words = re.sub(r"[^a-z&]+", " ", name.lower()).replace("&", " ").split()
    return "".join(w for w in words if w != "and")


_KEY_TO_TITLE = {key: title for title, key in BOOKS}


def canonical_title(name: str) -> str:
    """Map any reasonable spelling of a book's name to its title in ``BOOK_TITLES``."""
    try:
        return _KEY_TO_TITLE[_book_key(name)]
    except KeyError:
        raise ValueError(f"unknown book {name!r}; expected one of {list(BOOK_TITLES)}") from None


# --------------------------------------------------------------------------- fetching


def default_workdir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "knnlm" / "janeaustenr"


def _has_rdata(folder: Path) -> bool:
    return (folder / "Rdata.rdb").is_file() and (folder / "Rdata.rdx").is_file()


def _find_deb(folders: Iterable[Path]) -> Path | None:
    for folder in folders:
        debs = sorted(Path(folder).glob(f"{PACKAGE}_*.deb"))
        if debs:
            return debs[-1]
    return None


# What apt-get says when the package lists were never downloaded (fresh container).
_NO_LISTS_RE = re.compile(r"unable to locate package|no installation candidate|can't select", re.I)


def _apt_download(workdir: Path) -> Path:
    def download() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir,
                              capture_output=True, text=True)

    result = download()
    if result.returncode != 0 and _NO_LISTS_RE.search(result.stderr):
        subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        result = download()
    deb = _find_deb([workdir])
    if result.returncode != 0 or deb is None:
        raise AustenSourceError(
            f"`apt-get download {PACKAGE}` failed:\n{result.stderr.strip()}\n{_NO_APT_HELP}")
    return deb


def fetch_austen_package(workdir: str | os.PathLike) -> Path:
    """Download and unpack Debian's r-cran-janeaustenr; return its ``data`` folder.

    Reuses an earlier extraction in ``workdir`` or a .deb already in ``workdir`` or
    apt's cache, so apt is only asked when needed.
    """
    workdir = Path(workdir)
    extracted = workdir / "extracted"
    data_dir = extracted / PACKAGE_DATA_SUBDIR
    if _has_rdata(data_dir):
        return data_dir
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise AustenSourceError(
            f"{' and '.join(missing)} not found, so {PACKAGE} cannot be fetched. {_NO_APT_HELP}")
    workdir.mkdir(parents=True, exist_ok=True)
    deb = _find_deb([workdir, Path("/var/cache/apt/archives")]) or _apt_download(workdir)
    # Extract to a temporary folder first so an interrupted run never looks finished.
    tmp = workdir / "extracted.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    if not _has_rdata(tmp / PACKAGE_DATA_SUBDIR):
        raise AustenSourceError(f"{deb} has no {PACKAGE_DATA_SUBDIR}/Rdata.rdb/.rdx")
    shutil.rmtree(extracted, ignore_errors=True)
    tmp.rename(extracted)
    return data_dir


# --------------------------------------------------------------------------- reading


def _r_unserialize(blob: bytes):
    import rdata  # only needed for the R database, not for the .txt fallback

    with warnings.catch_warnings():
        # A bare serialization (no RDS/RDA header word) makes rdata warn "assumed RDS".
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(blob))


def read_lazyload_db(base: str | os.PathLike) -> dict:
    """Read every object of an R lazy-load database ``base.rdb`` / ``base.rdx``.

    The .rdx is a (gzipped) serialized list whose ``variables`` maps each name to
    (offset, length) in the .rdb.  With ``compressed = TRUE`` (what R uses for
    package data, checked on r-cran-janeaustenr 1.0.0) a record is a 4-byte
    big-endian length of the uncompressed serialization followed by a zlib stream.
    """
    base = Path(base)
    index = _r_unserialize(base.with_suffix(".rdx").read_bytes())
    flag = index.get("compressed", True)
    flag = int(flag[0]) if hasattr(flag, "__len__") else int(flag)
    if flag not in (0, 1):  # 2/3 (bzip2/xz) add a type byte; no package here uses them
        raise AustenSourceError(f"unsupported lazy-load compression {flag} in {base}.rdx")
    rdb = base.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = rdb[int(offset):int(offset) + int(length)]
        if flag:
            size = int.from_bytes(record[:4], "big")
            record = zlib.decompress(record[4:])
            if len(record) != size:
                raise AustenSourceError(f"corrupt record {name!r} in {base}.rdb")
        objects[str(name)] = _r_unserialize(record)
    return objects


def read_austen_books(data_dir: str | os.PathLike) -> dict[str, str]:
    """Return ``{title: text}`` for the six novels, in publication order.

    ``data_dir`` holds the package's ``Rdata.rdb``/``.rdx`` (or is an extraction
    root / fetch workdir above them), or six ``.txt`` files whose names spell
    the titles (``emma.txt``, ``Pride and Prejudice.txt``, ...).
    """
    data_dir = Path(data_dir)
    for folder in (data_dir, data_dir / PACKAGE_DATA_SUBDIR,
                   data_dir / "extracted" / PACKAGE_DATA_SUBDIR):
        if _has_rdata(folder):
            objects = read_lazyload_db(folder / "Rdata")
            missing = [key for _, key in BOOKS if key not in objects]
            if missing:
                raise AustenSourceError(f"{folder}/Rdata.rdb lacks {missing}")
            # Each book is a character vector of lines; NA lines (none expected) -> "".
            return {title: "\n".join("" if line is None else str(line) for line in objects[key])
                    for title, key in BOOKS}

    found = {}
    for path in sorted(data_dir.glob("*.txt")):
        title = _KEY_TO_TITLE.get(_book_key(path.stem))
        if title is not None:
            found[title] = path.read_text(encoding="utf-8")
    missing = [title for title in BOOK_TITLES if title not in found]
    if missing:
        raise AustenSourceError(
            f"{data_dir} has neither Rdata.rdb/Rdata.rdx nor .txt files for {missing}. {_NO_APT_HELP}")
    return {title: found[title] for title in BOOK_TITLES}


# --------------------------------------------------------------------------- tokenising

_CHAPTER_RE = re.compile(r"^\s*(?:chapter|volume)\s+(?:[ivxlc]+|\d+)\.?\s*$", re.I)
_END_RE = re.compile(r"^\s*(?:the end|finis|a note on the text)\.?\s*$", re.I)
_HYPHEN_RE = re.compile(r"(?<=[^\W_])-(?=[^\W_])")
_DIGIT_SEP_RE = re.compile(r"(?<=\d)([,.])(?=\d)")
_ABBREVIATIONS = ("Mr", "Mrs", "Messrs", "Dr", "St", "Esq", "Col", "Capt", "Rev", "Co", "Bart", "Vol")
_ABBREV = "|".join(_ABBREVIATIONS)
_TOKEN_RE = re.compile(
    r"@[-,.]@"                       # WikiText joiners inserted by the two regexes above
    r"|-{2,}"                        # the books write an em-dash as "--"
    r"|&c\."                         # "et cetera"
    rf"|\b(?:{_ABBREV}|[A-HJ-Z])\.(?!\w)"  # titles, initials keep their period ("I." ends sentences)
    r"|(?<=[^\W_])'[^\W_]+"          # clitic after a word: don't -> don 't, Emma's -> Emma 's
    r"|[^\W_]+"                      # a word or number
    r"|\S"                           # any other symbol on its own
)


def tokenize_text(text: str) -> list[str]:
    """Tokenise running text (one paragraph) WikiText-style; see the module docstring."""
    text = text.replace("_", "")  # _italics_ markup
    text = _HYPHEN_RE.sub(" @-@ ", text)
    text = _DIGIT_SEP_RE.sub(r" @\1@ ", text)
    return _TOKEN_RE.findall(text)


def tokenize_wikitext_style(lines: Iterable[str] | str) -> list[str]:
    """Turn a book's lines into one tokenised paragraph per output string.

    Paragraphs are groups of non-blank lines; chapter/volume headings and
    "THE END"/"FINIS" lines are dropped (they also end a paragraph).
    """
    if isinstance(lines, str):
        lines = lines.splitlines()
    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        tokens = tokenize_text(" ".join(current))
        if tokens:
            paragraphs.append(" ".join(tokens))
        current.clear()

    for line in lines:
        if not line.strip() or _CHAPTER_RE.match(line) or _END_RE.match(line):
            flush()
        else:
            current.append(line.strip())
    flush()
    return paragraphs


def book_body(lines: Sequence[str]) -> list[str]:
    """The novel proper: from the first chapter/volume heading to the end marker.

    Drops title pages and editorial notes; text without headings is kept whole.
    """
    lines = list(lines)
    start = next((i for i, line in enumerate(lines) if _CHAPTER_RE.match(line)), 0)
    end = next((i for i in range(start, len(lines)) if _END_RE.match(lines[i])), len(lines))
    return lines[start:end]


# --------------------------------------------------------------------------- building


def _titles(names: BookNames) -> list[str]:
    return [canonical_title(names)] if isinstance(names, str) else [canonical_title(n) for n in names]


def plan_splits(train_books: int | Sequence[str] = 4, valid_book: BookNames = DEFAULT_VALID,
                test_book: BookNames = DEFAULT_TEST,
                extra: Mapping[str, BookNames] | None = None) -> dict[str, list[str]]:
    """Resolve the split arguments of :func:`build_austen_corpus` to ``{split: [titles]}``."""
    valid, test = _titles(valid_book), _titles(test_book)
    extras = {name: _titles(books) for name, books in (extra or {}).items()}
    for name in extras:
        if name in ("train", "valid", "test") or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"bad extra split name {name!r}")
    if isinstance(train_books, int):
        # The first N books, in publication order, not used by any other split.
        used = set(valid + test).union(*extras.values())
        pool = [title for title in BOOK_TITLES if title not in used]
        if not 1 <= train_books <= len(pool):
            raise ValueError(f"train_books={train_books}, but only {len(pool)} books are free: {pool}")
        train = pool[:train_books]
    else:
        train = _titles(train_books)
    core = train + valid + test
    if len(set(core)) != len(core):
        raise ValueError(f"train/valid/test must not share books: {train} / {valid} / {test}")
    for name, books in extras.items():
        leaked = set(books) & set(valid + test)
        if leaked:
            raise ValueError(f"extra split {name!r} reuses valid/test books {sorted(leaked)}")
    return {"train": train, "valid": valid, "test": test, **extras}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_austen_corpus(out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                        train_books: int | Sequence[str] = 4,
                        valid_book: BookNames = DEFAULT_VALID,
                        test_book: BookNames = DEFAULT_TEST,
                        min_count: int = 3,
                        extra: Mapping[str, BookNames] | None = None,
                        workdir: str | os.PathLike | None = None,
                        force: bool = False) -> dict:
    """Write ``train.txt``/``valid.txt``/``test.txt`` (+ ``<extra>.txt``) to ``out_dir``.

    ``train_books`` is a count N (the first N books in publication order that no
    other split uses) or a list of names; valid/test/extra take a name or a list.
    Vocabulary: training-book words with count >= ``min_count``; all others are
    ``<unk>`` in every file.  ``data_dir=None`` fetches the Debian package into
    ``workdir`` (default ``~/.cache/knnlm/janeaustenr``).  If the outputs exist
    and the stamp file records the same parameters, nothing is rebuilt.

    Returns stats: ``tokens``/``lines``/``unk_rate`` per split, ``vocab_size``
    (distinct types in train.txt, ``<unk>`` included), ``books``, ``min_count``,
    ``seconds`` and ``reused`` (True when the stamp matched).
    """
    if min_count < 1:
        raise ValueError("min_count must be >= 1")
    splits = plan_splits(train_books, valid_book, test_book, extra)
    out_dir = Path(out_dir)
    stamp = out_dir / STAMP_NAME
    params = {"format": FORMAT_VERSION, "splits": splits, "min_count": min_count,
              "data_dir": None if data_dir is None else str(Path(data_dir).resolve())}
    if not force and stamp.is_file() and all((out_dir / f"{s}.txt").is_file() for s in splits):
        recorded = json.loads(stamp.read_text())
        if recorded.get("params") == params:
            return {**recorded["stats"], "reused": True}

    start = time.time()
    source = Path(data_dir) if data_dir is not None else fetch_austen_package(workdir or default_workdir())
    books = read_austen_books(source)
    needed = {title for titles in splits.values() for title in titles}
    paragraphs = {title: [p.split() for p in tokenize_wikitext_style(book_body(text.splitlines()))]
                  for title, text in books.items() if title in needed}

    counts = Counter(tok for title in splits["train"] for para in paragraphs[title] for tok in para)
    vocab = {word for word, count in counts.items() if count >= min_count}

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)  # the files change below; never leave a stale stamp behind
    stats: dict = {"tokens": {}, "lines": {}, "unk_rate": {}, "books": splits, "min_count": min_count}
    for split, titles in splits.items():
        lines, n_tokens, n_unk = [], 0, 0
        for title in titles:
            for para in paragraphs[title]:
                tokens = [tok if tok in vocab else UNK for tok in para]
                n_tokens += len(tokens)
                n_unk += sum(tok not in vocab for tok in para)
                lines.append(" ".join(tokens))
        _write_atomic(out_dir / f"{split}.txt", "\n".join(lines) + "\n")
        stats["tokens"][split] = n_tokens
        stats["lines"][split] = len(lines)
        stats["unk_rate"][split] = round(n_unk / max(n_tokens, 1), 6)
    stats["vocab_size"] = len(vocab) + (1 if stats["unk_rate"]["train"] > 0 else 0)
    stats["seconds"] = round(time.time() - start, 2)
    _write_atomic(stamp, json.dumps({"params": params, "stats": stats}, indent=2) + "\n")
    return {**stats, "reused": False}


# --------------------------------------------------------------------------- CLI


def _names(arg: str) -> list[str]:
    return [name.strip() for name in arg.split(",") if name.strip()]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m knnlm.corpora.austen",
        description="Build a WikiText-style corpus from Jane Austen's novels "
                    "(Debian r-cran-janeaustenr).")
    parser.add_argument("out_dir")
    parser.add_argument("--data-dir", help="local Rdata.rdb/.rdx folder or folder of six .txt books "
                                           "(default: apt-get download the Debian package)")
    parser.add_argument("--workdir", help="where the .deb is downloaded and unpacked "
                                          "(default ~/.cache/knnlm/janeaustenr)")
    parser.add_argument("--min-count", type=int, default=3,
                        help="rarer training words become <unk> (default 3)")
    parser.add_argument("--train-books", default="4",
                        help="N (first N free books in publication order) or comma-separated titles")
    parser.add_argument("--valid-book", default=DEFAULT_VALID, help="title(s), comma-separated")
    parser.add_argument("--test-book", default=DEFAULT_TEST, help="title(s), comma-separated")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=BOOK[,BOOK...]",
                        help="also write NAME.txt from these books, e.g. dstore=Emma")
    parser.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    args = parser.parse_args(argv)

    extra = {}
    for item in args.extra:
        name, sep, books = item.partition("=")
        if not sep:
            parser.error(f"--extra expects NAME=BOOK[,BOOK...], got {item!r}")
        extra[name.strip()] = _names(books)
    train = int(args.train_books) if args.train_books.strip().isdigit() else _names(args.train_books)
    try:
        stats = build_austen_corpus(args.out_dir, data_dir=args.data_dir, train_books=train,
                                    valid_book=_names(args.valid_book), test_book=_names(args.test_book),
                                    min_count=args.min_count, extra=extra or None,
                                    workdir=args.workdir, force=args.force)
    except (AustenSourceError, ValueError) as err:
        sys.exit(f"error: {err}")

    print(f"{'split':<8} {'tokens':>9} {'lines':>7} {'unk%':>6}  books")
    for split, books in stats["books"].items():
        print(f"{split:<8} {stats['tokens'][split]:>9} {stats['lines'][split]:>7} "
              f"{100 * stats['unk_rate'][split]:>6.2f}  {', '.join(books)}")
    print(f"vocab size {stats['vocab_size']} (min_count={stats['min_count']}, <unk> included); "
          f"{'reused existing files' if stats['reused'] else 'built'} in {args.out_dir} "
          f"({stats['seconds']} s to build)")
    return stats


if __name__ == "__main__":
    main()
