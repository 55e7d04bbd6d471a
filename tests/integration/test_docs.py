"""The docs stay true: the README's test command is CI's, the generated parts of docs/ are those their
generators write, the code map of docs/architecture.md names every room of the package in the import order
of the layout rule, and every relative link of the README and docs/ leads to a file and heading that exist."""
import glob
import importlib.util
import os
import re
import sys

from helpers import REPO

TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest tests"
DOCS = os.path.join(REPO, "docs")


def read(*path):
    with open(os.path.join(REPO, *path)) as f:
        return f.read()


def test_readme_and_ci_run_the_same_tests():
    readme = read("README.md").splitlines()
    ci = read(".ci", "run").splitlines()
    assert TEST_COMMAND in readme  # a whole line: '... pytest tests/unit' is another command
    assert ".venv/bin/python -m pip install --quiet -e '.[test]'" in ci
    assert ".venv/bin/python -m pytest tests" in ci


def test_resume_page_table_is_generated_from_the_rules():
    from medseg_dl.experiment.resume import resume_table

    assert resume_table() in read("docs", "resume.md")


def test_every_params_key_has_a_resume_rule():
    from medseg_dl.config.params import all_keys
    from medseg_dl.config.schema import APPLIED, NO_EFFECT, REFUSED, resume_rule

    verdict = {dotted: resume_rule(dotted).verdict for dotted, _ in all_keys()}
    assert set(verdict.values()) <= {APPLIED, REFUSED, NO_EFFECT}
    assert verdict["training.warmup_steps"] == NO_EFFECT and verdict["data.source_dir"] == APPLIED
    assert verdict["model.depth"] == REFUSED and verdict["training.steps"] == APPLIED
    assert verdict["data.split.val"] == REFUSED and verdict["sampling.batch_size"] == APPLIED


def _tables():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import tables

    return tables


def test_benchmark_page_tables_are_those_of_the_results_files():
    """Every results table of benchmarks/tables.py is in docs/benchmarks.md, as rendered from its JSON lines; a
    figure typed over in the page is caught."""
    tables = _tables()
    assert os.path.samefile(tables.PAGE, os.path.join(DOCS, "benchmarks.md"))
    page = read("docs", "benchmarks.md")
    assert {m.group(2) for m in tables.TABLE.finditer(page)} == set(tables.RENDERERS)
    assert tables.regenerate(page) == page, "docs/benchmarks.md tables are stale: run python benchmarks/tables.py"
    row = tables.render("hippocampus_accuracy").splitlines()[2]
    edited = page.replace(row, row.replace("| unet |", "| unet (typed) |"), 1)
    assert edited != page and tables.regenerate(edited) == page


def test_readme_headline_figures_are_in_the_generated_tables():
    """Every figure between the README's `<!-- figures -->` markers is a figure of a generated table."""
    tables = _tables()
    block = re.search(r"<!-- figures -->\n(.*?)<!-- /figures -->", read("README.md"), re.S)
    assert block, "the README's headline figures sit between <!-- figures --> and <!-- /figures -->"
    figures = re.findall(r"(?<![\d.])\d+\.\d+(?!\d)", block.group(1))
    assert figures
    cells = {cell.strip() for name in tables.RENDERERS for line in tables.render(name).splitlines()
             for cell in line.split("|")}
    words = {word for cell in cells for word in re.split(r"[\s(),/:;x-]+", cell)}
    assert [f for f in figures if f not in words] == []


# --- the code map and the import order of docs/architecture.md against the package and tests/test_layout.py

def package_rooms():
    """Every subpackage (a folder of modules, at any depth) and top-level module of medseg_dl/, as the code map
    names them: 'config/', 'model/architectures/', 'cli.py'."""
    package = os.path.join(REPO, "medseg_dl")
    rooms = {name for name in os.listdir(package) if name.endswith(".py") and name != "__init__.py"}
    for folder, dirs, files in os.walk(package):
        dirs[:] = [d for d in dirs if not d.startswith(("__", "."))]
        if folder != package and any(name.endswith(".py") for name in files):
            rooms.add(os.path.relpath(folder, package).replace(os.sep, "/") + "/")
    return rooms


