"""Command line: one small command object per subcommand (see main.COMMANDS)."""
