"""Stage runners: one per step of the recipe, selected by `config.stage`."""
