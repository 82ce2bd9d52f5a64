"""The documentation site: every public name has a reference entry with a runnable example,
and every page the site's navigation or includes name exists.

``mkdocs build --strict`` (in .ci/run) checks links, anchors and that every reference renders;
these tests check the same promises without mkdocs installed, in milliseconds.
"""

import ast
import doctest
import inspect
import pathlib
import re

import pytest

import influence

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: Public names without an ``Examples:`` section, each with the reason. Keep it empty unless
#: an example is impossible to run in a doctest.
EXEMPT: dict[str, str] = {}


def attribute_docstring(module, name: str) -> str | None:
    """The docstring written under a module-level assignment ``name = ...`` (what mkdocstrings
    renders for data such as ``CURVATURES``; Python itself does not keep it)."""
    tree = ast.parse(inspect.getsource(module))
    for node, following in zip(tree.body, tree.body[1:]):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                return following.value.value
    return None


def public_docstring(name: str) -> str:
    obj = getattr(influence, name)
    if inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj):
        return inspect.getdoc(obj) or ""
    for module in (influence.curvature, influence.baselines):  # data: the defining module
        if name in vars(module):
            return attribute_docstring(module, name) or ""
    return ""


@pytest.mark.parametrize("name", influence.__all__)
def test_every_public_name_has_an_example(name):
    if name in EXEMPT:
        return
    assert "Examples:" in public_docstring(name), (
        f"influence.{name} has no 'Examples:' section in its docstring: add a short runnable "
        "doctest example, or list it in EXEMPT with the reason."
    )


@pytest.mark.parametrize("name", ["CURVATURES", "BASELINES"])
def test_data_examples_run(name):
    """pytest's doctest collection skips docstrings of module attributes: run them here."""
    text = public_docstring(name)
    test = doctest.DocTestParser().get_doctest(text, {"influence": influence}, name, None, 0)
    assert test.examples, f"no doctest examples in the docstring of influence.{name}"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def reference_directives() -> set[str]:
    names = set()
    for page in (DOCS / "reference").glob("*.md"):
        names |= set(re.findall(r"^::: influence\.(\w+)\s*$", page.read_text(), flags=re.M))
    return names


def test_every_public_name_has_a_reference_entry():
    missing = sorted(set(influence.__all__) - reference_directives())
    assert not missing, f"add '::: influence.NAME' to a page of docs/reference/ for: {missing}"


def test_reference_directives_name_public_objects():
    unknown = sorted(reference_directives() - set(influence.__all__))
    assert not unknown, f"docs/reference/ renders names that are not in influence.__all__: {unknown}"


def nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text.split("\nnav:\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r":\s+(\S+\.md)\s*$", nav, flags=re.M)


def test_nav_pages_exist():
    pages = nav_pages()
    assert len(pages) >= 10 and "index.md" in pages
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist in docs/: {missing}"


def test_snippets_exist():
    """Pages include examples with ``--8<-- "examples/....py"``: each included file exists."""
    included = []
    for page in DOCS.rglob("*.md"):
        for path in re.findall(r'--8<--\s+"([^"]+)"', page.read_text()):
            included.append(path)
            assert (ROOT / path.split(":")[0]).is_file(), f"{page.relative_to(ROOT)} includes a missing file {path}"
    assert included, "no page includes an example"
