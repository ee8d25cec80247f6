"""Tests for knnlm.experiments.corpora.austen: tokenizer, split/vocabulary rules, stamp reuse."""

import json
import subprocess

import pytest

from knnlm.experiments.corpora import austen
from knnlm.experiments.corpora.austen import (
    BOOK_TITLES,
    AustenSourceError,
    book_body,
    build_austen_corpus,
    canonical_title,
    plan_splits,
    read_austen_books,
    tokenize_text,
    tokenize_wikitext_style,
)


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text, expected", [
    ("I don't know.", "I don 't know ."),
    ("Mr. Woodhouse's daughter, Mrs. Weston;", "Mr. Woodhouse 's daughter , Mrs. Weston ;"),
    ('"Very well," said she.--"No!"', '" Very well , " said she . -- " No ! "'),
    ("a good-humoured man", "a good @-@ humoured man"),
    ("She was _very_ fond of it", "She was very fond of it"),
    ("1,000 pounds, 3.5 miles", "1 @,@ 000 pounds , 3 @.@ 5 miles"),
    ("the sisters' house", "the sisters ' house"),
    ("'Tis true (quite) &c.", "' Tis true ( quite ) &c."),
    ("Signed, E. Gardiner. So did I.", "Signed , E. Gardiner . So did I ."),
])
def test_tokenize_text(text, expected):
    assert " ".join(tokenize_text(text)) == expected


def test_tokenize_paragraphs_and_headings():
    lines = [
        "CHAPTER I", "", "",
        "It is a truth universally", "acknowledged.", "",
        "   An indented line.   ",
        "Chapter 2",
        "Next chapter text.",
        "VOLUME II",
        "THE END",
    ]
    assert tokenize_wikitext_style(lines) == [
        "It is a truth universally acknowledged .",
        "An indented line .",
        "Next chapter text .",
    ]
    # A whole string is split into lines first.
    assert tokenize_wikitext_style("a b\nc\n\nd") == ["a b c", "d"]


def test_book_body_drops_title_page_and_end_matter():
    lines = ["EMMA", "", "By Jane Austen", "", "CHAPTER I", "", "Text.", "", "FINIS", "Note."]
    assert book_body(lines) == ["CHAPTER I", "", "Text.", ""]
    assert book_body(["no headings", "at all"]) == ["no headings", "at all"]


def test_canonical_title():
    assert canonical_title("pride_and_prejudice") == "Pride & Prejudice"
    assert canonical_title("Sense and Sensibility") == "Sense & Sensibility"
    assert canonical_title("northangerabbey") == "Northanger Abbey"
    with pytest.raises(ValueError):
        canonical_title("Middlemarch")


# --------------------------------------------------------------------------- building

FILE_NAMES = ["sense_and_sensibility", "pride_and_prejudice", "mansfield_park",
              "emma", "northanger_abbey", "persuasion"]


@pytest.fixture
def fake_books(tmp_path):
    """Six tiny books; each has a marker word unique to it (book0 ... book5)."""
    folder = tmp_path / "books"
    folder.mkdir()
    for i, name in enumerate(FILE_NAMES):
        lines = [name.upper(), "", "CHAPTER 1", "", f"common book{i} common book{i} book{i}.", ""]
        if i == 0:
            lines += ["trainrare trainrare", ""]        # twice in train: below min_count 3
        if i == 4:
            lines += ["trainrare " * 5 + "validonly", ""]  # frequent in valid does not count
        lines += ["THE END"]
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def read_tokens(path):
    return path.read_text(encoding="utf-8").split()


def test_build_splits_by_whole_books_and_unks_by_train_counts(fake_books, tmp_path):
    out = tmp_path / "corpus"
    stats = build_austen_corpus(out, data_dir=fake_books, min_count=3)
    train, valid, test = (read_tokens(out / f"{s}.txt") for s in ("train", "valid", "test"))

    assert {t for t in train if t.startswith("book")} == {"book0", "book1", "book2", "book3"}
    # Marker words of valid/test books never occur in training, so they become <unk>.
    assert "book4" not in valid and "book5" not in test
    assert valid.count("<unk>") == 3 + 5 + 1 and test.count("<unk>") == 3
    assert "trainrare" not in train + valid + test  # 2 train occurrences < min_count
    assert "common" in valid and "common" in test
    # Headings and titles are gone; one paragraph per line.
    assert "CHAPTER" not in train and "EMMA" not in train
    assert (out / "valid.txt").read_text().splitlines()[0] == "common <unk> common <unk> <unk> ."

    assert stats["books"]["valid"] == ["Northanger Abbey"]
    assert stats["books"]["test"] == ["Persuasion"]
    assert stats["tokens"] == {"train": len(train), "valid": len(valid), "test": len(test)}
    assert stats["vocab_size"] == len(set(train))
    assert stats["unk_rate"]["test"] == pytest.approx(3 / len(test), abs=1e-6)
    assert stats["reused"] is False


