"""Fitting: recipes, the per-layer plan, parallel and distributed fitting, the module swap."""
