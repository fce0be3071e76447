"""The embedded default ensemble for ``salm quickstart``: small members built offline from local text.

See :mod:`salm.quickstart.corpora` for the three domains and :mod:`salm.quickstart.build` for the recipe.
"""

from salm.quickstart.build import (
    QuickstartArtifacts,
    Recipe,
    build_quickstart_members,
    cache_root,
    quickstart_dir,
    recipe_for,
    recipe_hash,
)
from salm.quickstart.corpora import DOMAINS, SPLITS, make_examples, render_example

__all__ = [
    "DOMAINS",
    "SPLITS",
    "QuickstartArtifacts",
    "Recipe",
    "build_quickstart_members",
    "cache_root",
    "make_examples",
    "render_example",
    "quickstart_dir",
    "recipe_for",
    "recipe_hash",
]
