"""`python -m icl_probe.cli`: the same command line as the `icl-probe` script."""

from . import main

main()
