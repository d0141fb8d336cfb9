#!/usr/bin/env python3
"""Every repository path the docs name exists (README.md, docs/*.md and the crates' module docs).

A path is a token starting with one of the repository's top-level folders (`vmm/src/vm.rs`,
`tests/tests/adi.rs`, `docs/testing.md`), or, inside docs/, a bare `name.md`. A `:LINE` or
`::item` suffix is dropped. Exits 1 naming every missing path with where it was named.
"""
import pathlib
import re
import sys

repo = pathlib.Path(__file__).resolve().parent.parent
tops = sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "target")
path_re = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w/])" % "|".join(map(re.escape, tops)))
md_re = re.compile(r"(?<![\w./-])([\w-]+\.md)\b")

sources = [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]
sources += sorted(p for p in repo.glob("*/src/**/*.rs") if "target" not in p.parts)
missing = []
for src in sources:
    text = src.read_text()
    for lineno, line in enumerate(text.splitlines(), 1):
        if src.suffix == ".rs" and not line.lstrip().startswith("//"):
            continue
        for m in path_re.finditer(line):
            p = m.group(1).split(":")[0].rstrip(".")
            # Placeholders, Linux source paths (arch/x86/...), and "interrupts/s" (a rate).
            if "*" in p or "NN" in p or "..." in p or p.startswith("arch/x86/") or p == "interrupts/s":
                continue
            if not (repo / p).exists():
                missing.append(f"{src.relative_to(repo)}:{lineno}: {p}")
        if src.parent.name == "docs":
            for m in md_re.finditer(line):
                name = m.group(1)
                if not ((repo / "docs" / name).exists() or (repo / name).exists()):
                    missing.append(f"{src.relative_to(repo)}:{lineno}: {name}")
for m in missing:
    print(f"check-docs: no such path: {m}")
sys.exit(1 if missing else 0)
