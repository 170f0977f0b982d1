"""Defaults that the command line shows in its options, kept free of torch so that its help starts at once.

Their modules re-export them: `models.DEFAULT_MODEL`, `heads.KNOCKOUT_SIZES`.
"""

__all__ = ["DEFAULT_MODEL", "KNOCKOUT_SIZES"]

DEFAULT_MODEL = "smollm2-135m"
KNOCKOUT_SIZES = (1, 2, 4, 8)  # heads: how many of the top heads each knockout removes
