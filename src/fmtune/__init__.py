"""fmtune: fine-tune a foundation model on labeled data and prove, on held-out data, what it bought."""

from fmtune.version import __version__


def run(data=None, **options):
    """Fine-tune and climb the evidence ladder; see fmtune.api.run (imported lazily so `import fmtune` stays light)."""
    from fmtune.api import run as _run

    return _run(data, **options)


def load(run_dir, bf16=None):
    """A finished run's predictor (.predict or .generate); see fmtune.api.load."""
    from fmtune.api import load as _load

    return _load(run_dir, bf16=bf16)


__all__ = ["__version__", "run", "load"]
