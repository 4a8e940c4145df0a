"""The docs agree with the repository: docs/objectives.md shows every objective's YAML block exactly as the
recipe has it, every percentage the README quotes is in docs/RESULTS.md, and every file, module, make target
and relative link the pages name exists."""

import pathlib
import re

import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
# The pages a newcomer reads; LOG.md is the record of what was run then, under the names of then.
PAGES = ["README.md", "docs/RESULTS.md", "docs/objectives.md", "docs/reliability.md"]


def _read(rel: str) -> str:
    return (REPO / rel).read_text(encoding="utf-8")


def _yaml_fences(markdown: str) -> dict:
    """{top-level key: value} over every ```yaml fence of the page."""
    shown = {}
    for body in re.findall(r"```yaml\n(.*?)```", markdown, flags=re.DOTALL):
        data = yaml.safe_load(body)
        assert isinstance(data, dict), f"a yaml fence that is not a mapping: {body[:80]!r}"
        for name, block in data.items():
            assert name not in shown, f"objective {name} shown twice"
            shown[name] = block
    return shown


def test_objectives_page_shows_the_recipe_blocks():
    recipe = yaml.safe_load(_read("conf/conformer_ctc_llm.yaml"))["model"]["objectives"]
    shown = _yaml_fences(_read("docs/objectives.md"))
    assert sorted(shown) == sorted(recipe), "docs/objectives.md and the recipe list different objectives"
    for name, block in recipe.items():
        assert shown[name] == block, f"docs/objectives.md shows model.objectives.{name} differently from the recipe"


def _percent_figures(text: str) -> set:
    """Every number of a run of figures that ends in '%': '55.4, 55.6 and 53.9 %' gives all three."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    number = r"\d+(?:[.,]\d+)*"
    runs = re.findall(rf"((?:{number}(?:, | and | to | / |–))*{number}) ?%", text)
    return {n for run in runs for n in re.findall(number, run)}


def test_readme_figures_are_in_results():
    results = _read("docs/RESULTS.md")
    figures = _percent_figures(_read("README.md"))
    assert figures, "no figure found: the pattern is broken"
    missing = sorted(f for f in figures if not re.search(rf"(?<![\d.,]){re.escape(f)}(?![\d]|[.,]\d)", results))
    assert not missing, f"README quotes figures that docs/RESULTS.md does not have: {missing}"


def test_named_files_modules_make_targets_and_links_exist():
    makefile = _read("Makefile")
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.MULTILINE))
    missing = set()
    for page in PAGES:
        text = _read(page)
        for path in re.findall(r"(?<![\w/.-])((?:scripts|benchmarks|demo|conf|tests|nemo_ctcllm)/[\w/.-]*\w)", text):
            if not (REPO / path.split("::")[0]).exists():
                missing.add(f"{page}: {path}")
        for module in re.findall(r"python -m ((?!pytest)[\w.]+)", text):
            base = REPO / module.replace(".", "/")
            if not (base.with_suffix(".py").exists() or (base / "__main__.py").exists()):
                missing.add(f"{page}: python -m {module}")
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # relative links of the page
            if "://" not in link and not (REPO / page).parent.joinpath(link).exists():
                missing.add(f"{page}: link {link}")
        for target in re.findall(r"\bmake ([a-z][\w-]*)", text):
            if target not in targets:
                missing.add(f"{page}: make {target}")
    assert not missing, "the docs name things that do not exist:\n" + "\n".join(sorted(missing))
