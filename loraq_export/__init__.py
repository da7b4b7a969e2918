"""loraq_export: the orchestration a user touches (models, recipes, swap, checkpoints, export, CLI)."""
__version__ = "0.1.0"
