"""The Chinese companion of the book (``book/zh``): its glossary, its terms and its links agree with the course.

Offline and without Sphinx: every check is a plain function over a page's text, so the last tests can feed them a
bad page and see them report it. The rules:

- ``glossary.md`` holds one table, ``| English | 中文 | 不用 | 定义 | 实验 |``; every term of ``docs/glossary.md``
  is in its English column (several names, comma-separated, may share a row), and every lab number is a lab;
- no page uses a rejected translation (不用), except inside 「」, where a page quotes the source article;
- a term written as ``中文（English）`` is written with the glossary's 中文 right before the parenthesis, and a page
  that pairs a term pairs it at its first use (headings aside);
- every ``{ref}`` label is a notebook section's (``labkit.book.labels``) or a lab's benchmark page
  (``labNN-bench``, for the labs that have a benchmark); every ``{doc}`` target is ``../labs/NAME`` for a notebook
  ``NAME``, or another page of the companion;
- ``index.md`` lists every page in its toctree, and each lab has a page that links to its English chapter.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from labkit.book.labels import section_labels
from labkit.tour import LABS

ROOT = Path(__file__).resolve().parents[1]
ZH = ROOT / "book" / "zh"
NOTEBOOKS = ROOT / "notebooks"
HEADER = "| English | 中文 | 不用 | 定义 | 实验 |"
LAB_NUMBERS = tuple(lab.number for lab in LABS)
LAB_PAGES = tuple(f"lab{number}" for number in LAB_NUMBERS)
PAGES = ("errata", "glossary", *LAB_PAGES)


@dataclass(frozen=True)
class Entry:
    english: tuple[str, ...]   # the first is the name; the others are names of the same idea
    chinese: str
    rejected: tuple[str, ...]
    definition: str
    labs: tuple[str, ...]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _split(cell: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in re.split(r"[,，、]", cell) if part.strip())


def english_terms(text: str) -> list[str]:
    """The term column of the first table of ``docs/glossary.md`` (the one whose header starts ``| term |``)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| term |")), None)
    if start is None:
        raise ValueError("docs/glossary.md has no table whose header starts with '| term |'")
    terms = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        terms.append(_cells(line)[0])
    return terms


def parse_glossary(text: str) -> list[Entry]:
    """The rows of the one table under :data:`HEADER`; a ``ValueError`` naming the line for a malformed one."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == HEADER]
    if len(starts) != 1:
        raise ValueError(f"the glossary needs exactly one table with the header {HEADER!r}; found {len(starts)}")
    start = starts[0]
    if not re.fullmatch(r"\|(\s*:?-+:?\s*\|){5}", lines[start + 1].strip()):
        raise ValueError(f"line {start + 2}: the header must be followed by a separator row of five columns")
    entries = []
    for n, line in enumerate(lines[start + 2:], start=start + 3):
        if not line.strip():
            break
        if not line.startswith("|"):
            raise ValueError(f"line {n}: the table ends with a blank line, not with {line!r}")
        cells = _cells(line)
        if len(cells) != 5:
            raise ValueError(f"line {n}: {len(cells)} cells where the table has 5: {line!r}")
        english, chinese, rejected, definition, labs = cells
        if not english or not chinese or not definition or not labs:
            raise ValueError(f"line {n}: English, 中文, 定义 and 实验 may not be empty: {line!r}")
        entries.append(Entry(_split(english), chinese, _split(rejected), definition, _split(labs)))
    return entries


def _blank(match: re.Match) -> str:
    return re.sub(r"[^\n]", " ", match.group(0))


def checked_text(text: str) -> str:
    """The page as the term checks read it: article quotations (「...」) and the glossary's 不用 cells blanked."""
    text = re.sub(r"「[^」]*」", _blank, text)
    lines = text.splitlines()
    out, in_table = [], False
    for line in lines:
        if line.strip() == HEADER:
            in_table = True
        elif in_table and line.startswith("|") and not line.startswith("|---"):
            cells = line.strip().strip("|").split("|")
            if len(cells) == 5:
                cells[2] = " " * len(cells[2])
                line = "|" + "|".join(cells) + "|"
        elif in_table and not line.startswith("|"):
            in_table = False
        out.append(line)
    return "\n".join(out)


