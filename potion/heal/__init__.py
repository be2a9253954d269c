"""``potion heal``: load the inputs (a run folder or the owner's model and data), select the
sets, compute importances, search, measure and write the outputs and the report."""
