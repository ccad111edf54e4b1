"""The jobs: one module per ``milan`` command, each a typed ``run(cfg)`` plus its small argparse adapter."""
