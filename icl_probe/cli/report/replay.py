"""`replay`'s terminal summary: the patch and the query replayed, the patched top-k beside the unpatched query, the
scores against a context, and the generations."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from .format import print_phrases, span_list, text_line, token_count
from .scores import generation_table, prefix_agreement, print_generation, score_lines, top_k_lists


def patch_phrases(doc: dict) -> list[str]:
    """What the replayed patch is, from its metadata (an in-memory patch has none), and where it ran."""
    patch = doc["patch"]
    first = f"Patch for {patch['model']}" if patch.get("model") else "Patch"
    if patch.get("layers") is not None:
        first += f" (layers {span_list(patch['layers'])}, residual={patch['residual']})"
    checked = "checked" if patch["fingerprint_checked"] else "NOT checked"
    return [first, f"on {doc['model'] or '(unnamed model)'} ({doc['dtype']});", f"fingerprint {checked}"]


def print_replay(console: Console, doc: dict) -> None:
    """The replay summary: the query replayed, the patched top-k beside the unpatched query, then generations."""
    print_phrases(console, patch_phrases(doc), sep=" ")
    count = token_count(len(doc["query_tokens"]), doc.get("prefix_tokens"))
    if doc["query"] is None:
        console.print(Text.assemble(("query ", "bold"), "the patch's stored query", (f"  ({count})", "dim")))
    else:
        console.print(text_line(console, "query", doc["query"], count))
    if doc.get("context_matches_patch") is False:
        warning = ["the --context given is not the one this patch was made from", "(its sha256 differs)"]
        print_phrases(console, warning, sep=" ", style="bold yellow")
    for note in doc.get("notes") or []:
        print_phrases(console, [f"note: {note}"], style="yellow")
    console.print()
    titles = (("patched", "query alone, patched"), ("no_context", "query alone"), ("context", "with context"))
    console.print(top_k_lists(console, doc["top_k"], titles))
    if doc["kl_patched"] is not None:
        console.print()
        console.print(score_lines(doc))
    if doc["generated"]["patched"] is not None:
        console.print()
        console.print(generation_table(doc["generated"]))
        if doc["generated"]["agree_tokens"] is not None:
            console.print(
                prefix_agreement(doc["generated"]["agree_tokens"], len(doc["generated"]["patched"]["token_ids"]))
            )
    if doc.get("generation") is not None:
        console.print()
        print_generation(console, doc["generation"])
