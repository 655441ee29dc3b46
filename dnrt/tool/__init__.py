"""The dnrt training tool: configs, datasets, models, the training loop and the `dnrt` command line."""