def code_map():
    """The fenced block of docs/architecture.md that starts with 'medseg_dl/'."""
    text = read("docs", "architecture.md")
    block = re.search(r"```\nmedseg_dl/\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no code map (a ``` block starting with medseg_dl/)"
    return block.group(1)


def test_code_map_names_every_room_of_the_package():
    listed = code_map()
    top = {m.group(1) for m in re.finditer(r"^  (\S+)", listed, re.M)}
    nested = lambda room: room.count("/") > 1  # 'model/architectures/': named inside its parent's entry
    missing = [r for r in sorted(package_rooms()) if not (r in top or nested(r) and r.split("/", 1)[1] in listed)]
    assert missing == [], f"docs/architecture.md's code map leaves out {missing}"
    gone = [r for r in sorted(top) if r not in package_rooms()]
    assert gone == [], f"docs/architecture.md's code map names {gone}, which medseg_dl/ does not hold"


def stated_order():
    """The import order line of docs/architecture.md ('Import order: errors -> runtime -> ...') as groups of
    rooms in the names of tests/test_layout.py's RANKS: [{'errors'}, {'runtime'}, ...]."""
    text = " ".join(read("docs", "architecture.md").split())
    line = re.search(r"Import order[^:]*: (.*?)\.(?:\s|$)", text)
    assert line, "docs/architecture.md states no 'Import order: a -> b -> ...' line"
    name = lambda room: room.strip().strip("`").removesuffix(".py").removesuffix("/").replace("/", ".")
    return [{name(room) for room in group.split("|")} for group in line.group(1).split("->")]


def test_stated_import_order_is_that_of_the_layout_rule():
    path, = glob.glob(os.path.join(REPO, "tests", "**", "test_layout.py"), recursive=True)
    spec = importlib.util.spec_from_file_location("layout_rule", path)
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    RANKS = layout.RANKS
    ranks = sorted(set(RANKS.values()))
    assert stated_order() == [{room for room, rank in RANKS.items() if rank == r} for r in ranks]


# --- links

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return heading.replace(" ", "-")


def outside_code(text):
    """The text without its fenced code blocks and inline code spans."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))


def anchors(path):
    with open(path) as f:
        return {slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", re.sub(r"```.*?```", "", f.read(), flags=re.S),
                                                      re.M)}


def broken_links(path):
    with open(path) as f:
        text = outside_code(f.read())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(resolved):
            broken.append(f"{target} (no file)")
        elif anchor and (not resolved.endswith(".md") or anchor not in anchors(resolved)):
            broken.append(f"{target} (no heading #{anchor})")
    return broken


def doc_files():
    return [os.path.join(REPO, "README.md")] + sorted(
        os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md"))


def test_every_relative_link_leads_somewhere():
    broken = {os.path.relpath(path, REPO): bad for path in doc_files() if (bad := broken_links(path))}
    assert broken == {}


def test_the_link_check_sees_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n[ok](#top) [no file](b.md) [no heading](a.md#nowhere) `[code](x.md)`\n")
    assert broken_links(str(tmp_path / "a.md")) == ["b.md (no file)", "a.md#nowhere (no heading #nowhere)"]


def test_every_page_of_docs_is_linked_from_the_readme():
    readme = read("README.md")
    unlinked = [name for name in os.listdir(DOCS) if name.endswith(".md") and f"(docs/{name}" not in readme]
    assert unlinked == []


def test_every_test_file_the_docs_and_code_name_exists():
    """A path `tests/....py` named in the README, docs/, the package or the benchmarks is a file: a moved test
    leaves no stale pointer."""
    named = set()
    for folder in ("docs", "medseg_dl", "benchmarks"):
        for path in glob.glob(os.path.join(REPO, folder, "**", "*.*"), recursive=True):
            if path.endswith((".md", ".py", ".sh")):
                named.update(re.findall(r"\btests/[\w/]+\.py\b", open(path).read()))
    named.update(re.findall(r"\btests/[\w/]+\.py\b", read("README.md")))
    assert named and [path for path in sorted(named) if not os.path.isfile(os.path.join(REPO, path))] == []
