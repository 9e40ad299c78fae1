"""lmms-eval task definitions shipped with fvq-plugin (installed as fvq_plugin.tasks)."""
