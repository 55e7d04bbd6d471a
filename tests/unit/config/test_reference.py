"""The params reference (config/reference.py): every key, and docs/params.md generated from the schema."""
from medseg_dl.config.params import all_keys
from medseg_dl.config.reference import params_reference


def test_reference_lists_every_key():
    reference = params_reference()
    for dotted, _ in all_keys():
        assert f"`{dotted}`" in reference


def test_docs_params_md_is_generated_from_the_schema():
    import os

    from helpers import REPO

    with open(os.path.join(REPO, "docs", "params.md")) as f:
        assert f.read().strip() == params_reference().strip(), "regenerate: medseg params-doc > docs/params.md"
