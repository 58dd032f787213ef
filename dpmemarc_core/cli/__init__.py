"""The `dpmemarc` command line: one module per subcommand, shared argument types in `common`."""
