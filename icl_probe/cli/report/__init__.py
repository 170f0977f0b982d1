"""The terminal reports: one module per command, each rendering its JSON document with rich, within 80 columns.

They only pick and format values; the aggregates they show come from icl_probe.summary. `format` holds the
shared number formats and table helpers, `scores` the KL, top-k, ablation and generation parts that
`analyze`, `dynamics` and `replay` share.
"""
