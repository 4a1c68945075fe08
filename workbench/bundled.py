"""Where the files that ship with the workbench live: a repository checkout, or an installed wheel.

In a checkout (and an editable install of it) they are the repository's top-level ``data/`` (the
embedded dataset and the model zoo), ``notebooks/`` and the study's tables in ``docs/results/``. A wheel (``pip install`` of a built
package, or ``pip install git+URL`` on a hosted notebook service) has no repository: the same
files travel inside the package as ``workbench/_data`` and ``workbench/_notebooks`` (mapped in
pyproject.toml), and a user copies the notebooks out with ``workbench notebooks DIR``.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
#: The bundled folders: name -> (folder in the repository, folder inside the installed package).
BUNDLED = {"data": ("data", "_data"), "notebooks": ("notebooks", "_notebooks"), "results": ("docs/results", "_results")}


def repo_root() -> Path | None:
    """The repository checkout this package is imported from, or ``None`` for an installed wheel."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


def bundled_dir(kind: str) -> Path:
    """``data``, ``notebooks`` or ``results``: the checkout's folder, else the copy inside the
    installed package."""
    if kind not in BUNDLED:
        raise ValueError(f"kind must be one of {sorted(BUNDLED)}, got {kind!r}")
    root = repo_root()
    in_repo, in_package = BUNDLED[kind]
    return root / in_repo if root is not None else PACKAGE_DIR / in_package


def copy_notebooks(dest: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Copy the workbench's notebooks (their ``sweeps/`` grids and the ``course/`` exercises too) into ``dest`` for a user to run
    and edit; the copies find the dataset and the zoo through the installed package.

    Returns:
        The files written, in order.

    Raises:
        RunDirError: a notebook of the same name is already in ``dest`` and ``overwrite`` is false
            (nothing is copied then, so an edited notebook is never lost).
    """
    import shutil

    from .errors import RunDirError

    source, dest = bundled_dir("notebooks"), Path(dest).expanduser().resolve()
    files = (sorted(source.glob("*.ipynb")) + sorted((source / "sweeps").glob("*.yaml"))
             + sorted((source / "course").glob("*.ipynb")))
    targets = [dest / f.relative_to(source) for f in files]
    clash = [t for t in targets if t.exists()]
    if clash and not overwrite:
        raise RunDirError(f"{len(clash)} notebook file(s) already in {dest} (e.g. {clash[0].name}); they may hold "
                          "your edits: pick another folder, or pass --overwrite to replace them")
    from .files import atomic_write

    for f, t in zip(files, targets):
        atomic_write(t, lambda tmp, f=f: shutil.copyfile(f, tmp))  # a reader never sees half a notebook
    return targets
