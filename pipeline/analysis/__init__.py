"""Analysis stage (SPEC §7): run folders → unified reports → deltas, trade-off fit, Pareto frontier,
persistence, plots and tables.

Modules, one job each (the unified reports they read are ``pipeline.data.reports``):

* ``names``       evaluator short names, model sort order, colours per source model
* ``stages``      training configuration (stages, metric, beta, dataset origin, seed) parsed from a model name
* ``partition``   restrict reports to a seed's train or test cases
* ``rows``        reading unified reports back into analysis rows
* ``aggregate``   aggregation over rows and deltas vs base / parent
* ``fit``         ordinary least squares of safety delta on helpfulness delta
* ``pareto``      non-dominated (helpfulness, safety) set with bootstrap confidence intervals
* ``persistence`` Persist(S), Persist(H) exactly as the study (SPEC §7.5)
* ``plots``       matplotlib figures (PNG and PDF)
* ``tables``      LaTeX and Markdown tables, the terminal results table (SPEC §7.8)
* ``aggregate_stage`` ``analyze aggregate``: unified reports of a folder of runs
* ``run``         ``analyze all``: everything in one call, returning the summary and the written files
* ``cli``         the ``agentpipe analyze`` command
"""
