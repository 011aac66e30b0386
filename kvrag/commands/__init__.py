"""The ``kvrag`` subcommands, one module per group; ``kvrag.cli`` assembles them."""
