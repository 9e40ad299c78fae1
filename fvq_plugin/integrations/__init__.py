"""How fvq_plugin attaches to pyiqa and lmms-eval, through their extension points (see discovery)."""
