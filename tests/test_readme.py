"""The README kept honest: every ```python block of README.md runs as printed (each in a fresh
namespace, the repository root on sys.path, a few seconds on a CPU), every relative link of the
README and of the pages it links to (docs/*.md, experiments/README.md) reaches a file (and a
heading, for #anchors), and every `module.name` those pages map an equation to exists."""
import ast
import os
import random
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = ["README.md", "experiments/README.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def python_blocks(text: str):
    """[(line of the opening fence, code)] for every ```python block, all of the file's."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def section(text: str, title: str) -> str:
    """The text of the `## title` section, up to the next `## ` heading."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


BLOCKS = python_blocks(read("README.md"))


def test_every_method_of_how_each_method_works_has_a_snippet():
    how = section(read("README.md"), "How each method works")
    parts = re.split(r"^### ", how, flags=re.M)[1:]
    assert len(parts) >= 3, "README: 'How each method works' lost a method's subsection"
    for part in parts:
        title = part.splitlines()[0]
        assert python_blocks(part), f"README: '{title}' has no ```python snippet"


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_snippet_runs_as_printed(line, code, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    random.seed(0)
    namespace = {"__name__": "readme_snippet"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)   # a raise fails the test


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set:
    text = re.sub(r"^```.*?^```", "", read(path), flags=re.S | re.M)   # no '#' of code blocks
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def relative_links(path: str):
    """(target, anchor) of every Markdown link [text](target) that is not a URL."""
    text = re.sub(r"^```.*?^```", "", read(path), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        yield file, anchor


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_reaches_a_file_and_heading(page):
    bad = []
    for file, anchor in relative_links(page):
        target = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
        if not os.path.exists(os.path.join(ROOT, target)):
            bad.append(f"{file} (no such file)")
        elif anchor and (not target.endswith(".md") or anchor not in anchors(target)):
            bad.append(f"{file}#{anchor} (no such heading)")
    assert "../shared" not in read(page)
    assert not bad, f"{page}: broken links: {bad}"


def test_readme_links_the_pages_it_moved_out():
    links = {file for file, _ in relative_links("README.md")}
    for page in ("docs/operations.md", "docs/speed.md", "docs/results.md",
                 "experiments/README.md", "DECISIONS.md"):
        assert page in links, f"README.md no longer links {page}"


def test_every_config_the_readme_runs_exists():
    names = set(re.findall(r"configs/[\w.]+\.yaml", read("README.md")))
    assert names, "README.md runs no config"
    missing = sorted(n for n in names if not os.path.exists(os.path.join(ROOT, n)))
    assert not missing, f"README.md names configs that do not exist: {missing}"


MODULES = ("losses", "model", "pretrain", "finetune", "probe", "data", "common", "bench")


def top_level_names(module: str) -> set:
    tree = ast.parse(read(f"{module}.py"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


@pytest.mark.parametrize("page", [p for p in PAGES if p != "experiments/README.md"])
def test_every_function_the_pages_name_exists(page):
    """`losses.morph_schedule` and the like (the equation-to-function maps): each must be a
    top-level function, class or constant of that file, read without importing it."""
    refs = set(re.findall(rf"`({'|'.join(MODULES)})\.([A-Za-z_]\w*)", read(page)))
    refs = {(m, n) for m, n in refs if n != "py"}
    missing = sorted(f"{m}.{n}" for m, n in refs if n not in top_level_names(m))
    assert not missing, f"{page} names what does not exist: {missing}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
