"""`export-patch`'s terminal summary: what was written, its size against dense ΔW, and the KL reached."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from ...summary import compression
from .format import fmt, kl_text, print_phrases, size, span_list, yes_no


def print_export(console: Console, doc: dict) -> None:
    """The export-patch summary: what was written, its size against dense ΔW, and the KL reached."""
    console.print(
        Text.assemble("Wrote a ", (doc["format"], "bold"), f" patch to {doc['output']} ({size(doc['file_bytes'])})")
    )
    print_phrases(
        console,
        [f"Layers patched: {span_list(doc['layers'])}", f"({len(doc['layers'])} layers, {doc['modules']} modules),",
         f"residual={doc['residual']}"],
        sep=" ",
    )  # fmt: skip
    ratio = compression(doc)
    print_phrases(
        console,
        [f"Update size (float32): {size(doc['patch_bytes'])} as factors,",
         f"{size(doc['dense_bytes'])} as dense ΔW ({ratio:.0f}× smaller)"],
        sep=" ",
    )  # fmt: skip
    console.print(Text.assemble("KL(context ‖ patched) ", kl_text(doc["kl_patched"]), " in memory, ",
                                kl_text(doc["kl_stored"]), " as written"))  # fmt: skip
    console.print(f"KL(context ‖ query alone) {fmt(doc['kl_no_context'])}")
    console.print(f"top-1 kept: {yes_no(doc['top1_match'])}")
