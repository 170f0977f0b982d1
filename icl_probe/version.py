"""icl-probe's version, written once: pyproject.toml reads it from here, the command line's version option
prints it, and every patch and JSON document records it (`icl_probe_version`)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