def rejected_uses(text: str, entries: list[Entry]) -> list[str]:
    """``"VARIANT (for TERM)"`` for every rejected translation the page uses outside 「」."""
    body = checked_text(text)
    return [f"{variant} (for {entry.english[0]}; write {entry.chinese})"
            for entry in entries for variant in entry.rejected if variant in body]


def mismatched_pairs(text: str, entries: list[Entry]) -> list[str]:
    """Every ``X（english）`` whose english names a glossary term and whose X is not that term's 中文.

    What follows a comma inside the parenthesis is a note, not the term:
    ``知识蒸馏（knowledge distillation，Hinton 等 2015）``.
    """
    chinese = {name.lower(): entry.chinese for entry in entries for name in entry.english}
    body = checked_text(text)
    found = []
    for m in re.finditer(r"（([^（）\n]+)）", body):
        key = re.split(r"[，,；;]", m.group(1))[0].strip().lower()   # （knowledge distillation，Hinton 等 2015）
        if key in chinese and not body[:m.start()].endswith(chinese[key]):
            before = body[max(0, m.start() - 8):m.start()].strip()
            found.append(f"…{before}（{m.group(1)}）: write {chinese[key]}（{m.group(1)}）")
    return found


def late_first_uses(text: str, entries: list[Entry]) -> list[str]:
    """Terms written ``中文（English）`` on a page whose first use there (headings and code aside) is bare ``中文``.

    An occurrence inside a longer glossary term (全规约 in 环形全规约) is not a use of the shorter one.
    """
    body = checked_text(text)
    body = re.sub(r"`[^`\n]*`", _blank, body)
    body = "\n".join(" " * len(line) if line.startswith("#") else line for line in body.split("\n"))
    found = []
    for entry in entries:
        names = {name.lower() for name in entry.english}
        pairs = [m for m in re.finditer(re.escape(entry.chinese) + r"（([^（）\n]+)）", body)
                 if re.split(r"[，,；;]", m.group(1))[0].strip().lower() in names]
        if not pairs:
            continue
        masked = body
        for other in entries:
            if other.chinese != entry.chinese and entry.chinese in other.chinese:
                masked = masked.replace(other.chinese, " " * len(other.chinese))
        first = masked.find(entry.chinese)
        if first != pairs[0].start():
            context = body[max(0, first - 10):first + len(entry.chinese)].strip()
            found.append(f"…{context}: the first {entry.chinese} comes before {entry.chinese}（{entry.english[0]}）")
    return found


def ref_labels(text: str) -> list[str]:
    """The labels of every ``{ref}`` role: ``{ref}`title <label>``` or ``{ref}`label```."""
    return _role_targets("ref", text)


def _role_targets(role: str, text: str) -> list[str]:
    out = []
    for m in re.finditer(r"\{%s\}`([^`]+)`" % role, text):
        inner = m.group(1)
        target = re.search(r"<([^>]+)>\s*$", inner)
        out.append((target.group(1) if target else inner).strip())
    return out


def doc_targets(text: str) -> list[str]:
    """The targets of every ``{doc}`` role."""
    return _role_targets("doc", text)


def known_labels() -> set[str]:
    labels = {f"lab{lab.number}-bench" for lab in LABS if lab.bench}
    for path in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        labels.update(section_labels(path))
    return labels


