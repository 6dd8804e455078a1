"""The Python in the README and the docs runs as written (on small stand-ins for the data it names)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pnmf import make_counts

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs").glob("*.rst"))]
# Blocks that need what a test cannot give them: a process group, or a user's file.
NEEDS_MORE = ("distributed=True", "init_process_group", "read_h5ad(")


def runnable(page: Path) -> list[str]:
    """The page's Python blocks, in order, less those that need more than a test has."""
    text = page.read_text()
    if page.suffix == ".rst":  # the figures' ``.. plot::`` blocks run when the docs are built
        code = [
            textwrap.dedent(block) for block in re.findall(r"\.\. code-block:: python\n\n((?:(?:   .*)?\n)+)", text)
        ]
    else:
        code = re.findall(r"```python\n(.*?)```", text, re.S)
    return [block for block in code if not any(marker in block for marker in NEEDS_MORE)]


@pytest.fixture
def names(tmp_path, monkeypatch):
    """What the snippets take as given: counts X of 200 x 100 (as the README's first block
    makes them), donors, gene names, an AnnData of them and a query."""
    anndata = pytest.importorskip("anndata")
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd
    import scipy.sparse as sp

    monkeypatch.chdir(tmp_path)  # model.save("model.npz") and the like
    x, _, _ = make_counts(n_samples=200, n_features=100, n_components=5)
    donors = np.random.default_rng(0).choice(["a", "b", "c"], 200)
    genes = [f"G{i}" for i in range(100)]
    adata = anndata.AnnData(
        X=sp.csr_matrix(x),
        layers={"counts": sp.csr_matrix(x)},
        obs=pd.DataFrame({"donor": donors}, index=[f"cell{i}" for i in range(200)]),
        var=pd.DataFrame(index=genes),
    )
    return {
        "X": x,
        "donors": donors,
        "genes": genes,
        "gene_names": genes,
        "adata": adata,
        "query": adata[:40].copy(),
        "X_query": x[:40],
        "query_donors": donors[:40],
    }


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_pages_python_runs_in_order(page, names):
    # One namespace per page: a block uses what the blocks above it made, as a reader's session does.
    import matplotlib.pyplot as plt

    namespace = dict(names)
    for number, block in enumerate(runnable(page)):
        exec(compile(block, f"{page.name}, block {number}", "exec"), namespace)
    plt.close("all")
