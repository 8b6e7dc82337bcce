"""Fleet benchmark report: per-host tables, pass/fail against limits, latency plot, Markdown and HTML.

Reads the `rover-runtime benchmark` JSON files fetched from each car into a run folder (one
`<inventory host>.json` per car). Every figure in the report comes from those files, i.e. from the hosts.
"""