def notebook_names() -> set[str]:
    return {path.stem for path in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")}


def unknown_refs(text: str, labels: set[str]) -> list[str]:
    return [label for label in ref_labels(text) if label not in labels]


def unknown_docs(text: str, notebooks: set[str], pages: tuple[str, ...] = ("index", *PAGES)) -> list[str]:
    """Targets that are neither ``../labs/NAME`` for a notebook ``NAME`` nor another page of ``book/zh``."""
    bad = []
    for target in doc_targets(text):
        m = re.fullmatch(r"\.\./labs/([^/]+)", target)
        if not (m and m.group(1) in notebooks) and target not in pages:
            bad.append(target)
    return bad


def toctree_entries(text: str) -> list[str]:
    """The entries of the first ```{toctree}``` block (options and blank lines skipped)."""
    m = re.search(r"^```\{toctree\}[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    if not m:
        return []
    return [line.strip() for line in m.group(1).splitlines() if line.strip() and not line.strip().startswith(":")]


def lab_page_problems(number: str, text: str) -> list[str]:
    """What lab ``number``'s page lacks: a ``# `` title on its first line, a {doc} link to its English chapter."""
    problems = []
    if not text.startswith("# "):
        problems.append("the page does not start with a '# ' title")
    stem = next(Path(lab.notebook).stem for lab in LABS if lab.number == number)
    if f"../labs/{stem}" not in doc_targets(text):
        problems.append(f"no {{doc}} link to ../labs/{stem}")
    return problems


# ---- the pages ----

def _read(name: str) -> str:
    return (ZH / f"{name}.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def entries() -> list[Entry]:
    return parse_glossary(_read("glossary"))


def _all_pages() -> list[Path]:
    return sorted(ZH.glob("*.md"))


def test_every_page_exists():
    missing = [name for name in ("index", *PAGES) if not (ZH / f"{name}.md").is_file()]
    assert not missing, f"book/zh lacks {missing}"


def test_glossary_covers_the_course_terms(entries):
    english = {name.lower() for entry in entries for name in entry.english}
    terms = english_terms((ROOT / "docs" / "glossary.md").read_text(encoding="utf-8"))
    assert len(terms) > 10, terms
    missing = [term for term in terms if term.lower() not in english]
    assert not missing, f"terms of docs/glossary.md missing from the English column of book/zh/glossary.md: {missing}"


def test_glossary_is_one_spelling_per_idea(entries):
    names = [name.lower() for entry in entries for name in entry.english]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
    chinese = [entry.chinese for entry in entries]
    assert len(chinese) == len(set(chinese)), sorted({c for c in chinese if chinese.count(c) > 1})
    accepted = set(chinese)
    clash = [(entry.english[0], v) for entry in entries for v in entry.rejected if v in accepted]
    assert not clash, f"a rejected translation is another term's 中文: {clash}"


def test_glossary_labs_are_labs(entries):
    bad = [(entry.english[0], n) for entry in entries for n in entry.labs if n not in LAB_NUMBERS]
    assert not bad, f"实验 numbers that are not labs in labkit.tour.LABS: {bad}"


GLOSSARY_CHECKS = {"uses rejected translations": rejected_uses, "pairs terms unlike the glossary": mismatched_pairs,
                   "explains terms late": late_first_uses}


@pytest.mark.parametrize("what", GLOSSARY_CHECKS)
@pytest.mark.parametrize("path", _all_pages(), ids=lambda p: p.name)
def test_page_agrees_with_the_glossary(path, what, entries):
    found = GLOSSARY_CHECKS[what](path.read_text(encoding="utf-8"), entries)
    assert not found, f"{path.name} {what}: {found}"


@pytest.mark.parametrize("path", _all_pages(), ids=lambda p: p.name)
def test_links_resolve(path):
    text = path.read_text(encoding="utf-8")
    assert not unknown_refs(text, known_labels()), f"{path.name}: unknown {{ref}} labels"
    assert not unknown_docs(text, notebook_names()), f"{path.name}: {{doc}} targets that are not notebooks"


@pytest.mark.parametrize("number", LAB_NUMBERS)
def test_lab_page(number):
    text = _read(f"lab{number}")
    assert not lab_page_problems(number, text), lab_page_problems(number, text)
    assert any(label.startswith(f"lab{number}-") for label in ref_labels(text)), \
        f"lab{number}.md links to none of its notebook's sections"
    if any(lab.number == number and lab.bench for lab in LABS):
        assert f"lab{number}-bench" in ref_labels(text), f"lab{number}.md does not link to its benchmark page"


def test_index_lists_every_page():
    text = _read("index")
    assert re.search(r"^```\{toctree\}\n:maxdepth: 1\n", text, flags=re.M), "index.md needs a toctree, :maxdepth: 1"
    assert toctree_entries(text) == list(PAGES)


def test_errata_covers_the_design_list():
    """The five errors DESIGN.md lists, each with the lab section that corrects it."""
    text = _read("errata")
    for label in ("lab03-s7", "lab02-s7", "lab03-s5", "lab02-s9", "lab08-s4"):
        assert label in ref_labels(text), f"errata.md does not link to {label}"


# ---- the checks can fail ----

GOOD_GLOSSARY = f"""# 术语表

{HEADER}
|---|---|---|---|---|
| all-reduce | 全规约 | 全归约, 全减少 | 每个 rank 都得到和 | 01, 02 |
| micro-batch | 微批次 | 微批量 | 批次的一片 | 04 |
| ring all-reduce | 环形全规约 | | 环上的全规约 | 01 |
"""


def test_checks_report_a_bad_page():
    entries = parse_glossary(GOOD_GLOSSARY)
    assert [e.chinese for e in entries] == ["全规约", "微批次", "环形全规约"]
    assert rejected_uses(GOOD_GLOSSARY, entries) == []          # the 不用 column itself is not a use
    bad = "每步做一次全归约（all-reduce），再把批次切成 4 个微批量。"
    assert len(rejected_uses(bad, entries)) == 2
    assert rejected_uses("原文写作「全归约」。", entries) == []    # a quotation of the article is not a use
    assert mismatched_pairs("每步做一次全归约（all-reduce）。", entries)
    assert mismatched_pairs("流水线的小批次（Micro-batch）", entries)  # case-insensitive english
    assert mismatched_pairs("每步做一次全规约（all-reduce），每个微批次（micro-batch）。", entries) == []
    assert mismatched_pairs("某种（unknown term）", entries) == []
    assert mismatched_pairs("切成小批次（micro-batch，见实验 04）", entries)       # a note after the comma
    assert mismatched_pairs("切成微批次（micro-batch，见实验 04）", entries) == []
    late = "先做全规约，再讲全规约（all-reduce）。"
    assert late_first_uses(late, entries)
    assert late_first_uses("# 全规约\n\n环形全规约要两步；全规约（all-reduce）是…", entries) == []
    labels = known_labels()
    assert unknown_refs("见 {ref}`第 5 节 <lab03-s5>` 与 {ref}`lab04-bench`。", labels) == []
    assert unknown_refs("见 {ref}`第 99 节 <lab03-s99>`。", labels) == ["lab03-s99"]
    assert unknown_refs("{ref}`lab03-bench`", labels) == ["lab03-bench"]   # lab 03 has no benchmark page
    assert unknown_docs("{doc}`英文章节 <../labs/04_pipeline>`", notebook_names()) == []
    assert unknown_docs("{doc}`英文章节 <../labs/04_pipelines>`", notebook_names()) == ["../labs/04_pipelines"]
    assert unknown_docs("{doc}`勘误表 <errata>` {doc}`x <erratum>`", notebook_names()) == ["erratum"]
    assert lab_page_problems("04", "实验 04\n{doc}`x <../labs/04_pipeline>`")
    assert lab_page_problems("04", "# 实验 04\n{doc}`x <../labs/03_model_parallel>`")
    assert lab_page_problems("04", "# 实验 04\n{doc}`x <../labs/04_pipeline>`") == []
    assert toctree_entries("```{toctree}\n:maxdepth: 1\n\nerrata\nlab00\n```\n") == ["errata", "lab00"]


def test_glossary_parser_refuses_malformed_tables():
    with pytest.raises(ValueError, match="exactly one table"):
        parse_glossary("| English | 中文 | 定义 |\n|---|---|---|\n")
    with pytest.raises(ValueError, match="4 cells"):
        parse_glossary(f"{HEADER}\n|---|---|---|---|---|\n| all-reduce | 全规约 | 和 | 01 |\n")
    with pytest.raises(ValueError, match="may not be empty"):
        parse_glossary(f"{HEADER}\n|---|---|---|---|---|\n| all-reduce | | | 和 | 01 |\n")
    bad_labs = parse_glossary(f"{HEADER}\n|---|---|---|---|---|\n| all-reduce | 全规约 | | 和 | 13 |\n")
    assert [n for e in bad_labs for n in e.labs if n not in LAB_NUMBERS] == ["13"]
    assert "widths" in english_terms((ROOT / "docs" / "glossary.md").read_text(encoding="utf-8"))
