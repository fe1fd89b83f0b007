"""setuptools' build (pyproject.toml holds the project), plus the git commit it builds from: written into
the wheel as pipeline/_commit.txt, which pipeline.provenance reads, so an installed package records the
code it is wherever it is installed. An editable install reads its checkout instead."""
import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def checkout_commit() -> str | None:
    # pipeline.provenance by its path: importing the package would need its dependencies.
    spec = importlib.util.spec_from_file_location("provenance", HERE / "pipeline" / "provenance.py")
    provenance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(provenance)
    return provenance.checkout_commit(HERE)


class BuildPyWithCommit(build_py):
    def run(self):
        super().run()
        commit = checkout_commit()
        if commit and not self.editable_mode:
            (Path(self.build_lib) / "pipeline" / "_commit.txt").write_text(commit + "\n")


setup(cmdclass={"build_py": BuildPyWithCommit})