def test_build_reuses_outputs_when_stamp_matches(fake_books, tmp_path):
    out = tmp_path / "corpus"
    build_austen_corpus(out, data_dir=fake_books)
    (out / "train.txt").write_text("sentinel\n")  # would be overwritten by a rebuild
    assert build_austen_corpus(out, data_dir=fake_books)["reused"] is True
    assert (out / "train.txt").read_text() == "sentinel\n"

    # Different parameters -> rebuilt, and the stamp records the new ones.
    stats = build_austen_corpus(out, data_dir=fake_books, min_count=1)
    assert stats["reused"] is False and "trainrare" in read_tokens(out / "train.txt")
    assert json.loads((out / "austen_corpus.json").read_text())["params"]["min_count"] == 1

    # A missing output file also forces a rebuild.
    (out / "test.txt").unlink()
    assert build_austen_corpus(out, data_dir=fake_books, min_count=1)["reused"] is False
    assert (out / "test.txt").is_file()


def test_domain_adaptation_layout(fake_books, tmp_path):
    out = tmp_path / "da"
    stats = build_austen_corpus(out, data_dir=fake_books, train_books=3,
                                extra={"dstore": ["Emma"]})
    assert stats["books"]["train"] == list(BOOK_TITLES[:3])
    assert stats["books"]["dstore"] == ["Emma"]
    dstore = read_tokens(out / "dstore.txt")
    assert "book3" not in dstore and "<unk>" in dstore  # Emma's words are not in the LM vocab
    assert "book3" not in read_tokens(out / "train.txt")


def test_plan_splits_by_name_and_errors():
    splits = plan_splits(["emma", "Persuasion"], "Mansfield Park", ["pride and prejudice"])
    assert splits == {"train": ["Emma", "Persuasion"], "valid": ["Mansfield Park"],
                      "test": ["Pride & Prejudice"]}
    with pytest.raises(ValueError):
        plan_splits(["Emma"], "Emma", "Persuasion")            # train/valid overlap
    with pytest.raises(ValueError):
        plan_splits(4, extra={"dstore": ["Persuasion"]})       # extra leaks the test book
    with pytest.raises(ValueError):
        plan_splits(5)                                         # only 4 books are free


def test_missing_source_gives_clear_error(tmp_path):
    with pytest.raises(AustenSourceError, match="plain-text files"):
        read_austen_books(tmp_path)


def test_no_apt_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(austen.shutil, "which", lambda tool: None)
    with pytest.raises(AustenSourceError, match="local directory"):
        austen.fetch_austen_package(tmp_path / "work")


def test_cli_prints_stats(fake_books, tmp_path, capsys):
    austen.main([str(tmp_path / "cli"), "--data-dir", str(fake_books), "--min-count", "2",
                 "--extra", "dstore=Emma", "--train-books", "3"])
    printed = capsys.readouterr().out
    assert "dstore" in printed and "vocab size" in printed


# --------------------------------------------------------------------------- real package


def test_real_package_if_available():
    """Reads the Debian package (reused from cache, or apt-get download); skips if unavailable."""
    try:
        data_dir = austen.fetch_austen_package(austen.default_workdir())
    except (AustenSourceError, subprocess.CalledProcessError, OSError) as err:
        pytest.skip(f"r-cran-janeaustenr not available: {err}")
    books = read_austen_books(data_dir)
    assert list(books) == list(BOOK_TITLES)
    assert books["Emma"].splitlines()[0] == "EMMA"
    assert len(books["Emma"].splitlines()) == 16235  # janeaustenr 1.0.0
    first = tokenize_wikitext_style(book_body(books["Pride & Prejudice"].splitlines()))[0]
    assert first.startswith("It is a truth universally acknowledged , that a single man")
