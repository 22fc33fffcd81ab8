"""LICENSE, CITATION.cff, CHANGELOG.md and kflow/py.typed exist, say what they must, and are packaged."""
import ast
import re
from pathlib import Path

import yaml
from setuptools.command.egg_info import FileList

import kflow

ROOT = Path(__file__).resolve().parents[1]
TOP_FILES = ["LICENSE", "CITATION.cff", "CHANGELOG.md"]


def setup_keywords():
    """The literal keyword arguments of the setup() call in setup.py (read, not run)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    keywords = {}
    for kw in call.keywords:
        try:
            keywords[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:  # computed values (long_description, packages) are not needed here
            pass
    return keywords


def sdist_files():
    """The files MANIFEST.in adds to a source distribution, by setuptools' own template rules."""
    files = FileList()
    files.findall(str(ROOT))
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            files.process_template_line(line)
    return {Path(f).resolve().relative_to(ROOT).as_posix() for f in files.files}


def test_files_exist():
    for name in TOP_FILES + ["kflow/py.typed"]:
        assert (ROOT / name).is_file(), name


def test_license_is_mit_by_the_kflow_developers():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the kflow developers" in text
    assert setup_keywords()["license"] == "MIT" and "LICENSE" in setup_keywords()["license_files"]


def test_py_typed_and_top_files_are_packaged():
    assert "py.typed" in setup_keywords()["package_data"]["kflow"]
    assert set(TOP_FILES + ["README.md", "kflow/py.typed"]) <= sdist_files()


def test_citation_is_cff_1_2_0_with_the_k_flow_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert {"message", "title", "authors"} <= set(cff) and all("name" in a or "family-names" in a
                                                               for a in cff["authors"])
    assert cff["version"] == kflow.__version__ == setup_keywords()["version"]
    titles = {ref["title"]: ref for ref in cff["references"]}
    paper = titles["Flow Along the K-Amplitude for Generative Modeling"]
    assert paper["identifiers"][0]["value"] == "arXiv:2504.19353"
    assert [a["family-names"] for a in paper["authors"]][0] == "Du"
    assert any("Chemical shifts in molecular solids" in t for t in titles)
    assert any(t.startswith("AssembleFlow") for t in titles)


def test_changelog_starts_unreleased_and_has_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    assert versions[0] == "Unreleased" and kflow.__version__ in versions
    unreleased = text.split("## [", 2)[1]
    assert "velocity at the current state" in unreleased


def test_readme_cites_the_paper_and_the_data_sets():
    cite = (ROOT / "README.md").read_text().split("## Cite", 1)[1].split("\n## ", 1)[0]
    for needle in ["arXiv:2504.19353", "Flow Along the K-Amplitude", "Weitao Du", "Shengchao Liu", "Paruzzo",
                   "Nature Communications", "AssembleFlow", "ICLR 2025", "CITATION.cff"]:
        assert needle in cite, needle
