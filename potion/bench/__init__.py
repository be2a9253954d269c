"""``potion benchmark`` and ``potion report``: the suite grid, the Ray tasks that train and heal
its cells, the results file, and the tables written from it."""
