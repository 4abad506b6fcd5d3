"""``stdlib``: a multi-aspect text task from the docstrings of the Python standard library.

A candidate is a **documentation section**: up to :data:`MEMBERS_PER_SECTION` public functions, classes or
methods of one module, in source order, each written as ``name: summary``. A query is one member's summary
line with the member's and the module's names masked (replaced by "this"), so it must be matched on its own
words; the section holds several unrelated members, so one vector for the whole section has to serve many
different queries.

Source: the ``.py`` files of the interpreter's standard library (``sysconfig.get_paths()['stdlib']``),
read with :mod:`ast` (nothing is imported or run). The output depends on the interpreter version, which the
manifest records with the sha256 of every file read. Split: a whole module is in test when
``sha256('stdlib:<module>') mod 100 < test_percent`` — test modules never appear in training — and, of the
others, in **dev** when ``sha256('stdlib-dev:<module>') mod 100 < 10`` (``dev/stdlib_sections.jsonl``, for
choosing between models; never trained on).
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import re
import sys
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from metaembed.data.common import is_test, normalise_space, seeded_rng, write_atomically
from metaembed.data.errors import MissingRawDataError
from metaembed.data.tasks import Entry, Task, task_files
from metaembed.errors import DataError

NAME = "stdlib"
TASK = "stdlib_sections"
FORMAT_VERSION = 1
DEV_PERCENT = 10  # of the modules outside the test split
MEMBERS_PER_SECTION = 6
MIN_MEMBERS_PER_SECTION = 3  # a section of one or two members is hardly multi-aspect
MIN_WORDS, MAX_WORDS = 5, 30  # a summary outside this range is dropped (too vague) or cut (too long)
QUERY = "Find the documentation section that describes: {summary}"
SECTION_PREFIX = "Module {module}. "
# Not documentation a user searches: tests, demos, the IDE, vendored or platform-private packages.
SKIPPED_TOP_LEVEL = frozenset(
    ("test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "pydoc_data", "site-packages",
     "distutils", "this", "antigravity", "__phello__", "__hello__", "config-3.11-x86_64-linux-gnu")
)  # fmt: skip


@dataclass(frozen=True)
class Member:
    module: str
    name: str  # "func", "Class" or "Class.method"
    summary: str

    @property
    def query(self) -> str:
        return QUERY.format(summary=mask(self.summary, self.name, self.module))

    @property
    def part(self) -> str:
        return f"{self.name}: {self.summary}"


def mask(summary: str, name: str, module: str) -> str:
    """Replace whole-word mentions of the member's and the module's names (any case) by "this"."""
    words = {part for part in (*name.split("."), *module.split(".")) if part}
    pattern = r"\b(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b"
    return re.sub(r"\s+", " ", re.sub(pattern, "this", summary, flags=re.IGNORECASE)).strip()


def summary_line(docstring: str | None) -> str | None:
    """The first sentence of the first paragraph, whitespace collapsed, at most MAX_WORDS words; None if too short."""
    if not docstring:
        return None
    paragraph = docstring.strip().split("\n\n")[0]
    text = normalise_space(paragraph)
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    text = match.group(1) if match else text
    words = text.split()
    if len(words) < MIN_WORDS or sum(ch.isalpha() for ch in text) < 15:
        return None
    if len(words) > MAX_WORDS:
        text = " ".join(words[:MAX_WORDS]).rstrip(",;:") + " …"
    return text


def module_files(root: Path) -> Iterator[tuple[str, Path]]:
    """``(dotted module name, file)`` for every public module under ``root``, sorted by name."""
    found = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] in SKIPPED_TOP_LEVEL or any(p.startswith("_") and p != "__init__" for p in parts):
            continue
        if any(p in ("test", "tests") or p.startswith("test_") for p in parts):
            continue
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if module:
            found.append((module, path))
    yield from sorted(found)


def read_members(module: str, source: str) -> list[Member]:
    """Public functions, classes and methods of public classes with a usable summary, in source order."""
    tree = ast.parse(source)
    members = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and not node.name.startswith("_"):
            summary = summary_line(ast.get_docstring(node))
            if summary:
                members.append(Member(module, node.name, summary))
            if isinstance(node, ast.ClassDef):
                for child in node.body:
                    if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) and not child.name.startswith("_"):
                        summary = summary_line(ast.get_docstring(child))
                        if summary:
                            members.append(Member(module, f"{node.name}.{child.name}", summary))
    return members


def sections(members: list[Member]) -> list[list[Member]]:
    """A module's members cut into the fewest sections of ≤ MEMBERS_PER_SECTION, sizes as even as possible."""
    count = -(-len(members) // MEMBERS_PER_SECTION)
    bounds = [round(i * len(members) / count) for i in range(count + 1)] if count else [0]
    return [members[a:b] for a, b in itertools.pairwise(bounds)]


def build_stdlib(
    out: str | Path = "data",
    stdlib: str | Path | None = None,
    test_percent: int = 20,
    num_distractors: int = 100,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Build ``<out>/stdlib/`` from the standard library at ``stdlib`` (default: this interpreter's)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise MissingRawDataError(f"standard library folder {root} does not exist")
    if not 1 <= test_percent <= 99:
        raise DataError(f"test percent must be between 1 and 99, got {test_percent}")
    say = progress or (lambda message: None)
    dropped: Counter = Counter()
    problems: list[dict[str, str]] = []
    read: dict[str, str] = {}
    by_module: dict[str, list[Member]] = {}
    for module, path in module_files(root):
        data = path.read_bytes()
        read[path.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
        try:
            by_module[module] = read_members(module, data.decode("utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError) as error:
            problems.append({"file": path.relative_to(root).as_posix(), "reason": f"{type(error).__name__}: {error}"})
    say(f"{NAME}: {len(read)} modules read from {root}, {len(problems)} unreadable")
    # A summary shared by two members (inherited boilerplate, "Return self.") would make the gold ambiguous.
    repeats = Counter(m.summary.lower() for members in by_module.values() for m in members)
    split_sections: dict[str, list[tuple[str, list[Member]]]] = {"train": [], "dev": [], "test": []}
    for module, members in by_module.items():
        unique = [m for m in members if repeats[m.summary.lower()] == 1]
        dropped["repeated_summary"] += len(members) - len(unique)
        split = "test" if is_test(NAME, module, test_percent) else "train"
        if split == "train" and is_test(f"{NAME}-dev", module, DEV_PERCENT):
            split = "dev"
        for number, section in enumerate(sections(unique)):
            if len(section) < MIN_MEMBERS_PER_SECTION:
                dropped["member_in_short_section"] += len(section)
                continue
            split_sections[split].append((f"{module}#{number}", section))
    tasks = {"dev": Task(TASK, [], [], [], [], []), "test": Task(TASK, [], [], [], [], [])}
    tasks["train"] = tasks["test"]  # the test files hold the training triples
    for split, found in split_sections.items():
        task = tasks[split]
        module_of = [section_id.split("#")[0] for section_id, _ in found]
        entries = [_section_entry(module, section) for module, (_, section) in zip(module_of, found, strict=True)]
        for index, (section_id, section) in enumerate(found):
            negative = _negative(index, module_of, section_id)
            for member in section:
                query = Entry(member.query)
                if split != "train":
                    task.query_ids.append(f"{member.module}:{member.name}")
                    task.queries.append(query)
                    task.gold.append(index)
                else:
                    task.train.append((query, entries[index], entries[negative]))
        if split != "train":
            task.corpus_ids.extend(section_id for section_id, _ in found)
            task.corpus.extend(entries)
    files, distractor_count = task_files(tasks["test"], num_distractors, NAME)
    dev_files, dev_count = task_files(tasks["dev"], num_distractors, NAME, "dev")
    files.update(dev_files)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": NAME,
        "python": sys.version.split()[0],
        "stdlib": {"files_read": len(read), "sha256": dict(sorted(read.items()))},
        "license": "Python Software Foundation License (the docstrings of the CPython standard library)",
        "rules": {
            "members": "public module-level functions and classes, public methods of public classes",
            "summary": f"first sentence of the docstring's first paragraph, {MIN_WORDS}-{MAX_WORDS} words",
            "section": f"a module's members in source order, cut into even sections of at most "
            f"{MEMBERS_PER_SECTION}; sections under {MIN_MEMBERS_PER_SECTION} members are left out",
            "query": "the summary with whole-word mentions of the member's and the module's names replaced by 'this'",
            "split": f"a module is in test when sha256('{NAME}:<module>') mod 100 < {test_percent}, else in dev "
            f"when sha256('{NAME}-dev:<module>') mod 100 < {DEV_PERCENT}, else in train",
            "hard_negative": "another section of the same module when there is one, else a seeded random section",
        },
        "instructions": {"query": QUERY, "section_prefix": SECTION_PREFIX},
        "eval": {"distractors_per_query": {"test": distractor_count, "dev": dev_count}},
        "counts": {
            "modules": len(read),
            "members": sum(len(m) for m in by_module.values()),
            "dropped": dict(sorted(dropped.items())),
            "unreadable_files": len(problems),
            "sections": {split: len(found) for split, found in split_sections.items()},
            "test_queries": len(tasks["test"].queries),
            "dev_queries": len(tasks["dev"].queries),
            "train_pairs": len(tasks["train"].train),
        },
        "unreadable_files": problems,
        "files": {name: hashlib.sha256(blob).hexdigest() for name, blob in sorted(files.items())},
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_atomically(Path(out) / NAME, files)
    say(f"{NAME}: {manifest['counts']['sections']} sections, {len(tasks['test'].queries)} test queries")
    return manifest


def _section_entry(module: str, section: list[Member]) -> Entry:
    parts = tuple(member.part for member in section)
    return Entry(SECTION_PREFIX.format(module=module) + " ".join(parts), parts=parts)


def _negative(index: int, module_of: list[str], section_id: str) -> int:
    same = [i for i, module in enumerate(module_of) if module == module_of[index] and i != index]
    if same:
        return min(same, key=lambda i: abs(i - index))  # the neighbouring section of the same module
    choice = seeded_rng(NAME, "negative", section_id).randrange(len(module_of) - 1)
    return choice + (choice >= index)
